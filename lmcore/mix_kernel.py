"""A block's input and its q/k/v GEMM as one autograd op (train.fused_resid_mix), whose backward sums the
residual mix's gradient in the pass that writes its inputs' gradients.

`resid_mix_qkv(x, x0, mix, w, factor)` -> (x_in, r, qkv): x_in = mix[0] x + mix[1] x0 (mix rounded to x's
dtype, as Block's plain path), r = rms_scale(x_in, factor) a row (fp32) and qkv = x_in W^T: the inputs of
the q/k/v op on GPT.fold_attn_norm's path. The forward is PyTorch, which inductor fuses with the residual
adds before it as it does the plain path's.

Why the backward is a kernel: on the plain path inductor writes x_in's gradient g (the residual's, plus
the GEMM's, plus the row scale's term), then sums g x and g x0 over the tokens for resid_mix's gradient in
reduction kernels that read g, x and x0 again: 10.7 ms of a 1-GPU `record` step (benchmarks/RESULTS.md,
session 37). Here the GEMMs' gradients stay cuBLAS's, and one Triton kernel reads the residual's gradient,
the GEMM's, the row scale's, x and x0 once a token, writes dx = mix[0] g and dx0 = mix[1] g, and keeps its
program's column sums of g x and g x0 (fp32); a sum over the programs finishes them.

Numerics (within bf16 rounding of the plain path): g stays fp32 in the kernel and is rounded only in dx
and dx0 (the plain path stores g in bf16 once between); x_in in the row scale's term is recomputed from x
and x0, rounded to x's dtype as the forward's; the column sums are fp32 in another order, then rounded to
x's dtype as the plain path's gradient of mix.to(x.dtype) is.

lmcore::resid_mix_backward is a torch.library custom op with a fake kernel; its CPU kernel is PyTorch
(`_backward_math`), which tests check against autograd of the plain formula; the Triton kernel runs on CUDA
for a power-of-two width up to MAX_D and is checked against the PyTorch one (tests marked cuda). Imported
only by GPT.use_fused_resid_mix, so the exported script embeds it only with the switch on (lmcore.export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmcore.layers import as_dtype, rms_scale
from lmcore.runtime import sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the PyTorch math serves every device
    triton = None

MAX_D = 4096  # the widest row a program holds in registers
ROWS = 16  # rows a program takes at a time
WARPS = 8
PROGRAMS_PER_SM = 8  # programs a streaming multiprocessor: each loops over row blocks, keeping column sums


def _backward_math(g_in: Tensor, g_mm: Tensor, g_r: Tensor, r: Tensor, x: Tensor, x0: Tensor, mix: Tensor,
                   coef: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dx0) in x's dtype and dmix (2, D) fp32 for rows (N, D): g = g_in + g_mm + g_r coef r^3 x_in in fp32,
    with x_in = mix[0] x + mix[1] x0 rounded to x's dtype; dx = mix[0] g, dx0 = mix[1] g, dmix = the column
    sums of g x and g x0. coef = -1 / (factor^2 D): r's derivative along x_in is coef r^3 x_in."""
    m = mix.to(x.dtype).float()
    xf, x0f = x.float(), x0.float()
    x_in = (m[0] * xf + m[1] * x0f).to(x.dtype).float()
    g = g_in.float() + g_mm.float() + (g_r.float() * coef * r.float().pow(3))[:, None] * x_in
    dmix = torch.stack(((g * xf).sum(0), (g * x0f).sum(0)))
    return (m[0] * g).to(x.dtype), (m[1] * g).to(x.dtype), dmix


if triton is not None:

    @triton.jit
    def _mix_bwd_kernel(gin_ptr, gmm_ptr, gr_ptr, r_ptr, x_ptr, x0_ptr, mix_ptr, dx_ptr, dx0_ptr, part_ptr, n_rows,
                        coef, D: tl.constexpr, R: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0) * R
        cols = tl.arange(0, D)
        dt = x_ptr.dtype.element_ty
        m0 = tl.load(mix_ptr + cols).to(dt).to(tl.float32)[None, :]
        m1 = tl.load(mix_ptr + D + cols).to(dt).to(tl.float32)[None, :]
        s0 = tl.zeros([D], dtype=tl.float32)
        s1 = tl.zeros([D], dtype=tl.float32)
        for start in tl.range(pid * R, n_rows, step):
            rows = start + tl.arange(0, R)
            live = rows < n_rows
            offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
            x = tl.load(x_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
            x0 = tl.load(x0_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
            x_in = (m0 * x + m1 * x0).to(dt).to(tl.float32)
            r = tl.load(r_ptr + rows, mask=live, other=0.0)
            gr = tl.load(gr_ptr + rows, mask=live, other=0.0)
            g = tl.load(gin_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
            g += tl.load(gmm_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
            g += (gr * coef * r * r * r)[:, None] * x_in
            tl.store(dx_ptr + offs, (m0 * g).to(dx_ptr.dtype.element_ty), mask=live[:, None])
            tl.store(dx0_ptr + offs, (m1 * g).to(dx0_ptr.dtype.element_ty), mask=live[:, None])
            s0 += tl.sum(g * x, axis=0)
            s1 += tl.sum(g * x0, axis=0)
        tl.store(part_ptr + pid * 2 * D + cols, s0)
        tl.store(part_ptr + pid * 2 * D + D + cols, s1)


def _use_triton(x: Tensor) -> bool:
    """Triton for CUDA rows whose width is a power of two (tl.arange's sizes) up to MAX_D."""
    d = x.size(-1)
    return triton is not None and x.is_cuda and d & (d - 1) == 0 and d <= MAX_D


def _backward_triton(g_in: Tensor, g_mm: Tensor, g_r: Tensor, r: Tensor, x: Tensor, x0: Tensor, mix: Tensor,
                     coef: float, rows: int = ROWS, warps: int = WARPS,
                     programs: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel: _backward_math's (dx, dx0, dmix); `rows` a program at a time at `warps` warps, at most
    `programs` programs (None: PROGRAMS_PER_SM a multiprocessor)."""
    n, d = x.shape
    if programs is None:
        programs = PROGRAMS_PER_SM * sm_count(x.device)
    programs = max(1, min(triton.cdiv(n, rows), programs))
    dx, dx0 = torch.empty_like(x), torch.empty_like(x)
    part = torch.empty(programs, 2, d, dtype=torch.float32, device=x.device)
    _mix_bwd_kernel[(programs,)](g_in, g_mm, g_r, r, x, x0, mix, dx, dx0, part, n, coef, D=d, R=rows,
                                 num_warps=warps)
    return dx, dx0, part.sum(0)


@torch.library.custom_op("lmcore::resid_mix_backward", mutates_args=())
def _resid_mix_backward(g_in: Tensor, g_mm: Tensor, g_r: Tensor, r: Tensor, x: Tensor, x0: Tensor, mix: Tensor,
                        coef: float) -> tuple[Tensor, Tensor, Tensor]:
    if _use_triton(x):
        return _backward_triton(g_in, g_mm, g_r, r, x, x0, mix, coef)
    return _backward_math(g_in, g_mm, g_r, r, x, x0, mix, coef)


@_resid_mix_backward.register_fake
def _(g_in: Tensor, g_mm: Tensor, g_r: Tensor, r: Tensor, x: Tensor, x0: Tensor, mix: Tensor,
      coef: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(2, x.size(-1), dtype=torch.float32)


class _ResidMixQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, x0: Tensor | None, mix: Tensor, w: Tensor, factor: float):
        """x0 None: x0 is x itself (the first block; dynamo traces no tensor given twice)."""
        # as_dtype, not .to: no second name for an output or an input (torch 2.11's dynamo loses x_in's gradient)
        m = as_dtype(mix, x.dtype)
        x_in = m[0] * x + m[1] * (x if x0 is None else x0)
        r = rms_scale(x_in, factor)
        # the GEMM in autocast's dtype where it is on, as F.linear's would be; its operands saved in that dtype, so
        # that the backward's GEMMs do not depend on the autocast state they are traced or run under
        on = torch.is_autocast_enabled(x.device.type)
        dt = torch.get_autocast_dtype(x.device.type) if on else x_in.dtype
        xa, wa = as_dtype(x_in, dt), as_dtype(w, dt)
        qkv = F.linear(xa, wa)
        ctx.save_for_backward(x, x0, mix, wa, xa, r)
        ctx.coef, ctx.w_dtype = -1.0 / (factor * factor * x.size(-1)), w.dtype
        return x_in, r, qkv

    @staticmethod
    def backward(ctx, g_in: Tensor, g_r: Tensor, g_qkv: Tensor):
        x, x0, mix, wa, xa, r = ctx.saved_tensors
        d = x.size(-1)
        g2 = g_qkv.reshape(-1, g_qkv.size(-1)).to(wa.dtype)
        dw = (g2.t() @ xa.reshape(-1, d)).to(ctx.w_dtype)
        g_mm = g2 @ wa
        rows = x.reshape(-1, d).contiguous()
        dx, dx0, dmix = _resid_mix_backward(g_in.reshape(-1, d).contiguous(), g_mm, g_r.reshape(-1).contiguous(),
                                            r.reshape(-1).contiguous(), rows,
                                            rows if x0 is None else x0.reshape(-1, d).contiguous(), mix.contiguous(),
                                            ctx.coef)
        dx, dx0 = dx.view_as(x), dx0.view_as(x)
        # mix's gradient through mix.to(x.dtype), as autograd gives the plain path's
        return dx + dx0 if x0 is None else dx, None if x0 is None else dx0, dmix.to(x.dtype).to(mix.dtype), dw, None


def resid_mix_qkv(x: Tensor, x0: Tensor, mix: Tensor, w: Tensor, factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x_in, r, qkv) for x, x0 (B, T, D), mix (2, D) and the q/k/v weight w (O, D) in x's dtype: x_in = mix[0] x +
    mix[1] x0 with mix rounded to x's dtype, r = rms_scale(x_in, factor) (B, T) fp32, qkv = x_in W^T (B, T, O); the
    backward as the module docstring says."""
    if x.shape != x0.shape or mix.shape != (2, x.size(-1)) or w.size(-1) != x.size(-1):
        raise ValueError(f"resid_mix_qkv: x {tuple(x.shape)}, x0 {tuple(x0.shape)}, mix {tuple(mix.shape)}, "
                         f"w {tuple(w.shape)}: expected x0 as x, mix (2, D), w (O, D)")
    return _ResidMixQKV.apply(x, None if x0 is x else x0, mix, w, float(factor))
