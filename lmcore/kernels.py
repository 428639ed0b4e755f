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
# 8 warps: for sm_90 ptxas gives 59 (forward) and 79 (backward) registers a thread at record's
# shapes, no spills, 32 and 24 resident warps an SM (4 warps: 96 and 157 registers, 20 and 12)
WARPS = 8


def _forward_math(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """(out in x.dtype, rstd (B, T, H) fp32): out = gain * rope(x * rstd), in fp32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1) + EPS)
    out = apply_rope(xf * rstd[..., None], cos.float(), sin.float()) * gain.float()[None, None, :, None]
    return out.to(x.dtype), rstd


def _backward_math(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """(dx in x.dtype, dgain (H,) fp32) for out = gain * rope(n), n = x * rstd:
    dn = gain * rope^T(g) (RoPE's transpose is the rotation by -sin), dgain = sum g * rope(n)
    per head, dx = rstd * (dn - n * mean(dn * n)) (RMSNorm's backward)."""
    gf, cos, sin = g.float(), cos.float(), sin.float()
    n = x.float() * rstd[..., None]
    dn = gain.float()[None, None, :, None] * apply_rope(gf, cos, -sin)
    dgain = (gf * apply_rope(n, cos, sin)).sum(dim=(0, 1, 3))
    dx = rstd[..., None] * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx.to(x.dtype), dgain


if triton is not None:

    @triton.jit
    def _row_tiles(ptr, rows, mask, D: tl.constexpr, HALF: tl.constexpr):
        """A (R, D) tile of heads and its two rotated halves (R, HALF), each a contiguous load."""
        base = rows[:, None] * D
        full = tl.load(ptr + base + tl.arange(0, D)[None, :], mask=mask, other=0.0).to(tl.float32)
        first = tl.load(ptr + base + tl.arange(0, HALF)[None, :], mask=mask, other=0.0).to(tl.float32)
        second = tl.load(ptr + base + HALF + tl.arange(0, HALF)[None, :], mask=mask, other=0.0).to(tl.float32)
        return full, first, second

    @triton.jit
    def _store_tiles(ptr, rows, mask, full, first, second, D: tl.constexpr, HALF: tl.constexpr):
        """Store a head tile: the rotated halves at [0, 2 HALF), the rest of `full` after them."""
        base = rows[:, None] * D
        cols = tl.arange(0, D)[None, :]
        ty = ptr.dtype.element_ty
        tl.store(ptr + base + cols, full.to(ty), mask=mask & (cols >= 2 * HALF))
        tl.store(ptr + base + tl.arange(0, HALF)[None, :], first.to(ty), mask=mask)
        tl.store(ptr + base + HALF + tl.arange(0, HALF)[None, :], second.to(ty), mask=mask)

    @triton.jit
    def _qk_fwd_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, rstd_ptr, n_rows, eps,
                       T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr):
        # R rows (one head of one token each, row = token * H + head) per program
        rows = tl.program_id(0) * R + tl.arange(0, R)
        live = rows < n_rows
        mask = live[:, None]
        x, x1, x2 = _row_tiles(x_ptr, rows, mask, D, HALF)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (R,)
        tab = ((rows // H) % T)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        c = tl.load(cos_ptr + tab, mask=mask, other=1.0)
        s = tl.load(sin_ptr + tab, mask=mask, other=0.0)
        scale = (rstd * tl.load(gain_ptr + rows % H, mask=live, other=0.0).to(tl.float32))[:, None]
        _store_tiles(out_ptr, rows, mask, x * scale, (x1 * c + x2 * s) * scale, (x2 * c - x1 * s) * scale, D, HALF)
        tl.store(rstd_ptr + rows, rstd, mask=live)

    @triton.jit
    def _qk_bwd_kernel(g_ptr, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, dgain_part_ptr, n_rows,
                       T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * R + tl.arange(0, R)
        live = rows < n_rows
        mask = live[:, None]
        g, g1, g2 = _row_tiles(g_ptr, rows, mask, D, HALF)
        x, x1, x2 = _row_tiles(x_ptr, rows, mask, D, HALF)
        rest = (tl.arange(0, D) >= 2 * HALF)[None, :]
        rv = tl.load(rstd_ptr + rows, mask=live, other=0.0)  # (R,)
        r = rv[:, None]
        tab = ((rows // H) % T)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        c = tl.load(cos_ptr + tab, mask=mask, other=1.0)
        s = tl.load(sin_ptr + tab, mask=mask, other=0.0)
        gain = tl.load(gain_ptr + rows % H, mask=live, other=0.0).to(tl.float32)[:, None]
        # the gain's gradient: sum of g * rope(n) over each head's rows
        gr = tl.sum(tl.where(rest, g * x, 0.0), axis=1) + tl.sum(g1 * (x1 * c + x2 * s) + g2 * (x2 * c - x1 * s), axis=1)
        tl.store(dgain_part_ptr + pid * H + tl.arange(0, H), tl.sum(tl.reshape(gr * rv, (R // H, H)), axis=0))
        # dn = gain * rope^T(g); dx = rstd * (dn - n * mean(dn * n)), n = x * rstd
        dn, dn1, dn2 = gain * g, gain * (g1 * c - g2 * s), gain * (g2 * c + g1 * s)
        dot = (tl.sum(tl.where(rest, dn * x, 0.0), axis=1) + tl.sum(dn1 * x1 + dn2 * x2, axis=1))[:, None] * r / D
        _store_tiles(dx_ptr, rows, mask, r * (dn - x * r * dot), r * (dn1 - x1 * r * dot), r * (dn2 - x2 * r * dot), D, HALF)


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


def _forward_triton(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    b, t, h, d = x.shape
    out = torch.empty_like(x)
    rstd = torch.empty((b, t, h), dtype=torch.float32, device=x.device)
    n_rows, rows = b * t * h, _rows(x)
    _qk_fwd_kernel[(triton.cdiv(n_rows, rows),)](x, cos, sin, gain, out, rstd, n_rows, EPS,
                                                 T=t, H=h, D=d, HALF=cos.size(-1), R=rows, num_warps=WARPS)
    return out, rstd


def _backward_triton(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    b, t, h, d = x.shape
    n_rows, rows = b * t * h, _rows(x)
    blocks = triton.cdiv(n_rows, rows)
    dx = torch.empty_like(x)
    part = torch.empty((blocks, h), dtype=torch.float32, device=x.device)
    _qk_bwd_kernel[(blocks,)](g, x, rstd, cos, sin, gain, dx, part, n_rows,
                              T=t, H=h, D=d, HALF=cos.size(-1), R=rows, num_warps=WARPS)
    return dx, part.sum(0)


@torch.library.custom_op("lmcore::qk_norm_rope", mutates_args=())
def _qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    if _use_triton(x, cos.size(-1)):
        return _forward_triton(x, cos, sin, gain)
    return _forward_math(x, cos, sin, gain)


@_qk_norm_rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lmcore::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    if _use_triton(x, cos.size(-1)):
        return _backward_triton(g, x, rstd, cos, sin, gain)
    return _backward_math(g, x, rstd, cos, sin, gain)


@_qk_norm_rope_backward.register_fake
def _(g: Tensor, x: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), gain.new_empty(gain.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, cos, sin, gain = inputs
    ctx.save_for_backward(x, output[1], cos, sin, gain)


def _backward(ctx, g: Tensor, _g_rstd: Tensor):
    x, rstd, cos, sin, gain = ctx.saved_tensors
    dx, dgain = _qk_norm_rope_backward(g.contiguous(), x, rstd, cos, sin, gain)
    return dx, None, None, dgain.to(gain.dtype)


_qk_norm_rope.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> Tensor:
    """gain * rope(rms_norm(x)) for x (B, T, H, D) with cos/sin (T, half), gain (H,) or None;
    computed in fp32, returned in x's dtype (the same math as the model's plain path)."""
    if gain is None:
        gain = torch.ones(x.size(2), dtype=torch.float32, device=x.device)
    out, _ = _qk_norm_rope(x.contiguous(), cos.float().contiguous(), sin.float().contiguous(), gain)
    return out
