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

With `token` too (train.mlp_zeroes_dq_accum): the op also returns a token, an fp32 tensor of the slot's
shape that is never written (zero strides), for the block's MLP op to take (lmcore.mlp_kernel.leaky_mlp).
The MLP's backward, which runs before the attention's, returns a buffer of zeros as the token's gradient,
written by its ping-pong kernel beside its GEMMs; FA3's backward adds dQ into that buffer (`dq_accum_in`,
the FA3_DPSUM build's) and its preprocess does not zero one of its own: 201 MB a call at `record`'s
micro-batch written beside the MLP's GEMMs instead of in a pass of its own (on one H200, session 34, that
costs the MLP's kernel about what the pass cost: no faster). Without a gradient for the token (an MLP
that did not take it) FA3 zeroes its accumulator as before. The same math.
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


def fa3_rowsum_reason(dq_accum: bool = False, accum_in: bool = False) -> str | None:
    """None if the importable FA3 takes softmax_d in its backward (and dq_accum_only with
    `dq_accum`, dq_accum_in with `accum_in`; its forward is then loaded for attention_xsa), else why not."""
    try:
        mod = importlib.import_module("flash_attn_interface")  # registers torch.ops.flash_attn_3
        schema = torch.ops.flash_attn_3.bwd.default._schema
        forward = mod._flash_attn_forward  # a custom op with a fake
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"FA3 is not importable ({e})"
    if "softmax_d" not in [a.name for a in schema.arguments]:
        return "its flash_attn_3::bwd has no softmax_d argument: build it with FA3_DPSUM=1 scripts/build_fa3.sh"
    for wanted, name in ((dq_accum, "dq_accum_only"), (accum_in, "dq_accum_in")):
        if wanted and name not in [a.name for a in schema.arguments]:
            return f"its flash_attn_3::bwd has no {name} argument: build it again with FA3_DPSUM=1 scripts/build_fa3.sh"
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
                        scale: float, dq_accum: bool = False,
                        acc: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the LSE and the given softmax_d (B, H, TR): dS = P (dP - softmax_d); with
    `dq_accum`, dq as FA3's accumulator: dq / scale in fp32 laid out as kernels.acc_offsets says,
    added into `acc` where one is given (then returned as dq), as FA3's dq_accum_in."""
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
        dq = dq if acc is None else acc.add_(dq)
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


@torch.library.custom_op("lmcore::fa3_backward_rowsum", mutates_args=("acc",))
def _fa3_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_d: Tensor,
                  scale: float, dq_accum: bool, acc: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """FA3's causal backward with rowsum(dO * O) given (FA3 built with FA3_DPSUM=1): (dq, dk, dv), or with
    `dq_accum` (dq_accum_only: no dQ postprocess) dQ's fp32 accumulator (B, H, TR * D) in dq's place. With
    `acc` (dq_accum only; zero, fp32, (B, H, TR * D)): FA3 adds into it (dq_accum_in) and does not zero an
    accumulator of its own; dq's place then holds an empty tensor."""
    dq, dk, dv = None if dq_accum else torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    tail = (softmax_d,) if not dq_accum else (softmax_d, True) if acc is None else (softmax_d, True, acc)
    out_acc = torch.ops.flash_attn_3.bwd(dout, q, k, v, out, lse, dq, dk, dv, None, None, None, None, None, None,
                                         scale, True, -1, -1, 0.0, False, 0, *tail)[2]
    if acc is not None:
        return q.new_empty(0, dtype=torch.float32), dk, dv
    return out_acc if dq_accum else dq, dk, dv


@_fa3_backward.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_d: Tensor,
      scale: float, dq_accum: bool, acc: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    b, t, h, d = q.shape
    dq = q.new_empty(b, h, rounded_rows(t) * d, dtype=torch.float32) if dq_accum else torch.empty_like(q)
    return dq if acc is None else q.new_empty(0, dtype=torch.float32), torch.empty_like(k), torch.empty_like(v)


def _fa3_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, *_ = _FA3["forward"](q, k, v, softmax_scale=scale, causal=True)
    return out, lse


class _AttentionXSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v_att: Tensor, v: Tensor, z: Tensor | None, fa3: bool,
                dq_slot: Tensor | None, token: bool):
        scale = 1.0 / math.sqrt(q.size(-1))
        y, lse = (_fa3_forward if fa3 else _attention_lse)(q, k, v_att, scale)
        ctx.save_for_backward(q, k, v_att, v, z, y, lse)
        ctx.scale, ctx.fa3, ctx.dq_accum = scale, fa3, dq_slot is not None
        ctx.set_materialize_grads(False)  # no token gradient: None, not a tensor of zeros
        out = xsa_kernel._xsa_gate(y, v, z)
        if not token:
            return out
        return out, torch.empty((), dtype=torch.float32, device=q.device).expand(dq_slot.shape)  # never written

    @staticmethod
    def backward(ctx, dout: Tensor | None, dtoken: Tensor | None = None):
        q, k, v_att, v, z, y, lse = ctx.saved_tensors
        dout = torch.zeros_like(y) if dout is None else dout
        dy, dv, dz, rowsum = _xsa_backward_rowsum(dout.contiguous(), y, v, z)
        acc = dtoken.contiguous() if dtoken is not None and ctx.dq_accum else None  # zeros (leaky_mlp's)
        if ctx.fa3:
            dq, dk, dv_att = _fa3_backward(dy, q, k, v_att, y, lse, rowsum, ctx.scale, ctx.dq_accum, acc)
        else:
            dq, dk, dv_att = _attention_backward(dy, q, k, v_att, lse, rowsum, ctx.scale, ctx.dq_accum, acc)
        dq = dq if acc is None else acc  # FA3 added q's gradient into the MLP's zeros
        if ctx.dq_accum:  # q's gradient goes as the slot's (lmcore.kernels.qkv_norm_rope reads it)
            return None, dk, dv_att, dv, None if z is None else dz, None, dq, None
        return dq, dk, dv_att, dv, None if z is None else dz, None, None, None


def attention_xsa(q: Tensor, k: Tensor, v_att: Tensor, v: Tensor, z: Tensor | None, backend: str,
                  dq_slot: Tensor | None = None, token: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Causal attention of q (B, T, H, D) over k, v_att (B, T, H, D: kv heads already repeated),
    then XSA along v (B, T, Hkv, D) and the gate z (B, T, H) or None: `xsa_kernel.xsa_gate(attention(q,
    k, v_att), v, z)` with FA3's backward given its rowsums by XSA's. backend: "fa3" or "math".
    dq_slot: qkv_norm_rope's (B, H, TR * D) fp32 slot, whose gradient then carries q's as FA3's
    dQ accumulator (q itself gets none), or None. `token` (with a dq slot): (out, token), the token for the
    block's MLP op, whose backward gives this op's backward a zeroed accumulator (module docstring)."""
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
    if token and dq_slot is None:
        raise ValueError("attention_xsa: a token needs a dq slot (train.mlp_zeroes_dq_accum needs train.fa3_dq_accum)")
    z = None if z is None else z.contiguous()
    return _AttentionXSA.apply(q.contiguous(), k.contiguous(), v_att.contiguous(), v.contiguous(), z, backend == "fa3",
                               dq_slot, token)
