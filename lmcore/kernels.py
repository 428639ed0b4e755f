"""Fused kernels for the training step (train.fused_qk_norm_rope), each as one custom op whose
CPU kernel is the same math written out in PyTorch and whose CUDA kernel is Triton.

`qk_norm_rope(x, cos, sin, gain)`: attention's q (or k) path in one pass over x (B, T, H, D):
RMSNorm over D, RoPE on the first 2 * cos.size(-1) dims of each head, times a per-head gain
(None: 1, for k). The model's plain path composes rms_norm, apply_rope and the gain; inductor
compiles that into kernels 2-4x slower than HBM bandwidth (session 6's profile: 107 + 198 us a
call for q at `record`'s micro-batch, forward + backward). Here the forward reads x once and
writes the output and the per-row 1/rms; the backward reads the output's gradient and x once,
writes x's gradient, and sums the gain's gradient per head from per-block partial sums (no
atomics: the same result every run).

Both are torch.library custom ops (lmcore::qk_norm_rope, lmcore::qk_norm_rope_backward) with
fake kernels, so torch.compile keeps them in its whole graph as calls. The CPU kernels
(`_forward_math`, `_backward_math`) are what tests check against autograd of the plain
composition; the Triton kernels are checked against them on GPU (tests marked cuda). Without
Triton, CUDA tensors run the PyTorch math. Imported only by GPT.use_fused_qk_norm_rope: the
exported single-file script does not embed this module (it may not import triton).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmcore.model import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the PyTorch math serves every device
    triton = None

EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for the fp32 math it runs under autocast
TILE = 2048  # elements of x per Triton program: 2048 // D rows, each one head of one token
WARPS = 8


def _forward_math(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out in x.dtype, rstd (B, T, H) fp32): out = gain * rope(x * rstd), in fp32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1) + EPS)
    out = apply_rope(xf * rstd[..., None], cos.float(), sin.float())
    if gain is not None:
        out = out * gain.float()[None, None, :, None]
    return out.to(x.dtype), rstd


def _backward_math(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> tuple[Tensor, Tensor]:
    """(dx in x.dtype, dgain (H,) fp32, or (0,) without a gain) for out = gain * rope(n),
    n = x * rstd: with u = rope^T(g) (RoPE's transpose is the rotation by -sin) and
    t = sum(u * n) per row, dgain = sum of t over each head's rows, dn = gain * u and
    dx = rstd * (dn - n * mean(dn * n)) (RMSNorm's backward)."""
    gf, cos, sin = g.float(), cos.float(), sin.float()
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
    def _tile(ptr, rows, mask, D: tl.constexpr, HALF: tl.constexpr):
        """A (R, D) tile of heads and its partner tile (rotated halves swapped; 0 elsewhere), fp32."""
        cols = tl.arange(0, D)[None, :]
        base = ptr + rows[:, None] * D
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
    def _qk_fwd_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, rstd_ptr, n_rows, eps,
                       T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr,
                       HAS_GAIN: tl.constexpr):
        rows = tl.program_id(0) * R + tl.arange(0, R)
        live = rows < n_rows
        mask = live[:, None]
        x, xp = _tile(x_ptr, rows, mask, D, HALF)
        c, s = _rope_cs(cos_ptr, sin_ptr, rows, mask, T, H, D, HALF)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (R,)
        scale = rstd
        if HAS_GAIN:
            scale = scale * tl.load(gain_ptr + rows % H, mask=live, other=0.0).to(tl.float32)
        out = (x * c + xp * s) * scale[:, None]
        tl.store(out_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=live)

    @triton.jit
    def _qk_bwd_kernel(g_ptr, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, dgain_part_ptr, n_rows,
                       T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr,
                       HAS_GAIN: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * R + tl.arange(0, R)
        live = rows < n_rows
        mask = live[:, None]
        g, gp = _tile(g_ptr, rows, mask, D, HALF)
        x = tl.load(x_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], mask=mask, other=0.0).to(tl.float32)
        c, s = _rope_cs(cos_ptr, sin_ptr, rows, mask, T, H, D, HALF)
        r = tl.load(rstd_ptr + rows, mask=live, other=0.0)  # (R,)
        u = g * c - gp * s  # rope^T(g)
        t = tl.sum(u * x, axis=1) * r  # sum(u * n) a row
        scale = r
        if HAS_GAIN:  # the gain's gradient: t summed over each head's rows, one partial a program
            tl.store(dgain_part_ptr + pid * H + tl.arange(0, H), tl.sum(tl.reshape(t, (R // H, H)), axis=0))
            scale = scale * tl.load(gain_ptr + rows % H, mask=live, other=0.0).to(tl.float32)
        dx = scale[:, None] * (u - x * (r * t / D)[:, None])
        tl.store(dx_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


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


def _forward_triton(
    x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, rows: int | None = None, warps: int = WARPS
) -> tuple[Tensor, Tensor]:
    """The forward kernel; `rows` a program (a multiple of H; default TILE // D) and `warps`
    are the tile choice (benchmarks/qk_kernel_bench.py compares a few)."""
    b, t, h, d = x.shape
    out = torch.empty_like(x)
    rstd = torch.empty((b, t, h), dtype=torch.float32, device=x.device)
    n_rows, rows = b * t * h, rows or _rows(x)
    _qk_fwd_kernel[(triton.cdiv(n_rows, rows),)](x, cos, sin, x if gain is None else gain, out, rstd, n_rows, EPS,
                                                 T=t, H=h, D=d, HALF=cos.size(-1), R=rows, HAS_GAIN=gain is not None,
                                                 num_warps=warps)
    return out, rstd


def _backward_triton(
    g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None,
    rows: int | None = None, warps: int = WARPS,
) -> tuple[Tensor, Tensor]:
    b, t, h, d = x.shape
    n_rows, rows = b * t * h, rows or _rows(x)
    blocks = triton.cdiv(n_rows, rows)
    dx = torch.empty_like(x)
    part = torch.empty((blocks if gain is not None else 0, h), dtype=torch.float32, device=x.device)
    _qk_bwd_kernel[(blocks,)](g, x, rstd, cos, sin, x if gain is None else gain, dx, part, n_rows,
                              T=t, H=h, D=d, HALF=cos.size(-1), R=rows, HAS_GAIN=gain is not None, num_warps=warps)
    return dx, part.sum(0) if gain is not None else part.new_empty(0)


@torch.library.custom_op("lmcore::qk_norm_rope", mutates_args=())
def _qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> tuple[Tensor, Tensor]:
    if _use_triton(x, cos.size(-1)):
        return _forward_triton(x, cos, sin, gain)
    return _forward_math(x, cos, sin, gain)


@_qk_norm_rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lmcore::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(
    g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None
) -> tuple[Tensor, Tensor]:
    if _use_triton(x, cos.size(-1)):
        return _backward_triton(g, x, rstd, cos, sin, gain)
    return _backward_math(g, x, rstd, cos, sin, gain)


@_qk_norm_rope_backward.register_fake
def _(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(0 if gain is None else gain.size(0), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, cos, sin, gain = inputs
    ctx.save_for_backward(x, output[1], cos, sin, gain)


def _backward(ctx, g: Tensor, _g_rstd: Tensor):
    x, rstd, cos, sin, gain = ctx.saved_tensors
    dx, dgain = _qk_norm_rope_backward(g.contiguous(), x, rstd, cos, sin, gain)
    return dx, None, None, None if gain is None else dgain.to(gain.dtype)


_qk_norm_rope.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> Tensor:
    """gain * rope(rms_norm(x)) for x (B, T, H, D) with cos/sin (T, half), gain (H,) or None
    (k: no gain, and no gain gradient to compute); in fp32, returned in x's dtype (the same
    math as the model's plain path)."""
    out, _ = _qk_norm_rope(x.contiguous(), cos.float().contiguous(), sin.float().contiguous(), gain)
    return out
