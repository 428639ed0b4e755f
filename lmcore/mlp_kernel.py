"""The MLP with its LeakyReLU^2 fused into its GEMMs (train.fused_mlp), as one custom op whose CPU
kernel is the same math written out in PyTorch and whose CUDA kernels are Triton GEMMs with an
elementwise epilogue (issue 16; #1105's idea, our own code).

`leaky_mlp(x, w_fc, w_proj, slope)` = act(x w_fc^T) w_proj^T with act(h) = leaky_relu(h)^2:
- forward: one Triton GEMM computes pre = x w_fc^T and writes pre (kept for the backward) and
  post = act(pre) from the same tile, so the activation never reads pre back from memory; the
  second GEMM, post w_proj^T, is cuBLAS's.
- backward: one Triton GEMM computes dpost = dy w_proj and multiplies it by act'(pre) in its
  epilogue (dpre = dpost * 2 * leaky(pre) * (1 or slope)), so dpost is never written; the three
  weight and input gradients (dy^T post, dpre w_fc, dpre^T x) are cuBLAS's.
- `sign` (train.fused_mlp_sign): the forward keeps one bit an element, pre > 0, packed 32 to an
  int32 word, instead of pre, and the backward takes act'(pre) from post (which it keeps anyway
  for w_proj's gradient) and that bit: 2 sqrt(post) where pre > 0, -2 |slope| sqrt(post) elsewhere.
  19 MB written a call instead of 302; a deliberate rounding change (`_dpre_sign_math`).
The plain path (cuBLAS GEMMs, then inductor's elementwise kernels) writes and reads pre and
dpost once more each: about 0.6 GB a call at `record`'s micro-batch (98,304 x 1,536 bf16).
Two versions of the Triton GEMM: a persistent one with TMA loads and stores (the default where
Triton has TMA descriptors and the tensors suit them) and one that loads through pointers (any
strides; session 11's, the fallback). The TMA one runs on descriptors each program builds on the
device (`descriptors="device"`, the default: the launch takes pointers, so it costs the host what
the pointer kernel's does) or on descriptors the host builds at every launch ("host": session 14's,
37-50 us more host time a launch, the same step time; train.fused_mlp_descriptors chooses).
On Hopper, train.fused_mlp_pingpong runs both GEMMs as lmcore.mlp_pingpong's warp-specialized kernel
instead (the op's `descriptors` "pingpong"; the same numbers, with or without `sign`; imported only then).

The same math as the plain path (without `sign`): the GEMM's fp32 result is rounded to the input
dtype as cuBLAS's output would be, and the activation and its derivative run in fp32 on that value
and are rounded once. Only the GEMMs' accumulation order differs. torch.library custom ops
(lmcore::leaky_mlp, lmcore::leaky_mlp_dpre and lmcore::leaky_mlp_dpre_sign) with fake kernels, so
torch.compile keeps them in its whole graph. `_fc_math`, `_dpre_math` and their `_sign` versions
are what tests check against autograd of the plain MLP; the Triton kernel is checked against them
on GPU (tests marked cuda). Without Triton, or for shapes it does not take, the PyTorch math runs.
Imported only by GPT.use_fused_mlp: the exported script embeds this module only with the switch on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmcore.runtime import sm_count as _sm_count  # the name the kernels' launches (and tests' patches) use

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the PyTorch math serves every device
    triton = None
try:  # host-side TMA descriptors (Triton >= 3.4); without them only the pointer kernel runs
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# The GEMM's tiles: block rows x block columns x block depth, warps, pipeline stages[, 1 for the
# persistent TMA kernel]. The pointer kernel's is the best of 8 (benchmarks/mlp_epilogue_bench.py
# --tiles, H200, session 11: forward 0.369-0.382 ms, backward 0.372-0.377 ms a call). The TMA
# kernel's are the best tried in session 14 (five calls on three H200s: forward 0.324-0.347 ms at 4
# stages, backward 0.379-0.400 ms at 3; 4 stages do not fit the backward's shared memory), against
# 0.361-0.393 and 0.377-0.416 for the pointer kernel in the same calls; in training 0.33 and 0.40
# ms against 0.40 both ways, -8.2 ms a step (benchmarks/RESULTS.md, session 14). The sixth field of the
# TMA tiles is where their descriptors are built: 2 on the device (the default; session 15: the same
# kernel time, half the host's time a launch), 1 on the host.
# The seventh field, programs an SM (1 by default), launches that many persistent programs a
# multiprocessor, so that one program's epilogue could overlap another's GEMM. Session 18 (H200
# GPU-7baecdac, mlp_epilogue_bench.py --tiles): no tile at 2 or 3 an SM beat the defaults at 1
# (forward 0.327-0.440 ms against 0.327; backward 0.401-0.541 against 0.397; GEMM alone 0.233
# and 0.270), so the defaults stay at 1.
BLOCK_K, GROUP_M = 64, 8
TILE_POINTERS = (128, 128, BLOCK_K, 4, 3)
TILE_TMA_FWD, TILE_TMA_BWD = (128, 256, BLOCK_K, 8, 4, 2, 1), (128, 256, BLOCK_K, 8, 3, 2, 1)
DESCRIPTORS = {"device": 2, "host": 1}  # train.fused_mlp_descriptors -> the TMA tile's sixth field
PINGPONG = "pingpong"  # the op's kernel choice for train.fused_mlp_pingpong (lmcore.mlp_pingpong)
PINGPONG_QUARTER = "pingpong_quarter"  # the same, its forward by quarter tiles (train.fused_mlp_quarter_tiles)
PINGPONGS = (PINGPONG, PINGPONG_QUARTER)


def _act(h: Tensor, slope: float) -> Tensor:
    """leaky_relu(h)^2 in fp32, rounded once to h's dtype."""
    return F.leaky_relu(h.float(), negative_slope=slope).square().to(h.dtype)


def _fc_math(x: Tensor, w_fc: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """(pre, post): pre = x w_fc^T in x's dtype, post = act(pre)."""
    pre = x @ w_fc.t()
    return pre, _act(pre, slope)


def _dpre_math(g: Tensor, w_proj: Tensor, pre: Tensor, slope: float) -> Tensor:
    """dpre = (g w_proj) * act'(pre), the GEMM rounded to pre's dtype, the product in fp32."""
    dpost = (g @ w_proj).float()
    p = pre.float()
    grad = 2 * F.leaky_relu(p, negative_slope=slope) * torch.where(p > 0, 1.0, slope)
    return (dpost * grad).to(pre.dtype)


def _pack(positive: Tensor) -> Tensor:
    """(m, n) bools, n a multiple of 32 -> (m, n // 32) int32 words: bit j of word i is column 32 i + j."""
    m, n = positive.shape
    shifts = torch.arange(32, device=positive.device, dtype=torch.int32)
    return (positive.view(m, n // 32, 32).to(torch.int32) << shifts).sum(-1, dtype=torch.int32)


def _unpack(words: Tensor, n: int) -> Tensor:
    """_pack's inverse: (m, n // 32) int32 words -> (m, n) bools."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 1).view(words.size(0), n).bool()


def _fc_sign_math(x: Tensor, w_fc: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """(signs, post): pre's signs (pre > 0) packed by _pack, and post = act(pre); pre is not kept."""
    pre, post = _fc_math(x, w_fc, slope)
    return _pack(pre > 0), post


def _dpre_sign_math(g: Tensor, w_proj: Tensor, post: Tensor, signs: Tensor, slope: float) -> Tensor:
    """dpre from post and pre's signs: act'(pre) = 2 leaky(pre) (1 or slope), and |leaky(pre)| =
    sqrt(post), so act'(pre) = 2 sqrt(post) where pre > 0 and -2 |slope| sqrt(post) elsewhere (0 at
    pre = 0, as act'(0) is). The product in fp32, as _dpre_math's; sqrt(post) stands for |leaky(pre)|
    rounded once more (post's rounding, halved by the root)."""
    dpost = (g @ w_proj).float()
    grad = 2 * post.float().sqrt() * torch.where(_unpack(signs, post.size(1)), 1.0, -abs(slope))
    return (dpost * grad).to(post.dtype)


if triton is not None:

    @triton.jit
    def _pack_signs(h, BM: tl.constexpr, BN: tl.constexpr):
        # (BM, BN) fp32 -> (BM, BN // 32) int32 words of h > 0, bit j of word i column 32 i + j (_pack's)
        bits = tl.reshape((h > 0).to(tl.int32), (BM, BN // 32, 32))
        return tl.sum(bits << tl.arange(0, 32)[None, None, :], axis=2)

    @triton.jit
    def _unpack_signs(words, BM: tl.constexpr, BN: tl.constexpr):
        # _pack_signs' inverse: (BM, BN // 32) int32 words -> (BM, BN) int32 bits
        return tl.reshape((words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1, (BM, BN))

    @triton.jit
    def _sign_words(rows, first_word, M, N, BN: tl.constexpr):
        # offsets and bounds of a (rows, BN // 32) block of the (M, N // 32) sign words
        rw = first_word + tl.arange(0, BN // 32)
        return rows[:, None] * (N // 32) + rw[None, :], (rows[:, None] < M) & (rw[None, :] < N // 32)

    @triton.jit
    def _mm_act_kernel(a_ptr, b_ptr, pre_ptr, out_ptr, sign_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, slope,
                       BACKWARD: tl.constexpr, SIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, GROUP: tl.constexpr):
        # C = A B (A (M, K), B (K, N) by strides; K a multiple of BK), then the epilogue on each
        # (BM, BN) tile of C. Programs walk GROUP row blocks down a column block before moving
        # right, so B's tiles stay in L2 (Triton's matmul tutorial's ordering).
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        width = GROUP * grid_n
        first_m = (pid // width) * GROUP
        rows = tl.minimum(grid_m - first_m, GROUP)
        pid_m = first_m + (pid % width) % rows
        pid_n = (pid % width) // rows
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a = a_ptr + (rm % M)[:, None] * s_am + rk[None, :] * s_ak  # wrapped rows: loads need no mask
        b = b_ptr + rk[:, None] * s_bk + (rn % N)[None, :] * s_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(K // BK):
            acc = tl.dot(tl.load(a), tl.load(b), acc)
            a += BK * s_ak
            b += BK * s_bk
        c = rm[:, None] * N + rn[None, :]
        live = (rm[:, None] < M) & (rn[None, :] < N)
        dtype = out_ptr.dtype.element_ty
        h = acc.to(dtype).to(tl.float32)  # the GEMM's output as cuBLAS would round it
        if BACKWARD:  # h is dpost; pre's tile gives act'(pre), or post's and the signs (SIGN)
            p = tl.load(pre_ptr + c, mask=live, other=0.0).to(tl.float32)
            if SIGN:  # slope is -|slope| here (_launch)
                w, w_live = _sign_words(rm, pid_n * (BN // 32), M, N, BN)
                bits = _unpack_signs(tl.load(sign_ptr + w, mask=w_live, other=0), BM, BN)
                grad = 2.0 * tl.sqrt(p) * tl.where(bits != 0, 1.0, slope)
            else:
                grad = 2.0 * tl.where(p > 0, p, p * slope) * tl.where(p > 0, 1.0, slope)
            tl.store(out_ptr + c, (h * grad).to(dtype), mask=live)
        else:  # h is pre
            if SIGN:  # pre's signs, a bit a column, instead of pre
                w, w_live = _sign_words(rm, pid_n * (BN // 32), M, N, BN)
                tl.store(sign_ptr + w, _pack_signs(h, BM, BN), mask=w_live)
            else:
                tl.store(pre_ptr + c, h.to(dtype), mask=live)
            lk = tl.where(h > 0, h, h * slope)
            tl.store(out_ptr + c, (lk * lk).to(dtype), mask=live)

    @triton.jit
    def _tma_epilogue(acc, pre_desc, out_desc, sign_ptr, om, on, M, N, slope, BACKWARD: tl.constexpr,
                      SIGN: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr):
        # _mm_act_kernel's epilogue on one (BM, BH = BN / 2) half tile, through TMA descriptors (the
        # sign words through pointers)
        dtype = out_desc.dtype
        h = acc.to(dtype).to(tl.float32)
        if BACKWARD:
            p = pre_desc.load([om, on]).to(tl.float32)
            if SIGN:  # p is post; slope is -|slope| here (_launch)
                w, w_live = _sign_words(om + tl.arange(0, BM), on // 32, M, N, BH)
                bits = _unpack_signs(tl.load(sign_ptr + w, mask=w_live, other=0), BM, BH)
                grad = 2.0 * tl.sqrt(p) * tl.where(bits != 0, 1.0, slope)
            else:
                grad = 2.0 * tl.where(p > 0, p, p * slope) * tl.where(p > 0, 1.0, slope)
            out_desc.store([om, on], (h * grad).to(dtype))
        else:
            if SIGN:
                w, w_live = _sign_words(om + tl.arange(0, BM), on // 32, M, N, BH)
                tl.store(sign_ptr + w, _pack_signs(h, BM, BH), mask=w_live)
            else:
                pre_desc.store([om, on], h.to(dtype))
            lk = tl.where(h > 0, h, h * slope)
            out_desc.store([om, on], (lk * lk).to(dtype))

    @triton.jit
    def _tma_tiles(a_desc, b_desc, pre_desc, out_desc, sign_ptr, M, N, K, slope, BACKWARD: tl.constexpr,
                   SIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SMS: tl.constexpr):
        # The same GEMM and epilogue as _mm_act_kernel with B given as (N, K), persistent: one
        # program an SM walks the (BM, BN) tiles with the column block fastest (the tiles of one
        # row block of A run side by side, so A is read from HBM about once); TMA loads and stores
        # (out of bounds: zeros in, nothing out); the flattened loop lets one tile's epilogue
        # overlap the next tile's loads. The epilogue runs on two half tiles, which halves its
        # shared-memory staging.
        grid_n = tl.cdiv(N, BN)
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * grid_n, SMS, flatten=True):
            om = (tile // grid_n) * BM
            on = (tile % grid_n) * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(tl.cdiv(K, BK)):
                acc = tl.dot(a_desc.load([om, ki * BK]), b_desc.load([on, ki * BK]).T, acc)
            left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            _tma_epilogue(left, pre_desc, out_desc, sign_ptr, om, on, M, N, slope, BACKWARD, SIGN, BM, BN // 2)
            _tma_epilogue(right, pre_desc, out_desc, sign_ptr, om, on + BN // 2, M, N, slope, BACKWARD, SIGN, BM,
                          BN // 2)

    @triton.jit
    def _mm_act_tma_kernel(a_desc, b_desc, pre_desc, out_desc, sign_ptr, M, N, K, slope, BACKWARD: tl.constexpr,
                           SIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           SMS: tl.constexpr):
        # _tma_tiles on descriptors the host built (tma 1)
        _tma_tiles(a_desc, b_desc, pre_desc, out_desc, sign_ptr, M, N, K, slope, BACKWARD, SIGN, BM, BN, BK, SMS)

    @triton.jit
    def _mm_act_tma_dev_kernel(a_ptr, b_ptr, pre_ptr, out_ptr, sign_ptr, M, N, K, slope, BACKWARD: tl.constexpr,
                               SIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                               SMS: tl.constexpr):
        # _tma_tiles on descriptors each program builds from contiguous tensors' pointers (tma 2): the
        # launch takes pointers, as the pointer kernel's does, instead of encoding four descriptors
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        pre_desc = tl.make_tensor_descriptor(pre_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN // 2])
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN // 2])
        _tma_tiles(a_desc, b_desc, pre_desc, out_desc, sign_ptr, M, N, K, slope, BACKWARD, SIGN, BM, BN, BK, SMS)


def _triton_takes(m: int, k: int, n: int) -> bool:
    """The Triton GEMM's shapes: depth k a multiple of BLOCK_K, and the (m, n) output indexed in
    int32 (the pointer kernel's offsets are; 151 M elements at record's micro-batch)."""
    return k % BLOCK_K == 0 and m * n < 2**31


def _use_triton(x: Tensor, n: int) -> bool:
    """Triton for CUDA half-precision x (m, k) with an (m, n) output it takes."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and _triton_takes(x.size(0), x.size(1), n))


def _tile(a: Tensor, n: int, forward: bool, descriptors: str = "device") -> tuple:
    """The TMA kernel's tile, its descriptors built where `descriptors` says ("device" or "host"),
    where descriptors can take a (M, K) and an (M, n) output (Triton with TMA, 16-byte aligned rows
    and base), else the pointer kernel's."""
    if TensorDescriptor is not None and n % 8 == 0 and a.size(1) % 8 == 0 and a.data_ptr() % 16 == 0:
        tile = TILE_TMA_FWD if forward else TILE_TMA_BWD
        return (*tile[:5], DESCRIPTORS[descriptors], *tile[6:])
    return TILE_POINTERS


def _launch(a: Tensor, b_kn: Tensor, pre: Tensor, out: Tensor, slope: float, backward: bool, tile: tuple,
            signs: Tensor | None = None) -> None:
    """One kernel over C = a (M, K) @ b_kn (K, N) at `tile` (BM, BN, BK, warps, stages[, tma[,
    programs an SM]]). tma 1: the persistent TMA kernel, which takes B as (N, K) contiguous (b_kn, a
    weight, is copied so when it is not: 1.5 MB at record's widths), on descriptors built by the
    host; tma 2: the same on descriptors built on the device; 0 (or five fields): the pointer
    kernel (any strides). The persistent kernel runs `programs an SM` (default 1) programs on
    each multiprocessor. With `signs` ((M, N // 32) int32; N a multiple of 32, BN of 64), the
    forward writes pre's signs there instead of pre (`pre` is then not written), and the backward
    takes act'(pre) from post (passed as `pre`) and the signs."""
    bm, bn, bk, warps, stages = tile[:5]
    tma = tile[5] if len(tile) > 5 else 0
    per_sm = tile[6] if len(tile) > 6 else 1
    (m, k), n = a.shape, b_kn.size(1)
    sign = signs is not None
    if sign and backward:  # the factor of act' where pre <= 0: -|slope| sqrt(post) * 2
        slope = -abs(slope)
    signs = signs if sign else out  # a pointer the kernel does not touch without SIGN
    if tma:
        b = b_kn.t().contiguous()
        sms = _sm_count(a.device) * per_sm
        grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
        if tma == 2:  # Triton's allocator is a context variable: each thread (autograd's too) needs it set
            triton.set_allocator(_scratch)
            kernel, args = _mm_act_tma_dev_kernel, [a, b, pre, out]
        else:
            args = [TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk])]
            args += [TensorDescriptor.from_tensor(t, [bm, bn // 2]) for t in (pre, out)]
            kernel = _mm_act_tma_kernel
        kernel[grid](*args, signs, m, n, k, slope, BACKWARD=backward, SIGN=sign, BM=bm, BN=bn, BK=bk, SMS=sms,
                     num_warps=warps, num_stages=stages)
        return
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _mm_act_kernel[grid](a, b_kn, pre, out, signs, m, n, k, a.stride(0), a.stride(1), b_kn.stride(0),
                         b_kn.stride(1), slope, BACKWARD=backward, SIGN=sign, BM=bm, BN=bn, BK=bk, GROUP=GROUP_M,
                         num_warps=warps, num_stages=stages)


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """Triton's allocator for the global scratch that device-built descriptors live in: a torch
    allocation on the current device (under CUDA graph capture, from the graph's pool). Set at
    every such launch, as inductor sets its own at its kernels' launches: Triton keeps one
    allocator a thread (a ContextVar), and autograd runs the backward in its own thread."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _pingpong_takes(a: Tensor, n: int) -> bool:
    """lmcore.mlp_pingpong's kernel for a (M, K) and an (M, n) output: Gluon present, a Hopper GPU
    (its wgmma), rows and base 16-byte aligned for TMA, and K a multiple of BLOCK_K. Imported here:
    the exported script embeds lmcore.mlp_pingpong only with train.fused_mlp_pingpong on."""
    from lmcore import mlp_pingpong as PP

    return (PP.gluon is not None and torch.cuda.get_device_capability(a.device)[0] == 9 and n % 8 == 0
            and a.size(1) % BLOCK_K == 0 and a.data_ptr() % 16 == 0)


def _fc_triton(x: Tensor, w_fc: Tensor, slope: float, tile: tuple | None = None,
               descriptors: str = "device", sign: bool = False) -> tuple[Tensor, Tensor]:
    """(pre, post), or (signs, post) with `sign` (_fc_sign_math's). descriptors "pingpong":
    lmcore.mlp_pingpong's kernel where it takes the tensors, else the TMA kernel's default; "pingpong_quarter" (not
    with `sign`): the same at its quarter-tile tile, TILE_QUARTER."""
    post = x.new_empty(x.size(0), w_fc.size(0))
    signs = torch.empty(x.size(0), post.size(1) // 32, dtype=torch.int32, device=x.device) if sign else None
    pre = post if sign else torch.empty_like(post)  # with the signs pre is not written: post stands in for it
    if descriptors in PINGPONGS and tile is None and _pingpong_takes(x, post.size(1)):
        from lmcore.mlp_pingpong import TILE, TILE_QUARTER, launch

        pp_tile = TILE_QUARTER if descriptors == PINGPONG_QUARTER else TILE
        launch(x, w_fc, pre, post, slope, False, _sm_count(x.device), pp_tile, signs=signs)
    else:
        descriptors = "device" if descriptors in PINGPONGS else descriptors
        _launch(x, w_fc.t(), pre, post, slope, False, tile or _tile(x, post.size(1), True, descriptors), signs)
    return (signs if sign else pre), post


def _dpre_triton(g: Tensor, w_proj: Tensor, pre: Tensor, slope: float, tile: tuple | None = None,
                 descriptors: str = "device", signs: Tensor | None = None, zero: Tensor | None = None) -> Tensor:
    """dpre from pre, or with `signs` from post (passed as `pre`) and pre's signs; descriptors
    "pingpong" as _fc_triton's. `zero` (fp32, contiguous): filled with zeros, by the ping-pong
    kernel as a side job where it runs, else after the TMA kernel."""
    dpre = torch.empty_like(pre)
    if descriptors in PINGPONGS and tile is None and _pingpong_takes(g, pre.size(1)):
        from lmcore.mlp_pingpong import launch

        # w_proj (K, N), as leaky_mlp gives it
        launch(g, w_proj, pre, dpre, slope, True, _sm_count(g.device), b_kn=True, signs=signs, zero=zero)
        return dpre
    descriptors = "device" if descriptors in PINGPONGS else descriptors
    _launch(g, w_proj, pre, dpre, slope, True, tile or _tile(g, pre.size(1), False, descriptors), signs)
    if zero is not None:
        zero.zero_()
    return dpre


def _zeros_for(g: Tensor, shape: list[int]) -> Tensor | None:
    """The fp32 buffer the backward zeroes for the attention's (leaky_mlp's `token`), or None (shape [])."""
    return g.new_empty(shape, dtype=torch.float32) if shape else None


def _zeros_or_empty(zero: Tensor | None, g: Tensor) -> Tensor:
    """The dpre ops' second output: the zeroed buffer, or an empty fp32 tensor (a custom op returns tensors)."""
    return g.new_empty(0, dtype=torch.float32) if zero is None else zero


@torch.library.custom_op("lmcore::leaky_mlp", mutates_args=())
def _leaky_mlp(x: Tensor, w_fc: Tensor, w_proj: Tensor, slope: float, descriptors: str,
               sign: bool, token: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, pre, post), or (y, signs, post) with `sign`: what the backward keeps. `token` is not read
    (leaky_mlp's docstring: its gradient is a buffer of zeros)."""
    if _use_triton(x, w_fc.size(0)):
        kept, post = _fc_triton(x, w_fc, slope, descriptors=descriptors, sign=sign)
    else:
        kept, post = (_fc_sign_math if sign else _fc_math)(x, w_fc, slope)
    return post @ w_proj.t(), kept, post


@_leaky_mlp.register_fake
def _(x: Tensor, w_fc: Tensor, w_proj: Tensor, slope: float, descriptors: str,
      sign: bool, token: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    post = x.new_empty(x.size(0), w_fc.size(0))
    kept = x.new_empty(x.size(0), w_fc.size(0) // 32, dtype=torch.int32) if sign else torch.empty_like(post)
    return x.new_empty(x.size(0), w_proj.size(0)), kept, post


# zero_shape: [] or the shape of a fp32 buffer of zeros to return beside dpre (leaky_mlp's `token`), else (0,)
@torch.library.custom_op("lmcore::leaky_mlp_dpre", mutates_args=())
def _leaky_mlp_dpre(g: Tensor, w_proj: Tensor, pre: Tensor, slope: float, descriptors: str,
                    zero_shape: list[int]) -> tuple[Tensor, Tensor]:
    zero = _zeros_for(g, zero_shape)
    if _use_triton(g, pre.size(1)):
        dpre = _dpre_triton(g, w_proj, pre, slope, descriptors=descriptors, zero=zero)
    else:
        dpre = _dpre_math(g, w_proj, pre, slope)
        zero = None if zero is None else zero.zero_()
    return dpre, _zeros_or_empty(zero, g)


@_leaky_mlp_dpre.register_fake
def _(g: Tensor, w_proj: Tensor, pre: Tensor, slope: float, descriptors: str,
      zero_shape: list[int]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(pre), g.new_empty(zero_shape or [0], dtype=torch.float32)


@torch.library.custom_op("lmcore::leaky_mlp_dpre_sign", mutates_args=())
def _leaky_mlp_dpre_sign(g: Tensor, w_proj: Tensor, post: Tensor, signs: Tensor, slope: float,
                         descriptors: str, zero_shape: list[int]) -> tuple[Tensor, Tensor]:
    zero = _zeros_for(g, zero_shape)
    if _use_triton(g, post.size(1)):
        dpre = _dpre_triton(g, w_proj, post, slope, descriptors=descriptors, signs=signs, zero=zero)
    else:
        dpre = _dpre_sign_math(g, w_proj, post, signs, slope)
        zero = None if zero is None else zero.zero_()
    return dpre, _zeros_or_empty(zero, g)


@_leaky_mlp_dpre_sign.register_fake
def _(g: Tensor, w_proj: Tensor, post: Tensor, signs: Tensor, slope: float, descriptors: str,
      zero_shape: list[int]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(post), g.new_empty(zero_shape or [0], dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, w_fc, w_proj, ctx.slope, ctx.descriptors, ctx.sign, token = inputs
    ctx.zero_shape = [] if token is None else list(token.shape)
    ctx.save_for_backward(x, w_fc, w_proj, output[1], output[2])


def _backward(ctx, g: Tensor, _g_kept: Tensor, _g_post: Tensor):
    x, w_fc, w_proj, kept, post = ctx.saved_tensors
    g = g.contiguous()
    if ctx.sign:
        dpre, zero = _leaky_mlp_dpre_sign(g, w_proj, post, kept, ctx.slope, ctx.descriptors, ctx.zero_shape)
    else:
        dpre, zero = _leaky_mlp_dpre(g, w_proj, kept, ctx.slope, ctx.descriptors, ctx.zero_shape)
    return dpre @ w_fc, dpre.t() @ x, g.t() @ post, None, None, None, zero if ctx.zero_shape else None


_leaky_mlp.register_autograd(_backward, setup_context=_setup_context)


def leaky_mlp(x: Tensor, w_fc: Tensor, w_proj: Tensor, slope: float, descriptors: str = "device",
              sign: bool = False, token: Tensor | None = None) -> Tensor:
    """leaky_relu(x w_fc^T, slope)^2 w_proj^T for x (..., D), w_fc (hidden, D), w_proj (D_out,
    hidden), all of one dtype; the same math as the model's plain MLP. `descriptors`: where the
    TMA kernel's descriptors are built, "device" or "host" (the same kernel body, the same numbers).
    "pingpong" (train.fused_mlp_pingpong): lmcore.mlp_pingpong's warp-specialized kernel both ways
    (Hopper; elsewhere the TMA kernel on device-built descriptors), the same numbers, with `sign` too;
    "pingpong_quarter" (train.fused_mlp_quarter_tiles): the same, its forward by quarter tiles (the same bits).
    `sign` (train.fused_mlp_sign; hidden a multiple of 32): the forward keeps post and one bit an
    element, pre > 0, instead of pre, and the backward takes act'(pre) from them (_dpre_sign_math:
    a deliberate rounding change). `token` (train.mlp_zeroes_dq_accum; lmcore.fa3_xsa.attention_xsa's): not
    read; its gradient is a fp32 buffer of its shape, all zeros, that the backward's kernel wrote beside its
    GEMMs (the ping-pong kernel; elsewhere a fill after it): the attention's backward adds its dQ into it."""
    if descriptors not in (*DESCRIPTORS, *PINGPONGS):
        raise ValueError(f"descriptors={descriptors!r}: expected one of {', '.join([*DESCRIPTORS, *PINGPONGS])}")
    if sign and descriptors == PINGPONG_QUARTER:
        raise ValueError("sign=True with descriptors 'pingpong_quarter': the sign path's forward goes by half tiles")
    if sign and w_fc.size(0) % 32:
        raise ValueError(f"sign=True needs a hidden width that is a multiple of 32, not {w_fc.size(0)}")
    y, _, _ = _leaky_mlp(x.reshape(-1, x.size(-1)).contiguous(), w_fc.contiguous(), w_proj.contiguous(),
                         float(slope), descriptors, bool(sign), token)
    return y.view(*x.shape[:-1], y.size(-1))
