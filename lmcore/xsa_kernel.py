"""XSA + the attention gate as one op (train.fused_xsa_gate), whose CPU kernel is the same math
written out in PyTorch and whose CUDA kernel is Triton.

`xsa_gate(y, v, z)`: XSA (each query head's attention output less its component along its kv
head's unit value vector) then the attention gate (times sigmoid of the gate's logits; None:
no gate), one pass each way: the forward reads y and v and writes the output; the backward
reads the output's gradient, y and v and writes their gradients and the logits'. With ROWSUM
the backward also writes rowsum(dy * y) a query head for FA3's backward (lmcore.fa3_xsa).

lmcore::xsa_gate and lmcore::xsa_gate_backward are torch.library custom ops with fake kernels,
so torch.compile keeps them in its whole graph as calls. The CPU kernels (`_xsa_forward_math`,
`_xsa_backward_math`) are what tests check against autograd of the plain composition; the
Triton kernels are checked against them on GPU (tests marked cuda). Without Triton, CUDA tensors
run the PyTorch math. Imported only by GPT.use_fused_xsa_gate and lmcore.fa3_xsa: the exported
single-file script embeds this module only for a config with the switch on (lmcore.export).
Moved out of lmcore.kernels in session 28, unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the PyTorch math serves every device
    triton = None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


NORM_EPS = 1e-12  # F.normalize's default


def _xsa_forward_math(y: Tensor, v: Tensor, z: Tensor | None) -> Tensor:
    """out = sigmoid(z) * (y - (y . vn) vn) per query head, vn = v / max(|v|, eps) of its kv
    head (y (B, T, H, D), v (B, T, Hkv, D), z (B, T, H) or None: no gate); fp32 math, y's dtype."""
    b, t, h, d = y.shape
    yf = y.float().view(b, t, v.size(2), -1, d)
    vn = torch.nn.functional.normalize(v.float(), dim=-1, eps=NORM_EPS).unsqueeze(-2)
    p = yf - (yf * vn).sum(-1, keepdim=True) * vn
    if z is not None:
        p = p * torch.sigmoid(z.float()).view(*yf.shape[:-1], 1)
    return p.view(b, t, h, d).to(y.dtype)


def _xsa_backward_math(dout: Tensor, y: Tensor, v: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dv, dz; dz is (0,) without a gate) for out = s * P y, P = 1 - vn vn^T, s = sigmoid(z):
    with gp = s * dout, dy = P gp; dz = (dout . P y) s (1 - s); dvn = -sum over the kv head's
    query heads of (y . vn) gp + (gp . vn) y; dv = (dvn - vn (vn . dvn)) / |v| (dvn / eps where
    |v| <= eps: F.normalize's clamp)."""
    b, t, h, d = y.shape
    shape = (b, t, v.size(2), -1, d)
    yf, gf, vf = y.float().view(shape), dout.float().view(shape), v.float()
    norm = vf.norm(dim=-1, keepdim=True)
    vn = (vf / norm.clamp_min(NORM_EPS)).unsqueeze(-2)
    yv = (yf * vn).sum(-1, keepdim=True)
    if z is None:
        s, dz = None, y.new_empty(0)
    else:
        s = torch.sigmoid(z.float()).view(*shape[:-1], 1)
        dz = ((gf * (yf - yv * vn)).sum(-1, keepdim=True) * s * (1 - s)).view(z.shape).to(z.dtype)
        gf = gf * s
    gv = (gf * vn).sum(-1, keepdim=True)
    dy = gf - gv * vn
    dvn = -(yv * gf + gv * yf).sum(-2)
    vn = vn.squeeze(-2)
    dv = torch.where(norm > NORM_EPS, (dvn - vn * (vn * dvn).sum(-1, keepdim=True)) / norm, dvn / NORM_EPS)
    return dy.view(b, t, h, d).to(y.dtype), dv.to(v.dtype), dz


if triton is not None:

    @triton.jit
    def _xsa_tiles(y_ptr, v_ptr, rows, live, G: tl.constexpr, D: tl.constexpr):
        """For R rows (one kv head of one token each): offsets of the (R, G, D) tile of its
        query heads, their mask, v's (R, D) tile in fp32 and its norm (R,)."""
        cols = tl.arange(0, D)
        ytile = rows[:, None, None] * (G * D) + tl.arange(0, G)[None, :, None] * D + cols[None, None, :]
        ymask = live[:, None, None]
        v = tl.load(v_ptr + rows[:, None] * D + cols[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        return ytile, ymask, v, tl.sqrt(tl.sum(v * v, axis=1))

    @triton.jit
    def _xsa_fwd_kernel(y_ptr, v_ptr, z_ptr, out_ptr, n_rows, eps,
                        G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, HAS_GATE: tl.constexpr):
        rows = tl.program_id(0) * R + tl.arange(0, R)
        live = rows < n_rows
        ytile, ymask, v, norm = _xsa_tiles(y_ptr, v_ptr, rows, live, G, D)
        vn = (v / tl.maximum(norm, eps)[:, None])[:, None, :]  # (R, 1, D)
        y = tl.load(y_ptr + ytile, mask=ymask, other=0.0).to(tl.float32)
        p = y - tl.sum(y * vn, axis=2)[:, :, None] * vn
        if HAS_GATE:
            z = tl.load(z_ptr + rows[:, None] * G + tl.arange(0, G)[None, :], mask=live[:, None], other=0.0)
            p = p * tl.sigmoid(z.to(tl.float32))[:, :, None]
        tl.store(out_ptr + ytile, p.to(out_ptr.dtype.element_ty), mask=ymask)

    @triton.jit
    def _xsa_bwd_kernel(g_ptr, y_ptr, v_ptr, z_ptr, dy_ptr, dv_ptr, dz_ptr, ds_ptr, n_rows, eps, T, TR, HKV,
                        G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, HAS_GATE: tl.constexpr,
                        ROWSUM: tl.constexpr):
        rows = tl.program_id(0) * R + tl.arange(0, R)
        live = rows < n_rows
        ytile, ymask, v, norm = _xsa_tiles(y_ptr, v_ptr, rows, live, G, D)
        inv = 1.0 / tl.maximum(norm, eps)
        vn = v * inv[:, None]
        vn3 = vn[:, None, :]
        y = tl.load(y_ptr + ytile, mask=ymask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + ytile, mask=ymask, other=0.0).to(tl.float32)
        yv = tl.sum(y * vn3, axis=2)[:, :, None]  # (R, G, 1)
        if HAS_GATE:
            zoff = rows[:, None] * G + tl.arange(0, G)[None, :]
            s = tl.sigmoid(tl.load(z_ptr + zoff, mask=live[:, None], other=0.0).to(tl.float32))
            dz = tl.sum(g * (y - yv * vn3), axis=2) * s * (1.0 - s)
            tl.store(dz_ptr + zoff, dz.to(dz_ptr.dtype.element_ty), mask=live[:, None])
            g = g * s[:, :, None]
        gv = tl.sum(g * vn3, axis=2)[:, :, None]
        dy = (g - gv * vn3).to(dy_ptr.dtype.element_ty)
        tl.store(dy_ptr + ytile, dy, mask=ymask)
        if ROWSUM:  # rowsum(dy * y) a query head into FA3's softmax_d (B, H, TR) (lmcore.fa3_xsa)
            tok, hk = rows // HKV, rows % HKV
            ds = (tok // T * (HKV * G) + hk * G)[:, None] + tl.arange(0, G)[None, :]
            tl.store(ds_ptr + ds * TR + (tok % T)[:, None], tl.sum(dy.to(tl.float32) * y, axis=2), mask=live[:, None])
        dvn = -tl.sum(yv * g + gv * y, axis=1)  # (R, D)
        dv = tl.where((norm > eps)[:, None], (dvn - vn * tl.sum(vn * dvn, axis=1)[:, None]) * inv[:, None], dvn * inv[:, None])
        tl.store(dv_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], dv.to(dv_ptr.dtype.element_ty), mask=live[:, None])


XSA_TILE = 2048  # elements of y per Triton program: XSA_TILE // (G * D) rows (kv heads of one token)
# 4 warps, measured (benchmarks/xsa_kernel_bench.py, H200, session 8) at record's shapes (G 2,
# D 64: 16 rows): forward 61 us, backward 99 us a layer call; at 8 warps, which sm_90 ptxas gives
# fewer registers (30/40 against 40/80) and one barrier against 11, the backward took 290 us
XSA_WARPS = 4


def _xsa_use_triton(y: Tensor, v: Tensor) -> bool:
    """Triton for CUDA tensors whose head dim and query heads a kv head are powers of two."""
    g, d = y.size(2) // v.size(2), y.size(3)
    return triton is not None and y.is_cuda and _pow2(g) and _pow2(d) and g * d <= XSA_TILE


def _xsa_forward_triton(y: Tensor, v: Tensor, z: Tensor | None, rows: int | None = None, warps: int = XSA_WARPS) -> Tensor:
    """The forward kernel; `rows` a program (default XSA_TILE // (G * D)) and `warps` are the tile choice."""
    b, t, hkv, d = v.shape
    g = y.size(2) // hkv
    out = torch.empty_like(y)
    n_rows, rows = b * t * hkv, rows or XSA_TILE // (g * d)
    _xsa_fwd_kernel[(triton.cdiv(n_rows, rows),)](y, v, y if z is None else z, out, n_rows, NORM_EPS,
                                                  G=g, D=d, R=rows, HAS_GATE=z is not None, num_warps=warps)
    return out


def _xsa_backward_triton(
    dout: Tensor, y: Tensor, v: Tensor, z: Tensor | None, rows: int | None = None, warps: int = XSA_WARPS,
    rowsum: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernel; with `rowsum` ((B, H, TR) fp32, TR >= T) it also writes rowsum(dy * y) there."""
    b, t, hkv, d = v.shape
    g = y.size(2) // hkv
    dy, dv = torch.empty_like(y), torch.empty_like(v)
    dz = y.new_empty(0) if z is None else torch.empty_like(z)
    n_rows, rows = b * t * hkv, rows or XSA_TILE // (g * d)
    _xsa_bwd_kernel[(triton.cdiv(n_rows, rows),)](dout, y, v, y if z is None else z, dy, dv, y if z is None else dz,
                                                  dv if rowsum is None else rowsum, n_rows, NORM_EPS, t,
                                                  t if rowsum is None else rowsum.size(2), hkv, G=g, D=d, R=rows,
                                                  HAS_GATE=z is not None, ROWSUM=rowsum is not None, num_warps=warps)
    return dy, dv, dz


@torch.library.custom_op("lmcore::xsa_gate", mutates_args=())
def _xsa_gate(y: Tensor, v: Tensor, z: Tensor | None) -> Tensor:
    if _xsa_use_triton(y, v):
        return _xsa_forward_triton(y, v, z)
    return _xsa_forward_math(y, v, z)


@_xsa_gate.register_fake
def _(y: Tensor, v: Tensor, z: Tensor | None) -> Tensor:
    return torch.empty_like(y)


@torch.library.custom_op("lmcore::xsa_gate_backward", mutates_args=())
def _xsa_gate_backward(dout: Tensor, y: Tensor, v: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if _xsa_use_triton(y, v):
        return _xsa_backward_triton(dout, y, v, z)
    return _xsa_backward_math(dout, y, v, z)


@_xsa_gate_backward.register_fake
def _(dout: Tensor, y: Tensor, v: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(y), torch.empty_like(v), y.new_empty(0) if z is None else torch.empty_like(z)


def _xsa_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _xsa_backward(ctx, dout: Tensor):
    y, v, z = ctx.saved_tensors
    dy, dv, dz = _xsa_gate_backward(dout.contiguous(), y, v, z)
    return dy, dv, None if z is None else dz


_xsa_gate.register_autograd(_xsa_backward, setup_context=_xsa_setup_context)


def xsa_gate(y: Tensor, v: Tensor, z: Tensor | None) -> Tensor:
    """XSA (remove from each query head's output its component along its kv head's unit value
    vector) then the attention gate (times sigmoid(z); None: no gate), in fp32, returned in y's
    dtype: y (B, T, H, D) attention's output, v (B, T, Hkv, D), z (B, T, H) the gate's logits."""
    return _xsa_gate(y.contiguous(), v.contiguous(), None if z is None else z.contiguous())
