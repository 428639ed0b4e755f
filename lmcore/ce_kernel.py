"""The training loss as one op (train.fused_softcap_ce): the logit softcap and the cross-entropy
of each row, forward and backward, without the (N, V) logits in memory.

`softcap_cross_entropy(z, targets, cap)`: z (N, V) the unembedding's output, targets (N,) in
[0, V); returns each row's loss in fp32, lse(l) - l[target], where l = cap * tanh(z / cap) (cap
<= 0: l = z). The caller takes the mean. The backward gives dz = g * (softmax(l) - onehot(target))
* (1 - tanh(z / cap)^2) a row, rounded to z's dtype once. All math is fp32 from z's values, as
inductor computes the model's plain path (it does not round the logits to bf16 in between).

Under torch.compile inductor turns the plain path into two kernels at 1.2-1.7 TB/s on an H200
(169 us forward, 233 backward a `record` micro-batch of 98,304 x 1,024): libdevice's tanh and
exp per element make them compute-bound. The Triton kernels here take tanh as
1 - 2 / (2^(2 y log2 e) + 1) and the softmax with exp2: the forward reads z and writes each
row's loss and logsumexp; the backward reads z again (l recomputed) and writes dz. On an H200
(benchmarks/ce_kernel_bench.py, both compiled, in CUDA graphs): 0.194 ms forward + backward a
micro-batch against inductor's 0.323.

lmcore::softcap_ce and lmcore::softcap_ce_backward are torch.library custom ops with fake kernels,
so torch.compile keeps them in its graph as calls. Their CPU kernels (`_forward_math`,
`_backward_math`) are PyTorch, which tests check against F.cross_entropy; the Triton kernels run
on CUDA for V a power of two up to MAX_V, and are checked against the PyTorch ones (tests marked
cuda). Imported only by GPT.use_fused_softcap_ce: the exported script embeds it only with the
switch on (lmcore.export).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the PyTorch math serves every device
    triton = None

MAX_V = 4096  # the widest row a program holds in registers
# A program holds TILE values, 32 a thread of one warp: TILE // V rows (1 at V = 1,024) over V // TILE
# warps (at least 1 each). benchmarks/ce_kernel_bench.py --tiles on an H200 at record's N 98,304 x V 1,024
# (forward + backward ms): 1 row x 1 warp 0.188, 2 x 2 0.205, 1 x 2 0.206, 4 x 8 0.235, 8 x 1 0.783.
TILE = 1024
LOG2E = math.log2(math.e)
Y_MAX = 15.0  # |z / cap| clamped here for exp2: tanh(15) is 1 in fp32


def _softcap_math(zf: Tensor, cap: float) -> tuple[Tensor, Tensor | None]:
    """(l, t): l = cap * t, t = tanh(zf / cap); (zf, None) without a cap."""
    if cap <= 0:
        return zf, None
    t = torch.tanh(zf / cap)
    return cap * t, t


def _forward_math(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """(loss (N,), lse (N,)), fp32: lse = logsumexp(l), loss = lse - l[target]."""
    l, _ = _softcap_math(z.float(), cap)
    lse = torch.logsumexp(l, dim=-1)
    return lse - l.gather(1, targets[:, None]).squeeze(1), lse


def _backward_math(g: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
    """dz = g (softmax(l) - onehot(target)) (1 - t^2), in fp32, returned in z's dtype."""
    l, t = _softcap_math(z.float(), cap)
    d = torch.exp(l - lse[:, None])
    d[torch.arange(d.size(0), device=d.device), targets] -= 1.0
    if t is not None:
        d = d * (1.0 - t * t)
    return (g.float()[:, None] * d).to(z.dtype)


if triton is not None:
    _LOG2E, _Y_MAX = tl.constexpr(LOG2E), tl.constexpr(Y_MAX)  # jit code reads globals only as constexprs

    @triton.jit
    def _softcap(z, inv_cap, cap, CAPPED: tl.constexpr):
        """(l, t) in fp32 as _softcap_math, tanh(y) = 1 - 2 / (exp2(2 y log2 e) + 1), y clamped."""
        t = z
        l = z
        if CAPPED:
            y = tl.minimum(tl.maximum(z * inv_cap, -_Y_MAX), _Y_MAX)
            t = 1.0 - 2.0 / (tl.exp2(y * (2.0 * _LOG2E)) + 1.0)
            l = cap * t
        return l, t

    @triton.jit
    def _rows_tile(z_ptr, tgt_ptr, n_rows, inv_cap, cap, V: tl.constexpr, R: tl.constexpr, CAPPED: tl.constexpr):
        """A program's rows: their offsets, liveness, targets, and l and t of their (R, V) tile."""
        rows = tl.program_id(0) * R + tl.arange(0, R)
        live = rows < n_rows
        offs = rows.to(tl.int64)[:, None] * V + tl.arange(0, V)[None, :]
        z = tl.load(z_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
        tgt = tl.load(tgt_ptr + rows, mask=live, other=0)
        l, t = _softcap(z, inv_cap, cap, CAPPED)
        return rows, live, offs, tgt, l, t

    @triton.jit
    def _ce_fwd_kernel(z_ptr, tgt_ptr, loss_ptr, lse_ptr, n_rows, inv_cap, cap,
                       V: tl.constexpr, R: tl.constexpr, CAPPED: tl.constexpr):
        rows, live, _, tgt, l, _ = _rows_tile(z_ptr, tgt_ptr, n_rows, inv_cap, cap, V, R, CAPPED)
        m = tl.max(l, axis=1)
        lse = m + tl.log(tl.sum(tl.exp2((l - m[:, None]) * _LOG2E), axis=1))
        zt = tl.load(z_ptr + rows.to(tl.int64) * V + tgt, mask=live, other=0.0).to(tl.float32)
        lt, _ = _softcap(zt, inv_cap, cap, CAPPED)  # the target's logit, by the same formula
        tl.store(loss_ptr + rows, lse - lt, mask=live)
        tl.store(lse_ptr + rows, lse, mask=live)

    @triton.jit
    def _ce_bwd_kernel(g_ptr, z_ptr, tgt_ptr, lse_ptr, dz_ptr, n_rows, inv_cap, cap,
                       V: tl.constexpr, R: tl.constexpr, CAPPED: tl.constexpr):
        rows, live, offs, tgt, l, t = _rows_tile(z_ptr, tgt_ptr, n_rows, inv_cap, cap, V, R, CAPPED)
        lse = tl.load(lse_ptr + rows, mask=live, other=0.0)
        g = tl.load(g_ptr + rows, mask=live, other=0.0)
        d = tl.exp2((l - lse[:, None]) * _LOG2E) - tl.where(tl.arange(0, V)[None, :] == tgt[:, None], 1.0, 0.0)
        if CAPPED:
            d = d * (1.0 - t * t)
        tl.store(dz_ptr + offs, (g[:, None] * d).to(dz_ptr.dtype.element_ty), mask=live[:, None])


def _use_triton(z: Tensor) -> bool:
    """Triton for CUDA rows whose width is a power of two (tl.arange's sizes) up to MAX_V."""
    v = z.size(-1)
    return triton is not None and z.is_cuda and v & (v - 1) == 0 and v <= MAX_V


def default_tile(v: int) -> tuple[int, int]:
    """(rows a program, warps) for rows of width v: TILE values a warp."""
    return max(1, TILE // v), max(1, v // TILE)


def _launch(kernel, z: Tensor, args: tuple, cap: float, rows: int | None, warps: int | None) -> None:
    """`kernel` over z's rows, `rows` a program at `warps` warps (None: default_tile's)."""
    n, v = z.shape
    rows, warps = rows or default_tile(v)[0], warps or default_tile(v)[1]
    if n:
        kernel[(triton.cdiv(n, rows),)](*args, n, 1.0 / cap if cap > 0 else 1.0, float(cap),
                                        V=v, R=rows, CAPPED=cap > 0, num_warps=warps)


def _forward_triton(z: Tensor, targets: Tensor, cap: float, rows: int | None = None,
                    warps: int | None = None) -> tuple[Tensor, Tensor]:
    """The forward kernel: (loss, lse) as _forward_math; `rows`/`warps` the tile choice."""
    loss = torch.empty(z.size(0), dtype=torch.float32, device=z.device)
    lse = torch.empty_like(loss)
    _launch(_ce_fwd_kernel, z, (z, targets, loss, lse), cap, rows, warps)
    return loss, lse


def _backward_triton(g: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float, rows: int | None = None,
                     warps: int | None = None) -> Tensor:
    """The backward kernel: dz as _backward_math; `rows`/`warps` the tile choice."""
    dz = torch.empty_like(z)
    _launch(_ce_bwd_kernel, z, (g, z, targets, lse, dz), cap, rows, warps)
    return dz


@torch.library.custom_op("lmcore::softcap_ce", mutates_args=())
def _softcap_ce(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    if _use_triton(z):
        return _forward_triton(z, targets, cap)
    return _forward_math(z, targets, cap)


@_softcap_ce.register_fake
def _(z: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return z.new_empty(z.size(0), dtype=torch.float32), z.new_empty(z.size(0), dtype=torch.float32)


@torch.library.custom_op("lmcore::softcap_ce_backward", mutates_args=())
def _softcap_ce_backward(g: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
    if _use_triton(z):
        return _backward_triton(g, z, targets, lse, cap)
    return _backward_math(g, z, targets, lse, cap)


@_softcap_ce_backward.register_fake
def _(g: Tensor, z: Tensor, targets: Tensor, lse: Tensor, cap: float) -> Tensor:
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output) -> None:
    z, targets, ctx.cap = inputs
    ctx.save_for_backward(z, targets, output[1])


def _backward(ctx, g: Tensor, _g_lse: Tensor):
    z, targets, lse = ctx.saved_tensors
    return _softcap_ce_backward(g.float().contiguous(), z, targets, lse, ctx.cap), None, None


_softcap_ce.register_autograd(_backward, setup_context=_setup_context)


def softcap_cross_entropy(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Each row's loss (N,) fp32, F.cross_entropy(cap * tanh(z / cap), targets, reduction="none")
    in fp32 from z's values (cap <= 0: no softcap), for z (N, V) and targets (N,) in [0, V)."""
    loss, _ = _softcap_ce(z.contiguous(), targets.contiguous(), float(cap))
    return loss
