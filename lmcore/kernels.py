"""Fused kernels for attention's q/k/v path (train.fused_qk_norm_rope, train.fused_qkv), each as
one custom op whose CPU kernel is the same math written out in PyTorch and whose CUDA kernel is
Triton.

`qk_norm_rope(x, cos, sin, gain, repeat)`: attention's q (or k) path in one pass over x
(B, T, H, D): RMSNorm over D, RoPE on the first 2 * cos.size(-1) dims of each head, times a
per-head gain (None: 1, for k), each head written `repeat` times in a row (train.expand_kv:
k with as many heads as q; the backward sums the copies' gradients in fp32 first). The
model's plain path composes rms_norm, apply_rope and the gain; inductor compiles that into
kernels 2-4x slower than HBM bandwidth (session 6's profile: 107 + 198 us a call for q at
`record`'s micro-batch, forward + backward). Here the forward reads x once and writes the
output and the per-row 1/rms; the backward reads the output's gradient and x once, writes x's
gradient, and sums the gain's gradient per head from per-block partial sums (no atomics: the
same result every run).

`qkv_norm_rope(qkv, cos, sin, gain, heads, head_dim, repeat)` (train.fused_qkv): q, k and v from
one GEMM on c_q, c_k and c_v's weights concatenated. The same two kernels read q's and k's slices
of its output where they lie (each row's start from its token's stride), and the backward writes
q's, k's and v's gradients into one tensor of the GEMM's output shape, so the input's gradient is
one GEMM. v's slice is copied out once each way, by k's kernels (session 17's first version
copied it with PyTorch: 176 strided copies, 11.4 ms a step on an H200). With `repeat_v`
(train.fused_qkv_repeat_v) k's forward programs also write v's heads `repeat` times in a row, as
attention reads v under train.expand_kv, and its backward programs sum those copies' gradients
with v's own (XSA's) in fp32 into v's slice: inductor's repeat and sum kernels are left out.

All are torch.library custom ops (lmcore::qk_norm_rope, lmcore::qkv_norm_rope and their _backward
ops) with fake kernels, so torch.compile keeps them in its whole graph as calls. The CPU kernels
(`_forward_math`, `_backward_math`) are what tests check against autograd of the plain
composition; the Triton kernels are checked against them on GPU (tests marked cuda). Without
Triton, CUDA tensors run the PyTorch math. XSA's kernels are lmcore.xsa_kernel's.
Imported only by GPT.use_fused_qk_norm_rope / use_fused_qkv: the exported single-file script
embeds this module only for a config with a switch on (lmcore.export).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmcore.layers import RMS_EPS, apply_rope, repeat_heads

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the PyTorch math serves every device
    triton = None

TILE = 2048  # elements of x per Triton program: 2048 // D rows, each one head of one token
WARPS = 8


def _forward_math(
    x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int = 1
) -> tuple[Tensor, Tensor]:
    """(out in x.dtype, rstd (B, T, H) fp32): out = gain * rope(x * rstd), in fp32, each head
    `repeat` times in a row (out (B, T, H * repeat, D))."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1) + RMS_EPS)
    out = apply_rope(xf * rstd[..., None], cos.float(), sin.float())
    if gain is not None:
        out = out * gain.float()[None, None, :, None]
    return repeat_heads(out.to(x.dtype), repeat), rstd


def _backward_math(
    g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int = 1
) -> tuple[Tensor, Tensor]:
    """(dx in x.dtype, dgain (H,) fp32, or (0,) without a gain) for out = gain * rope(n),
    n = x * rstd, g (B, T, H * repeat, D) first summed over each head's copies in fp32: with
    u = rope^T(g) (RoPE's transpose is the rotation by -sin) and t = sum(u * n) per row,
    dgain = sum of t over each head's rows, dn = gain * u and dx = rstd * (dn - n * mean(dn * n))
    (RMSNorm's backward)."""
    gf, cos, sin = g.float().unflatten(2, (x.size(2), repeat)).sum(3), cos.float(), sin.float()
    n = x.float() * rstd[..., None]
    u = apply_rope(gf, cos, -sin)
    t = (u * n).sum(-1, keepdim=True)
    scale = rstd[..., None] if gain is None else rstd[..., None] * gain.float()[None, None, :, None]
    dx = scale * (u - n * t / x.size(-1))
    dgain = x.new_empty(0, dtype=torch.float32) if gain is None else t.sum(dim=(0, 1, 3))
    return dx.to(x.dtype), dgain


if triton is not None:
    # RoPE on a (R, D) tile of heads without splitting it: rope(x) = x * C + partner(x) * S,
    # where partner swaps the two rotated halves (column j <-> j +- HALF, loaded contiguously in
    # runs of HALF) and C, S are cos and +-sin on the rotated columns, 1 and 0 on the rest; its
    # transpose is x * C - partner(x) * S. One layout for every tile, one reduction a row.

    @triton.jit
    def _heads(rows, H: tl.constexpr, D: tl.constexpr, XS: tl.constexpr):
        """Where each row (a head of a token: row = token * H + head) starts in a tensor whose tokens
        are XS elements apart (H * D when contiguous; more when x is a slice of fused q/k/v)."""
        return (rows // H) * XS + (rows % H) * D

    @triton.jit
    def _tile(ptr, offs, mask, D: tl.constexpr, HALF: tl.constexpr):
        """A (R, D) tile of heads starting at offs and its partner tile (rotated halves swapped; 0
        elsewhere), fp32."""
        cols = tl.arange(0, D)[None, :]
        base = ptr + offs[:, None]
        full = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        partner_cols = cols + HALF - 2 * HALF * ((cols // HALF) % 2)
        partner = tl.load(base + partner_cols, mask=mask & (cols < 2 * HALF), other=0.0).to(tl.float32)
        return full, partner

    @triton.jit
    def _rope_cs(cos_ptr, sin_ptr, rows, mask, T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
        """(C, S) tiles (R, D) for the rows' tokens (row = token * H + head)."""
        cols = tl.arange(0, D)[None, :]
        rotated = mask & (cols < 2 * HALF)
        tab = ((rows // H) % T)[:, None] * HALF + cols % HALF
        c = tl.load(cos_ptr + tab, mask=rotated, other=1.0)
        s = tl.load(sin_ptr + tab, mask=rotated, other=0.0)
        return c, tl.where(cols < HALF, s, -s)

    @triton.jit
    def _qk_fwd_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, rstd_ptr, v_ptr, v_out_ptr, v_rep_ptr, vs_ptr,
                       n_rows, eps, T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                       R: tl.constexpr, HAS_GAIN: tl.constexpr, REP: tl.constexpr, XS: tl.constexpr,
                       HAS_V: tl.constexpr, V_REP: tl.constexpr, HAS_VS: tl.constexpr):
        # HAS_V (k's call under train.fused_qkv): v's rows, XS apart like x's, copied out contiguous;
        # V_REP: and REP times in a row into v_rep, like k's; HAS_VS: times their token's scale (fp32)
        rows = tl.program_id(0) * R + tl.arange(0, R)
        live = rows < n_rows
        mask = live[:, None]
        cols = tl.arange(0, D)[None, :]
        if HAS_V:
            vt = tl.load(v_ptr + _heads(rows, H, D, XS)[:, None] + cols, mask=mask)
            if HAS_VS:
                vs = tl.load(vs_ptr + rows // H, mask=live, other=0.0)
                vt = (vt.to(tl.float32) * vs[:, None]).to(v_out_ptr.dtype.element_ty)
            tl.store(v_out_ptr + rows[:, None] * D + cols, vt, mask=mask)
            if V_REP:
                for j in tl.static_range(REP):
                    tl.store(v_rep_ptr + (rows * REP + j)[:, None] * D + cols, vt, mask=mask)
        x, xp = _tile(x_ptr, _heads(rows, H, D, XS), mask, D, HALF)
        c, s = _rope_cs(cos_ptr, sin_ptr, rows, mask, T, H, D, HALF)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (R,)
        scale = rstd
        if HAS_GAIN:
            scale = scale * tl.load(gain_ptr + rows % H, mask=live, other=0.0).to(tl.float32)
        out = ((x * c + xp * s) * scale[:, None]).to(out_ptr.dtype.element_ty)
        for j in tl.static_range(REP):  # row r's copies are output rows r * REP + j
            tl.store(out_ptr + (rows * REP + j)[:, None] * D + cols, out, mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=live)

    @triton.jit
    def _qk_bwd_kernel(g_ptr, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, dgain_part_ptr, gv_ptr, gv_rep_ptr,
                       dv_ptr, v_ptr, vs_ptr, dvs_part_ptr, n_rows, T: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                       HALF: tl.constexpr, R: tl.constexpr, HAS_GAIN: tl.constexpr, REP: tl.constexpr, XS: tl.constexpr,
                       DXS: tl.constexpr, HAS_V: tl.constexpr, V_REP: tl.constexpr, HAS_VS: tl.constexpr):
        # x is read, and dx written, with tokens XS and DXS elements apart (_heads); HAS_V: v's
        # (contiguous) gradient written DXS apart too, into its slice of the fused gradient, with its
        # REP copies' gradients (V_REP) added in fp32; HAS_VS: v's forward was v (XS apart) times its
        # token's scale: its gradient is scaled too, and each row's sum(gv * v) is stored for the scale's
        pid = tl.program_id(0)
        rows = pid * R + tl.arange(0, R)
        live = rows < n_rows
        mask = live[:, None]
        cols = tl.arange(0, D)[None, :]
        if HAS_V:
            gv = tl.load(gv_ptr + rows[:, None] * D + cols, mask=mask, other=0.0)
            if V_REP:
                gv = gv.to(tl.float32)
                for j in tl.static_range(REP):
                    gv += tl.load(gv_rep_ptr + (rows * REP + j)[:, None] * D + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_VS:
                gv = gv.to(tl.float32)
                vt = tl.load(v_ptr + _heads(rows, H, D, XS)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(dvs_part_ptr + rows, tl.sum(gv * vt, axis=1), mask=live)
                gv = gv * tl.load(vs_ptr + rows // H, mask=live, other=0.0)[:, None]
            tl.store(dv_ptr + _heads(rows, H, D, DXS)[:, None] + cols, gv.to(dv_ptr.dtype.element_ty), mask=mask)
        g, gp = _tile(g_ptr, rows * REP * D, mask, D, HALF)
        for j in tl.static_range(1, REP):  # the gradients of row r's copies, summed in fp32
            gj, gpj = _tile(g_ptr, (rows * REP + j) * D, mask, D, HALF)
            g, gp = g + gj, gp + gpj
        t = _norm_rope_grad(g, gp, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, rows, live, T, H, D, HALF,
                            XS, DXS, HAS_GAIN)
        if HAS_GAIN:  # the gain's gradient: t summed over each head's rows, one partial a program
            tl.store(dgain_part_ptr + pid * H + tl.arange(0, H), tl.sum(tl.reshape(t, (R // H, H)), axis=0))

    @triton.jit
    def _norm_rope_grad(g, gp, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, rows, live, T: tl.constexpr,
                        H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, XS: tl.constexpr, DXS: tl.constexpr,
                        HAS_GAIN: tl.constexpr):
        """dx of the rows for their output's gradient g and its partner tile gp (R, D) fp32, stored;
        returns t = sum(rope^T(g) * n) a row (R,), what the gain's gradient sums."""
        mask, cols = live[:, None], tl.arange(0, D)[None, :]
        x = tl.load(x_ptr + _heads(rows, H, D, XS)[:, None] + cols, mask=mask, other=0.0).to(tl.float32)
        c, s = _rope_cs(cos_ptr, sin_ptr, rows, mask, T, H, D, HALF)
        r = tl.load(rstd_ptr + rows, mask=live, other=0.0)  # (R,)
        u = g * c - gp * s  # rope^T(g)
        t = tl.sum(u * x, axis=1) * r  # sum(u * n) a row
        scale = r
        if HAS_GAIN:
            scale = scale * tl.load(gain_ptr + rows % H, mask=live, other=0.0).to(tl.float32)
        dx = scale[:, None] * (u - x * (r * t / D)[:, None])
        tl.store(dx_ptr + _heads(rows, H, D, DXS)[:, None] + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        return t

    @triton.jit
    def _acc_tile(ptr, base, HALF: tl.constexpr):
        """64 rows x 64 columns of FA3's dQ accumulator (one MMA warpgroup's half of a 128-row block: 4096
        floats from base, in memory as [col // 8, row // 16, row % 8, (col % 8) // 2, (row % 16) // 8,
        col % 2]) and its partner tile, both in row order (64, 64) fp32. Loaded whole and contiguous,
        then permuted in registers. The partner's column groups of 8 swap (HALF a multiple of 8)."""
        i = tl.arange(0, 4096)
        group = i // 512
        partner_group = group + HALF // 8 - 2 * (HALF // 8) * ((group // (HALF // 8)) % 2)
        full = tl.load(ptr + base + i)
        partner = tl.load(ptr + base + i + (partner_group - group) * 512, mask=group < 2 * HALF // 8, other=0.0)
        full = tl.reshape(tl.permute(tl.reshape(full, (8, 4, 8, 4, 2, 2)), (1, 4, 2, 0, 3, 5)), (64, 64))
        partner = tl.reshape(tl.permute(tl.reshape(partner, (8, 4, 8, 4, 2, 2)), (1, 4, 2, 0, 3, 5)), (64, 64))
        return full, partner

    @triton.jit
    def _q_bwd_acc_kernel(acc_ptr, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, dgain_part_ptr, acc_scale,
                          T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, TR: tl.constexpr,
                          XS: tl.constexpr, DXS: tl.constexpr):
        # q's backward from FA3's dQ accumulator (B, H, TR * 64) (train.fa3_dq_accum): program
        # (b * H + h) * (TR // 64) + j takes tokens 64 j .. 64 j + 63 of head h, one partial of the gain's gradient
        pid = tl.program_id(0)
        bh, j = pid // (TR // 64), pid % (TR // 64)
        tok = j * 64 + tl.arange(0, 64)
        live = tok < T
        rows = ((bh // H) * T + tok) * H + bh % H  # rows as _qk_bwd_kernel numbers them
        g, gp = _acc_tile(acc_ptr, pid * 4096, HALF)  # (bh * TR + 64 j) * 64
        t = _norm_rope_grad(g * acc_scale, gp * acc_scale, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, rows,
                            live, T, H, D, HALF, XS, DXS, True)
        tl.store(dgain_part_ptr + pid, tl.sum(t, axis=0))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _use_triton(x: Tensor, half: int) -> bool:
    """Triton for CUDA tensors whose heads, head dim and rotated half are powers of two
    (tl.arange's sizes) and whose head dim fits a program's tile."""
    h, d = x.size(2), x.size(3)
    return triton is not None and x.is_cuda and _pow2(h) and _pow2(d) and _pow2(half) and h * d <= TILE


def _rows(x: Tensor) -> int:
    """Rows (heads of one token) per program: TILE // D, a multiple of H (whole tokens)."""
    return TILE // x.size(3)


def _token_stride(x: Tensor) -> int:
    """The elements between x's tokens, for x (B, T, H, D) whose heads are contiguous within a
    token and whose tokens are evenly spaced (contiguous x, or a head slice of fused q/k/v)."""
    _, t, _, d = x.shape
    if x.stride(3) != 1 or x.stride(2) != d or x.stride(0) != t * x.stride(1):
        raise ValueError(f"q/k kernel: heads not contiguous within evenly spaced tokens (strides {x.stride()})")
    return x.stride(1)


def _forward_triton(
    x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int = 1, rows: int | None = None,
    warps: int = WARPS, v: Tensor | None = None, v_out: Tensor | None = None, v_rep: Tensor | None = None,
    vscale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward kernel; `rows` a program (a multiple of H; default TILE // D) and `warps`
    are the tile choice (benchmarks/qk_kernel_bench.py compares a few). With `v` (x's shape and
    token stride) the same programs copy it into `v_out` (contiguous), and into `v_rep` (out's shape)
    each head `repeat` times in a row where given; times `vscale` (B, T) fp32 where given."""
    b, t, h, d = x.shape
    out = x.new_empty(b, t, h * repeat, d)
    rstd = torch.empty((b, t, h), dtype=torch.float32, device=x.device)
    n_rows, rows = b * t * h, rows or _rows(x)
    _qk_fwd_kernel[(triton.cdiv(n_rows, rows),)](x, cos, sin, x if gain is None else gain, out, rstd,
                                                 x if v is None else v, out if v_out is None else v_out,
                                                 out if v_rep is None else v_rep, rstd if vscale is None else vscale,
                                                 n_rows, RMS_EPS, T=t, H=h, D=d, HALF=cos.size(-1), R=rows,
                                                 HAS_GAIN=gain is not None, REP=repeat, XS=_token_stride(x),
                                                 HAS_V=v is not None, V_REP=v_rep is not None,
                                                 HAS_VS=vscale is not None, num_warps=warps)
    return out, rstd


def _backward_triton(
    g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int = 1,
    rows: int | None = None, warps: int = WARPS, dx: Tensor | None = None, gv: Tensor | None = None,
    dv: Tensor | None = None, gv_rep: Tensor | None = None, v: Tensor | None = None, vscale: Tensor | None = None,
    dvs_part: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The backward kernel, writing x's gradient into `dx` (x's shape, any token stride) if given;
    with `gv` (contiguous, x's shape) the same programs copy it into `dv` (dx's token stride), with
    the sum of `gv_rep`'s copies (g's shape: v's heads `repeat` times in a row) added where given. With
    `vscale` (B, T) fp32 (v, x's token stride, was scaled by it) that sum is scaled too, and each row's
    sum(that sum * v) goes to `dvs_part` (B, T, H) fp32."""
    b, t, h, d = x.shape
    n_rows, rows = b * t * h, rows or _rows(x)
    blocks = triton.cdiv(n_rows, rows)
    dx = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device) if dx is None else dx
    part = torch.empty((blocks if gain is not None else 0, h), dtype=torch.float32, device=x.device)
    _qk_bwd_kernel[(blocks,)](g, x, rstd, cos, sin, x if gain is None else gain, dx, part,
                              x if gv is None else gv, g if gv_rep is None else gv_rep, dx if dv is None else dv,
                              x if v is None else v, rstd if vscale is None else vscale,
                              rstd if dvs_part is None else dvs_part, n_rows, T=t, H=h, D=d, HALF=cos.size(-1), R=rows,
                              HAS_GAIN=gain is not None, REP=repeat, XS=_token_stride(x), DXS=_token_stride(dx),
                              HAS_V=gv is not None, V_REP=gv_rep is not None, HAS_VS=vscale is not None,
                              num_warps=warps)
    return dx, part.sum(0) if gain is not None else part.new_empty(0)


def _q_backward_acc_triton(acc: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor, dx: Tensor,
                           acc_scale: float, warps: int = WARPS) -> Tensor:
    """q's backward kernel reading its output's gradient as FA3's dQ accumulator (B, H, TR * 64) fp32
    times acc_scale, writing dx (x's shape, any token stride); the gain's gradient (H,) returned."""
    b, t, h, d = x.shape
    half = cos.size(-1)
    if d != 64 or half % 8 or acc.shape != (b, h, acc.size(2)) or acc.size(2) % (ACC_BLOCK * d):
        raise ValueError(f"q's backward from FA3's dQ accumulator: head dim 64 and a rotated half a multiple of 8, "
                         f"not {d} and {half}; accumulator {tuple(acc.shape)}")
    tr = acc.size(2) // d
    part = torch.empty(b * h * (tr // 64), dtype=torch.float32, device=x.device)
    _q_bwd_acc_kernel[(part.numel(),)](acc, x, rstd, cos, sin, gain, dx, part, acc_scale, T=t, H=h, D=d, HALF=half,
                                       TR=tr, XS=_token_stride(x), DXS=_token_stride(dx), num_warps=warps)
    return part.view(b, h, -1).sum((0, 2))


@torch.library.custom_op("lmcore::qk_norm_rope", mutates_args=())
def _qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int) -> tuple[Tensor, Tensor]:
    if _use_triton(x, cos.size(-1)):
        return _forward_triton(x, cos, sin, gain, repeat)
    return _forward_math(x, cos, sin, gain, repeat)


@_qk_norm_rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int) -> tuple[Tensor, Tensor]:
    b, t, h, d = x.shape
    return x.new_empty(b, t, h * repeat, d), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lmcore::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(
    g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int
) -> tuple[Tensor, Tensor]:
    if _use_triton(x, cos.size(-1)):
        return _backward_triton(g, x, rstd, cos, sin, gain, repeat)
    return _backward_math(g, x, rstd, cos, sin, gain, repeat)


@_qk_norm_rope_backward.register_fake
def _(
    g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(0 if gain is None else gain.size(0), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, cos, sin, gain, ctx.repeat = inputs
    ctx.save_for_backward(x, output[1], cos, sin, gain)


def _backward(ctx, g: Tensor, _g_rstd: Tensor):
    x, rstd, cos, sin, gain = ctx.saved_tensors
    dx, dgain = _qk_norm_rope_backward(g.contiguous(), x, rstd, cos, sin, gain, ctx.repeat)
    return dx, None, None, None if gain is None else dgain.to(gain.dtype), None


_qk_norm_rope.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, repeat: int = 1) -> Tensor:
    """gain * rope(rms_norm(x)) for x (B, T, H, D) with cos/sin (T, half), gain (H,) or None
    (k: no gain, and no gain gradient to compute); in fp32, returned in x's dtype (the same
    math as the model's plain path), each head `repeat` times in a row: (B, T, H * repeat, D),
    as x.repeat_interleave(repeat, dim=2) would give."""
    out, _ = _qk_norm_rope(x.contiguous(), cos.float().contiguous(), sin.float().contiguous(), gain, repeat)
    return out


# q, k and v from one GEMM (train.fused_qkv) ------------------------------------------------


def _split_qkv(qkv: Tensor, heads: int, head_dim: int, gate: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Views (B, T, H, D), (B, T, Hkv, D) and (B, T, Hkv, D) of qkv (B, T, (H + 2 Hkv) D + gate); the last `gate`
    columns (the attention gate's logits, train.fused_qkv_gate) are left out."""
    b, t, c = qkv.shape
    kv = (c - gate - heads * head_dim) // 2
    q, k, v, _ = qkv.split((heads * head_dim, kv, kv, gate), dim=-1)
    return q.view(b, t, heads, head_dim), k.view(b, t, -1, head_dim), v.view(b, t, -1, head_dim)


# FA3's dQ accumulator (train.fa3_dq_accum): FA3's backward (sm90, head dim 64) sums dQ / softmax_scale in
# fp32 (B, H, TR * 64), TR = T rounded up to 128, in blocks of 128 rows laid out as its MMA fragments
# lie (tests/test_fa3_xsa.py derives the map from wgmma's thread pattern and checks it on FA3).
ACC_BLOCK = 128


def acc_offsets(d: int = 64) -> Tensor:
    """(128, d): where element (row, col) of a 128-row block lies in the accumulator's block."""
    if d != 64:
        raise ValueError(f"FA3's dQ accumulator layout is known for head dim 64, not {d}")
    r, c = torch.arange(ACC_BLOCK)[:, None], torch.arange(d)[None, :]
    return (4096 * (r // 64) + 128 * ((r % 64) // 16) + 16 * (r % 8) + 2 * ((r % 16) // 8)
            + 512 * (c // 8) + 4 * ((c % 8) // 2) + c % 2)


def from_accumulator(acc: Tensor, t: int) -> Tensor:
    """The (B, T, H, D) rows an accumulator (B, H, TR * D) holds, in its dtype (gathered, then transposed)."""
    b, h, _ = acc.shape
    idx = acc_offsets().flatten().to(acc.device)
    return acc.view(b, h, -1, idx.numel())[..., idx].view(b, h, -1, 64)[:, :, :t].transpose(1, 2)


def to_accumulator(g: Tensor, tr: int) -> Tensor:
    """g (B, T, H, D) laid out as the accumulator (B, H, TR * D), rows past T zero."""
    b, t, h, d = g.shape
    rows = torch.nn.functional.pad(g.transpose(1, 2), (0, 0, 0, tr - t)).reshape(b, h, -1, ACC_BLOCK * d)
    acc = torch.empty_like(rows)
    acc[..., acc_offsets(d).flatten().to(g.device)] = rows
    return acc.view(b, h, tr * d)


# qkv may come with its rows padded (inductor pads a 1,032-wide GEMM output to a 1,088 stride under
# train.fused_qkv_gate): the kernels read any token stride, so only the stride order is fixed (no copy)
ROWS_ANY_STRIDE = (torch.Tag.needs_fixed_stride_order,)


@torch.library.custom_op("lmcore::qkv_norm_rope", mutates_args=(), tags=ROWS_ANY_STRIDE)
def _qkv_norm_rope(qkv: Tensor, cos: Tensor, sin: Tensor, gain: Tensor, heads: int, head_dim: int, repeat: int,
                   repeat_v: bool, dq_acc_scale: float, vscale: Tensor | None,
                   gate: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    qkv = _even_rows(qkv)
    q, k, v = _split_qkv(qkv, heads, head_dim, gate)
    slot = _dq_slot(qkv, heads, head_dim, dq_acc_scale)  # never written: its gradient carries q's
    g_out = qkv[..., qkv.size(-1) - gate:].contiguous() if gate else qkv.new_empty(0)  # the gate's logits
    if _use_triton(q, cos.size(-1)) and _use_triton(k, cos.size(-1)):  # the kernels read the slices in place
        v_out = v.new_empty(v.shape)  # k's programs copy v's rows out beside k's (and repeated: repeat_v)
        v_rep = v.new_empty(_repeated(v, repeat) if repeat_v else 0)
        (qo, rq), (ko, rk) = _forward_triton(q, cos, sin, gain), _forward_triton(
            k, cos, sin, None, repeat, v=v, v_out=v_out, v_rep=v_rep if repeat_v else None, vscale=vscale)
        return qo, ko, v_out, v_rep, rq, rk, slot, g_out
    (qo, rq), (ko, rk) = _forward_math(q, cos, sin, gain), _forward_math(k, cos, sin, None, repeat)
    if vscale is None:
        v = v.clone(memory_format=torch.contiguous_format)
    else:  # v's rows times their token's scale, in fp32
        v = (v.float() * vscale[:, :, None, None]).to(v.dtype)
    return qo, ko, v, v.repeat_interleave(repeat, dim=2) if repeat_v else v.new_empty(0), rq, rk, slot, g_out


def _even_rows(qkv: Tensor) -> Tensor:
    """qkv if its tokens are evenly spaced rows of contiguous columns (as the kernels read it), else a copy."""
    return qkv if qkv.stride(-1) == 1 and qkv.stride(0) == qkv.size(1) * qkv.stride(1) else qkv.contiguous()


def _dq_slot(qkv: Tensor, heads: int, head_dim: int, dq_acc_scale: float) -> Tensor:
    """(B, H, TR * D) fp32 with dq_acc_scale > 0 (empty: only its gradient is used), else (0,)."""
    rows = -(-qkv.size(1) // ACC_BLOCK) * ACC_BLOCK if dq_acc_scale > 0 else 0
    return qkv.new_empty(qkv.size(0), heads, rows * head_dim, dtype=torch.float32)


def _repeated(x: Tensor, repeat: int) -> tuple[int, int, int, int]:
    b, t, h, d = x.shape
    return b, t, h * repeat, d


@_qkv_norm_rope.register_fake
def _(qkv: Tensor, cos: Tensor, sin: Tensor, gain: Tensor, heads: int, head_dim: int, repeat: int,
      repeat_v: bool, dq_acc_scale: float, vscale: Tensor | None,
      gate: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    q, k, v = _split_qkv(qkv, heads, head_dim, gate)
    b, t, hkv, f32 = k.size(0), k.size(1), k.size(2), torch.float32
    return (q.new_empty(q.shape), k.new_empty(_repeated(k, repeat)), v.new_empty(v.shape),
            v.new_empty(_repeated(v, repeat) if repeat_v else 0),
            qkv.new_empty(b, t, heads, dtype=f32), qkv.new_empty(b, t, hkv, dtype=f32),
            _dq_slot(qkv, heads, head_dim, dq_acc_scale), qkv.new_empty((b, t, gate) if gate else 0))


@torch.library.custom_op("lmcore::qkv_norm_rope_backward", mutates_args=(), tags=ROWS_ANY_STRIDE)
def _qkv_norm_rope_backward(
    gq: Tensor, gk: Tensor, gv: Tensor, gv_rep: Tensor | None, qkv: Tensor, rq: Tensor, rk: Tensor, cos: Tensor,
    sin: Tensor, gain: Tensor, heads: int, head_dim: int, repeat: int, acc_scale: float, vscale: Tensor | None,
    g_gate: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """acc_scale > 0: gq is FA3's dQ accumulator, times acc_scale (its softmax_scale). With vscale (B, T): v's
    gradient is scaled by it too, and vscale's own gradient (B, T) fp32 is the third output (else (0,)). g_gate
    (B, T, G): the gradient of the gate's logits, qkv's last G columns."""
    gate = 0 if g_gate is None else g_gate.size(-1)
    qkv = _even_rows(qkv)
    q, k, v = _split_qkv(qkv, heads, head_dim, gate)
    dvs = qkv.new_empty(v.shape[:3] if vscale is not None else 0, dtype=torch.float32)  # a partial a kv head
    if _use_triton(q, cos.size(-1)) and _use_triton(k, cos.size(-1)):  # each gradient written into its slice
        dqkv = qkv.new_empty(qkv.shape)  # contiguous, as the GEMMs take it
        dq, dk, dv = _split_qkv(dqkv, heads, head_dim, gate)
        if gate:
            dqkv[..., qkv.size(-1) - gate:] = g_gate
        if acc_scale > 0:
            dgain = _q_backward_acc_triton(gq, q, rq, cos, sin, gain, dq, acc_scale)
        else:
            _, dgain = _backward_triton(gq, q, rq, cos, sin, gain, dx=dq)
        # and v's gradient (with its copies', gv_rep), in k's programs
        _backward_triton(gk, k, rk, cos, sin, None, repeat, dx=dk, gv=gv, dv=dv, gv_rep=gv_rep, v=v, vscale=vscale,
                         dvs_part=dvs if vscale is not None else None)
        return dqkv, dgain, dvs.sum(-1) if vscale is not None else dvs
    gq = from_accumulator(gq, q.size(1)) * acc_scale if acc_scale > 0 else gq
    dq, dgain = _backward_math(gq, q, rq, cos, sin, gain)
    dk, _ = _backward_math(gk, k, rk, cos, sin, None, repeat)
    gvf = gv.float() if gv_rep is None else gv.float() + gv_rep.float().unflatten(2, (gv.size(2), repeat)).sum(3)
    if vscale is not None:  # v = scale * v's slice: each token's scale gets sum(gv * v's slice)
        dvs, gvf = (gvf * v.float()).sum((2, 3)), gvf * vscale[:, :, None, None]
    grads = (dq.flatten(2), dk.flatten(2), gvf.to(gv.dtype).flatten(2)) + ((g_gate.to(gv.dtype),) if gate else ())
    return torch.cat(grads, dim=-1), dgain, dvs


@_qkv_norm_rope_backward.register_fake
def _(
    gq: Tensor, gk: Tensor, gv: Tensor, gv_rep: Tensor | None, qkv: Tensor, rq: Tensor, rk: Tensor, cos: Tensor,
    sin: Tensor, gain: Tensor, heads: int, head_dim: int, repeat: int, acc_scale: float, vscale: Tensor | None,
    g_gate: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    dvs = qkv.new_empty(vscale.shape if vscale is not None else 0, dtype=torch.float32)
    return qkv.new_empty(qkv.shape), qkv.new_empty(gain.size(0), dtype=torch.float32), dvs


def _qkv_setup_context(ctx, inputs, output) -> None:
    qkv, cos, sin, gain, ctx.heads, ctx.head_dim, ctx.repeat, ctx.repeat_v, ctx.acc_scale, vscale, ctx.gate = inputs
    ctx.save_for_backward(qkv, output[4], output[5], cos, sin, gain, vscale)


def _qkv_backward(ctx, gq: Tensor, gk: Tensor, gv: Tensor, gv_rep: Tensor, _g_rq: Tensor, _g_rk: Tensor,
                  g_slot: Tensor, g_gate: Tensor):
    qkv, rq, rk, cos, sin, gain, vscale = ctx.saved_tensors
    if ctx.gate:  # the gate's logits' gradient (zeros where they were not used)
        g_gate = (qkv.new_zeros(*qkv.shape[:2], ctx.gate) if g_gate is None else g_gate).contiguous()
    gq = g_slot if ctx.acc_scale > 0 else gq  # the accumulator FA3's backward returned (lmcore.fa3_xsa)
    dqkv, dgain, dvs = _qkv_norm_rope_backward(gq.contiguous(), gk.contiguous(), gv.contiguous(),
                                               gv_rep.contiguous() if ctx.repeat_v else None, qkv, rq, rk, cos, sin,
                                               gain, ctx.heads, ctx.head_dim, ctx.repeat, ctx.acc_scale, vscale,
                                               g_gate if ctx.gate else None)
    return dqkv, None, None, dgain.to(gain.dtype), None, None, None, None, None, None if vscale is None else dvs, None


_qkv_norm_rope.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


def qkv_norm_rope(
    qkv: Tensor, cos: Tensor, sin: Tensor, gain: Tensor, heads: int, head_dim: int, repeat: int = 1,
    repeat_v: bool = False, dq_acc_scale: float = 0.0, vscale: Tensor | None = None, gate: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(q, k, v, v repeated, dq slot, gate logits) from qkv (B, T, (H + 2 Hkv) D), the output of one GEMM on c_q,
    c_k and c_v's weights concatenated: q = qk_norm_rope(q's slice, gain), k = qk_norm_rope(k's slice,
    None, repeat), v its slice (B, T, Hkv, D), contiguous, and with `repeat_v` v's heads `repeat`
    times in a row (as k's; else None). The kernels read q's and k's slices where they lie, and the
    backward writes the three gradients (v's: its own plus its copies') into one (B, T, (H + 2 Hkv) D)
    tensor, the input of the one GEMM that gives the input's gradient.

    dq_acc_scale > 0 (train.fa3_dq_accum): the dq slot is a (B, H, TR * D) fp32 tensor, never
    written, for lmcore.fa3_xsa.attention_xsa, whose backward gives q's gradient as the slot's: FA3's
    dQ accumulator (acc_offsets' layout), which q's backward kernel reads times dq_acc_scale (the
    attention's softmax_scale) instead of a bf16 dq. Else None.

    vscale (B, T) (train.fold_attn_norm): v (and its copies) times its token's scale, in fp32; its
    gradient is returned for vscale, each token's sum of v's gradient times v's slice.

    gate > 0 (train.fused_qkv_gate): qkv has `gate` more columns, the attention gate's logits from the same
    GEMM, returned (B, T, gate) contiguous; their gradient goes back into those columns. Else None."""
    vs = None if vscale is None else vscale.float().contiguous()  # qkv as given: _even_rows copies if it must
    q, k, v, v_rep, _, _, slot, g = _qkv_norm_rope(qkv, cos.float().contiguous(), sin.float().contiguous(),
                                                   gain, heads, head_dim, repeat, repeat_v, float(dq_acc_scale), vs,
                                                   gate)
    return q, k, v, v_rep if repeat_v else None, slot if dq_acc_scale > 0 else None, g if gate else None
