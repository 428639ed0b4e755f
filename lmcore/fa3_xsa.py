"""Causal attention and XSA + the gate as one autograd op (train.fa3_xsa_rowsum).

FA3's backward starts with a preprocess kernel that reads the attention output O and its gradient
dO to compute each query row's rowsum(dO * O) (`softmax_d` in dS = P * (dP - softmax_d)). On an
XSA layer dO is what XSA's backward writes, from O, which it reads anyway: `attention_xsa` runs
FA3's forward, then XSA (+ the gate) forward; its backward runs XSA's backward kernel with the
rowsums as a by-product (`lmcore.xsa_kernel`, ROWSUM) and hands them to FA3's backward, which then
skips reading O and dO again. That needs FA3 built with `FA3_DPSUM=1 scripts/build_fa3.sh`
(scripts/fa3_dpsum_patch.py: `flash_attn_3::bwd` takes `softmax_d`); `fa3_rowsum_reason()` says
whether the FA3 present has it.

The same math as attention followed by `xsa_kernel.xsa_gate`, up to the order of the rowsum's fp32
additions. The rowsums are of dO as stored (bf16), as FA3's preprocess computes them.

On the `math` backend (CPU, tests) the attention is `_attention_lse` / `_attention_backward`:
the same contract as FA3 (a natural-log LSE (B, H, T) forward; a backward that takes softmax_d
(B, H, TR), TR >= T) in PyTorch, so the op's wiring and the rowsums are tested without a GPU.
With a dq slot (train.fa3_dq_accum; lmcore.kernels.qkv_norm_rope's fifth output), FA3's backward
skips its dQ postprocess (`dq_accum_only`, the FA3_DPSUM build's) and the op gives q's gradient as
the slot's: FA3's fp32 dQ accumulator, which q's backward kernel reads in place of a bf16 dq. That
leaves out the postprocess's pass and one bf16 rounding of dq. Imported only by GPT.use_fa3_xsa_rowsum.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import torch
from torch import Tensor

from lmcore import xsa_kernel

BLOCK_M = 128  # FA3's backward row tile at head dim 64 on sm90: softmax_d's rows are rounded up to it


def rounded_rows(t: int) -> int:
    return -(-t // BLOCK_M) * BLOCK_M


_FA3: dict[str, Callable[..., Any]] = {}  # FA3's forward op, loaded by fa3_rowsum_reason outside traced code


def fa3_rowsum_reason(dq_accum: bool = False) -> str | None:
    """None if the importable FA3 takes softmax_d in its backward (and dq_accum_only with
    `dq_accum`; its forward is then loaded for attention_xsa), else why not."""
    try:
        mod = importlib.import_module("flash_attn_interface")  # registers torch.ops.flash_attn_3
        schema = torch.ops.flash_attn_3.bwd.default._schema
        forward = mod._flash_attn_forward  # a custom op with a fake
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"FA3 is not importable ({e})"
    if "softmax_d" not in [a.name for a in schema.arguments]:
        return "its flash_attn_3::bwd has no softmax_d argument: build it with FA3_DPSUM=1 scripts/build_fa3.sh"
    if dq_accum and "dq_accum_only" not in [a.name for a in schema.arguments]:
        return "its flash_attn_3::bwd has no dq_accum_only argument: build it again with FA3_DPSUM=1 scripts/build_fa3.sh"
    _FA3["forward"] = forward
    return None


# ---------------------------------------------------------------- the math backend (FA3's contract)


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    t = q.size(1)
    s = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale
    return s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))


def _attention_lse(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention (q, k, v (B, T, H, D), k and v already repeated to H heads): (out in q's
    dtype, LSE (B, H, T) fp32), as FA3's forward returns them."""
    s = _scores(q, k, scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhts,bshd->bthd", torch.exp(s - lse[..., None]), v.float())
    return out.to(q.dtype).contiguous(), lse


def _attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, softmax_d: Tensor,
                        scale: float, dq_accum: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the LSE and the given softmax_d (B, H, TR): dS = P (dP - softmax_d); with
    `dq_accum`, dq as FA3's accumulator: dq / scale in fp32 laid out as kernels.acc_offsets says."""
    t = q.size(1)
    p = torch.exp(_scores(q, k, scale) - lse[..., None])
    g = dout.float()
    dv = torch.einsum("bhts,bthd->bshd", p, g)
    ds = p * (torch.einsum("bthd,bshd->bhts", g, v.float()) - softmax_d[..., :t, None])
    dq = torch.einsum("bhts,bshd->bthd", ds, k.float())
    dk = torch.einsum("bhts,bthd->bshd", ds, q.float()) * scale
    if dq_accum:
        from lmcore.kernels import to_accumulator

        dq = to_accumulator(dq, softmax_d.size(-1))
    else:
        dq = (dq * scale).to(q.dtype).contiguous()
    return dq, dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("lmcore::xsa_gate_backward_rowsum", mutates_args=())
def _xsa_backward_rowsum(dout: Tensor, y: Tensor, v: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """xsa_kernel.xsa_gate's backward (dy, dv, dz) and rowsum(dy * y) a query head, (B, H, TR) fp32."""
    b, t, h, _ = y.shape
    tr = rounded_rows(t)
    if xsa_kernel._xsa_use_triton(y, v):
        rowsum = (torch.empty if tr == t else torch.zeros)(b, h, tr, device=y.device, dtype=torch.float32)
        dy, dv, dz = xsa_kernel._xsa_backward_triton(dout, y, v, z, rowsum=rowsum)
        return dy, dv, dz, rowsum
    dy, dv, dz = xsa_kernel._xsa_backward_math(dout, y, v, z)
    rowsum = (dy.float() * y.float()).sum(-1).transpose(1, 2)
    return dy, dv, dz, torch.nn.functional.pad(rowsum, (0, tr - t)).contiguous()


@_xsa_backward_rowsum.register_fake
def _(dout: Tensor, y: Tensor, v: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, t, h, _ = y.shape
    dz = y.new_empty(0) if z is None else torch.empty_like(z)
    return torch.empty_like(y), torch.empty_like(v), dz, y.new_empty(b, h, rounded_rows(t), dtype=torch.float32)


@torch.library.custom_op("lmcore::fa3_backward_rowsum", mutates_args=())
def _fa3_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_d: Tensor,
                  scale: float, dq_accum: bool) -> tuple[Tensor, Tensor, Tensor]:
    """FA3's causal backward with rowsum(dO * O) given (FA3 built with FA3_DPSUM=1): (dq, dk, dv), or with
    `dq_accum` (dq_accum_only: no dQ postprocess) dQ's fp32 accumulator (B, H, TR * D) in dq's place."""
    dq, dk, dv = None if dq_accum else torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    acc = torch.ops.flash_attn_3.bwd(dout, q, k, v, out, lse, dq, dk, dv, None, None, None, None, None, None, scale,
                                     True, -1, -1, 0.0, False, 0, softmax_d, *((True,) if dq_accum else ()))[2]
    return acc if dq_accum else dq, dk, dv


@_fa3_backward.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_d: Tensor,
      scale: float, dq_accum: bool) -> tuple[Tensor, Tensor, Tensor]:
    b, t, h, d = q.shape
    dq = q.new_empty(b, h, rounded_rows(t) * d, dtype=torch.float32) if dq_accum else torch.empty_like(q)
    return dq, torch.empty_like(k), torch.empty_like(v)


def _fa3_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, *_ = _FA3["forward"](q, k, v, softmax_scale=scale, causal=True)
    return out, lse


class _AttentionXSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v_att: Tensor, v: Tensor, z: Tensor | None, fa3: bool,
                dq_slot: Tensor | None) -> Tensor:
        scale = 1.0 / math.sqrt(q.size(-1))
        y, lse = (_fa3_forward if fa3 else _attention_lse)(q, k, v_att, scale)
        ctx.save_for_backward(q, k, v_att, v, z, y, lse)
        ctx.scale, ctx.fa3, ctx.dq_accum = scale, fa3, dq_slot is not None
        return xsa_kernel._xsa_gate(y, v, z)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v_att, v, z, y, lse = ctx.saved_tensors
        dy, dv, dz, rowsum = _xsa_backward_rowsum(dout.contiguous(), y, v, z)
        if ctx.fa3:
            dq, dk, dv_att = _fa3_backward(dy, q, k, v_att, y, lse, rowsum, ctx.scale, ctx.dq_accum)
        else:
            dq, dk, dv_att = _attention_backward(dy, q, k, v_att, lse, rowsum, ctx.scale, ctx.dq_accum)
        if ctx.dq_accum:  # q's gradient goes as the slot's (lmcore.kernels.qkv_norm_rope reads it)
            return None, dk, dv_att, dv, None if z is None else dz, None, dq
        return dq, dk, dv_att, dv, None if z is None else dz, None, None


def attention_xsa(q: Tensor, k: Tensor, v_att: Tensor, v: Tensor, z: Tensor | None, backend: str,
                  dq_slot: Tensor | None = None) -> Tensor:
    """Causal attention of q (B, T, H, D) over k, v_att (B, T, H, D: kv heads already repeated),
    then XSA along v (B, T, Hkv, D) and the gate z (B, T, H) or None: `xsa_kernel.xsa_gate(attention(q,
    k, v_att), v, z)` with FA3's backward given its rowsums by XSA's. backend: "fa3" or "math".
    dq_slot: qkv_norm_rope's (B, H, TR * D) fp32 slot, whose gradient then carries q's as FA3's
    dQ accumulator (q itself gets none), or None."""
    if backend not in ("fa3", "math"):
        raise ValueError(f"train.fa3_xsa_rowsum runs on attention backend fa3 (or math on CPU), not {backend!r}")
    if backend == "fa3" and "forward" not in _FA3:
        raise RuntimeError("attention_xsa on fa3: call fa3_rowsum_reason() first (it loads FA3, and checks its build)")
    if k.shape != q.shape or v_att.shape != q.shape:
        raise ValueError(f"attention_xsa takes k and v repeated to q's heads: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v_att {tuple(v_att.shape)}")
    b, t, h, d = q.shape
    if dq_slot is not None and (dq_slot.shape != (b, h, rounded_rows(t) * d) or dq_slot.dtype != torch.float32):
        raise ValueError(f"attention_xsa: dq_slot {tuple(dq_slot.shape)} {dq_slot.dtype} is not FA3's dQ accumulator "
                         f"for q {tuple(q.shape)}: (B, H, TR * D) fp32")
    z = None if z is None else z.contiguous()
    return _AttentionXSA.apply(q.contiguous(), k.contiguous(), v_att.contiguous(), v.contiguous(), z, backend == "fa3",
                               dq_slot)
