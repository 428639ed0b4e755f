"""The model's building blocks that other modules share: CastedLinear (a linear layer whose fp32
weight is cast at use, with late QAT's fake quantization), RMS norm, RoPE's tables and rotation,
and the repeat of kv heads to the query heads. lmcore.model composes them into the GPT; the
fused kernels (lmcore.kernels), quantization and GPTQ use them without the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmcore.config import ModelConfig


class CastedLinear(nn.Linear):
    """Linear layer whose fp32 weight is cast to the input dtype at use.

    With `qat_bits` set, training forwards use a straight-through fake quantization of
    the weight (per-row scale = row max / (2^(b-1)-1), values in [-2^(b-1), 2^(b-1)-1]).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.zero_init = zero_init
        self.qat_bits = 0

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.cast_weight(x.dtype), b)

    def cast_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight in `dtype` as forward uses it (fake-quantized while QAT is on and training)."""
        w = self.weight.to(dtype)
        if self.qat_bits and self.training:
            w = w + (fake_quantize_rows(self.weight, self.qat_bits).to(dtype) - w).detach()
        return w

    def scaled_weight(self, scale: Tensor, dtype: torch.dtype) -> Tensor:
        """diag(scale) W in `dtype`: the product of cast_weight's fp32 weight, rounded once."""
        return (scale.float()[:, None] * self.cast_weight(torch.float32)).to(dtype)


@torch.no_grad()
def fake_quantize_rows(w: Tensor, bits: int) -> Tensor:
    """Per-row symmetric fake quantization used by late QAT (SPEC section 3)."""
    qmax = 2 ** (bits - 1) - 1
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / qmax).clamp_min(1.0 / qmax)
    return torch.clamp(torch.round(w32 / scale[:, None]), -qmax - 1, qmax) * scale[:, None]


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for the fp32 math it runs in under autocast


def rms_scale(x: Tensor, factor: float = 1.0) -> Tensor:
    """factor / rms(x) a row, fp32 (x's shape without its last dim): rms_norm(x) * factor is x times it, up to
    rounding."""
    return factor * torch.rsqrt(as_dtype(x, torch.float32).square().mean(-1) + RMS_EPS)


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in `dtype`, with no conversion where it is in `dtype` already. Same result as x.to(dtype), but without
    the name of a second tensor for x that x.to writes in a traced graph: under torch 2.11, dynamo returns every
    such name from an autograd.Function's forward, and autograd gives x's gradient to the last of them (where
    x is an output, its gradient is lost: lmcore.mix_kernel, session 39)."""
    return x if x.dtype == dtype else x.to(dtype)


def rope_tables(cfg: ModelConfig, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (length, rope_dims/2) for a sequence of `length` tokens.

    Past `rope_train_len` the base grows as base * (L / train_len)^(rd / (rd - 2)).
    """
    rd = cfg.rope_dims or cfg.head_dim
    base = cfg.rope_base
    if length > cfg.rope_train_len:
        base = base * (length / cfg.rope_train_len) ** (rd / (rd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2*cos.size(-1) dims of x (B, T, H, D); cos/sin are (T, rd/2)."""
    half = cos.size(-1)
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def repeat_heads(x: Tensor, repeat: int) -> Tensor:
    """x (B, T, H, D) with each head `repeat` times in a row (B, T, H * repeat, D); x itself at 1."""
    return x if repeat == 1 else x.repeat_interleave(repeat, dim=2)
