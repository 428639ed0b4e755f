"""A block's attention (`Attention`: q/k/v, q/k RMS norm, partial RoPE, q gain, GQA, XSA, the gate, the
output projection, and the fused ops that GPT's speed switches install) and the static `KVCache` it decodes with.
`lmcore.model` builds the GPT from these; one forward serves training, evaluation, TTT and cached sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmcore.attention import attention
from lmcore.config import ModelConfig
from lmcore.layers import CastedLinear, apply_rope, repeat_heads, rms_norm, rope_tables

if TYPE_CHECKING:
    from lmcore.model import GPT


class KVCache:
    """Static-shape key/value cache for one-token-at-a-time sampling.

    Holds per-layer K and V of shape (B, Hkv, max_len, D), the previous token id and the
    previous normalised input embedding (for the bigram and SmearGate), and `pos`, a 0-d
    int64 tensor. RoPE uses the tables of `rope_len` (the length the model is sampled to),
    so a cached decode of a sequence equals `forward` over it with `rope_len` = its length.
    """

    def __init__(self, model: GPT, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        cfg = model.cfg
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.prev_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.prev_x = torch.zeros(batch, 1, cfg.model_dim, device=device, dtype=dtype)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.max_len = max_len
        cos, sin = rope_tables(cfg, max_len, device)
        self.cos, self.sin = cos, sin
        self.positions = torch.arange(max_len, device=device)

    def reset(self) -> None:
        self.pos.zero_()
        self.prev_ids.zero_()
        self.prev_x.zero_()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, xsa: bool, gated: bool):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k = CastedLinear(cfg.model_dim, kv_dim)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.xsa = xsa
        self.attn_gate: nn.Linear | None = None
        if gated:
            self.attn_gate = nn.Linear(cfg.model_dim, cfg.num_heads, bias=True)
            nn.init.zeros_(self.attn_gate.weight)
            nn.init.constant_(self.attn_gate.bias, cfg.gate_bias_init)
        self.backend = "math"
        self.qk_op: Callable[..., Tensor] | None = None  # lmcore.kernels.qk_norm_rope when fused
        self.qkv_op: Callable[..., tuple[Tensor, ...]] | None = None  # kernels.qkv_norm_rope (GPT.use_fused_qkv)
        self.qkv_repeat_v = False  # GPT.use_fused_qkv(repeat_v=True): the op writes attention's repeated v too
        self.qkv_gate = False  # GPT.use_fused_qkv(gate=True): the gate's logits from the q/k/v GEMM (gated layers)
        self.xsa_op: Callable[..., Tensor] | None = None  # lmcore.xsa_kernel.xsa_gate when fused (XSA layers)
        self.attn_xsa_op: Callable[..., Tensor] | None = None  # lmcore.fa3_xsa.attention_xsa (GPT.use_fa3_xsa_rowsum)
        self.dq_accum = False  # GPT.use_fa3_xsa_rowsum(dq_accum=True): q's gradient as FA3's dQ accumulator
        self.kv_repeat = 1  # GPT.use_expanded_kv: H // Hkv, k and v repeated to the query heads for attention
        self.row_scaled = False  # GPT.fold_attn_norm: reads the residual stream and its RMSNorm's row scale

    def forward(self, x: Tensor, ve: Tensor | None, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                out_scale: Tensor | None = None, row_scale: Tensor | None = None,
                token: bool = False, qkv: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
        """row_scale (B, T) (GPT.fold_attn_norm): x un-normed, its norm's row scale taken by v and the gate only.
        token (Block.zero_dq): (out, the attention op's token for the MLP, or None where the op made no dq slot).
        qkv: x times qkv_weight's transpose where the caller ran that GEMM (GPT.use_fused_resid_mix), else None."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = rope
        rep = self.kv_repeat if cache is None else 1
        v_att = slot = gl = None  # attention's v, where the fused op wrote it repeated (else v repeated below)
        if self.qkv_op is not None and cache is None:  # GPT.use_fused_qkv: one GEMM on the three weights
            G = self.num_heads if self.qkv_gate and self.attn_gate is not None else 0  # the gate's rows appended
            fused_v = self.qkv_repeat_v and ve is None and rep > 1  # a value-embedding layer adds ve first
            # q's gradient as FA3's dQ accumulator (attention's softmax scale); no slot where no gradient flows (eval)
            acc = D ** -0.5 if self.dq_accum and self.attn_xsa_op is not None and torch.is_grad_enabled() else 0.0
            qkv = F.linear(x, self.qkv_weight(x.dtype)) if qkv is None else qkv
            q, k, v, v_att, slot, gl = self.qkv_op(qkv, cos, sin, self.q_gain, H, D, rep, fused_v, acc, row_scale, G)
            v = v if ve is None else v + ve.view_as(v)
        else:
            q, k = self.c_q(x).view(B, T, H, D), self.c_k(x).view(B, T, Hkv, D)
            v = (self.c_v(x) if ve is None else self.c_v(x) + ve).view(B, T, Hkv, D)
            if self.qk_op is not None and cache is None:  # GPT.use_fused_qk_norm_rope: the same math, one op
                q, k = self.qk_op(q, cos, sin, self.q_gain), self.qk_op(k, cos, sin, None, rep)
            else:
                q, k = rms_norm(q), rms_norm(k)
                q, k = apply_rope(q, cos, sin), repeat_heads(apply_rope(k, cos, sin), rep)
                q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        gate = None if self.attn_gate is None else self._gate(x, row_scale, gl)
        tok = None
        if cache is None and self.attn_xsa_op is not None:  # GPT.use_fa3_xsa_rowsum: the same math, one op
            y = self.attn_xsa_op(q, k, repeat_heads(v, rep) if v_att is None else v_att, v, gate, self.backend, slot,
                                 token and slot is not None)
            y, tok = y if token and slot is not None else (y, None)
        elif cache is None:  # k is already repeated; v keeps its kv heads for XSA below
            y = self._xsa_gate(attention(q, k, repeat_heads(v, rep) if v_att is None else v_att, self.backend), v, gate)
        else:
            y = self._xsa_gate(self._cached_attention(q, k, v, cache), v, gate, fused=False)
        y = y.reshape(B, T, H * D)
        if out_scale is not None:  # Block.fold_scales: out_scale * proj(y) as one GEMM on scaled rows
            out = F.linear(y, self.proj.scaled_weight(out_scale, y.dtype))
        else:
            out = self.proj(y)
        return (out, tok) if token else out

    def qkv_weight(self, dtype: torch.dtype) -> Tensor:
        """c_q, c_k and c_v's weights in `dtype`, concatenated (GPT.use_fused_qkv), the gate's appended where its logits
        come from the same GEMM (train.fused_qkv_gate on a gated layer)."""
        ws = [m.cast_weight(dtype) for m in (self.c_q, self.c_k, self.c_v)]
        return torch.cat(ws + [self.attn_gate.weight.to(dtype)] if self.qkv_gate and self.attn_gate is not None else ws)

    def _gate(self, x: Tensor, row_scale: Tensor | None, gl: Tensor | None) -> Tensor:
        """The gate's logits W n + b: nn.Linear's, or from gl = W x (the q/k/v GEMM's) and n = row_scale * x where x is
        un-normed (GPT.fold_attn_norm), the bias added in fp32 and returned in the GEMM's dtype."""
        if gl is None and row_scale is None:
            return self.attn_gate(x)
        gl = F.linear(x, self.attn_gate.weight) if gl is None else gl
        gf = gl.float() if row_scale is None else gl.float() * row_scale[..., None]
        return (gf + self.attn_gate.bias.float()).to(gl.dtype)

    def _xsa_gate(self, y: Tensor, v: Tensor, gate: Tensor | None, fused: bool = True) -> Tensor:
        """XSA (XSA layers), then the gate (its logits, or None) on y (B, T, H, D); xsa_op unless not `fused`."""
        if self.xsa_op is not None and fused:  # GPT.use_fused_xsa_gate: the same math, one op
            return self.xsa_op(y, v, gate)
        B, T, H, D = y.shape
        if self.xsa:  # remove the component along the head's own (unit) value vector
            Hkv = v.size(2)
            yg = y.view(B, T, Hkv, H // Hkv, D)
            vn = F.normalize(v, dim=-1).unsqueeze(-2)
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)
        if gate is not None:
            y = y * torch.sigmoid(gate.to(y.dtype)).unsqueeze(-1)
        return y

    def _cached_attention(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache) -> Tensor:
        # One new token per call (T == 1): write K/V at pos, attend to positions <= pos.
        # Plain matmuls over the cache in its own dtype (no per-step copy of the cache,
        # no host sync: pos stays a device tensor, so one CUDA graph serves every step).
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        idx = cache.pos.view(1)
        kc.index_copy_(2, idx, k.transpose(1, 2).to(kc.dtype))
        vc.index_copy_(2, idx, v.transpose(1, 2).to(vc.dtype))
        B, _, H, D = q.shape
        Hkv = kc.size(1)
        qg = q.reshape(B, Hkv, H // Hkv, D).to(kc.dtype)
        s = torch.matmul(qg, kc.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))
        s = s.masked_fill(cache.positions > cache.pos, float("-inf"))
        y = torch.matmul(torch.softmax(s, -1).to(vc.dtype), vc)
        return y.reshape(B, 1, H, D).to(q.dtype)
