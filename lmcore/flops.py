"""FLOPs per token of the model a config builds, and model FLOPs utilisation (MFU).

Forward FLOPs per token: 2 x in x out for every linear layer of the model (each applied once
to every token: attention q/k/v/out projections and gates, MLP, hashed-bigram and
value-embedding projections), 2 x model_dim x vocab for the tied output head, and the
attention products QK^T and PV, 2 x 2 x head_dim x num_heads x context per layer. A causal
model attends on average to (seq_len + 1) / 2 positions (`causal=True`, what the kernels do
and what MFU counts); `causal=False` counts the whole seq_len, as torch's FlopCounterMode
does for scaled_dot_product_attention. Training FLOPs are 3 x forward (the backward pass
costs two forwards); embedding lookups, norms and elementwise work are not counted, and
neither is the optimizer, by the usual MFU convention.

MFU = training FLOPs per token x tokens per second (per GPU) / the GPU's bf16 peak; the
benchmarks measure that peak on the same card (`benchmarks/matmul_peak.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmcore.config import Config

__all__ = ["Flops", "count_flops", "mfu"]


@dataclass(frozen=True)
class Flops:
    linear: int  # forward, per token: the linear layers and the output head
    attention: int  # forward, per token: QK^T and PV
    seq_len: int
    causal: bool

    @property
    def forward(self) -> int:
        return self.linear + self.attention

    @property
    def train(self) -> int:
        """Forward + backward FLOPs per token (3 x forward)."""
        return 3 * self.forward


def count_flops(cfg: Config, *, causal: bool = True, model: nn.Module | None = None) -> Flops:
    """FLOPs per token of cfg's model at cfg.data.seq_len (see the module docstring). The
    linear layers are read off `model` (default: the model built on the meta device, so
    nothing is allocated)."""
    import torch

    from lmcore.model import GPT

    if model is None:
        with torch.device("meta"):
            model = GPT(cfg.model)
    m = cfg.model
    linear = sum(2 * mod.in_features * mod.out_features for mod in model.modules() if isinstance(mod, nn.Linear))
    linear += 2 * m.model_dim * m.vocab_size  # tied output head: x @ tok_emb.weight.T
    t = cfg.data.seq_len
    context = (t + 1) / 2 if causal else t
    attention = int(round(m.num_layers * 2 * 2 * m.head_dim * m.num_heads * context))
    return Flops(linear=linear, attention=attention, seq_len=t, causal=causal)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak (per GPU)."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops
