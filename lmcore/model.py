"""The GPT of SPEC section 3, every component a config switch, one forward for all uses.

`GPT.forward(ids, targets=None, reduction="mean", latent=None, cache=None)` serves
training (mean loss), evaluation (per-token losses with reduction="none"), test-time
training (with a `LatentMasks` module passed explicitly) and sampling (with a static
`KVCache`, one token per call). Nothing is patched at run time.

Components: tied embedding, product-key / hashed / no bigram, RMS norm, SmearGate, U-Net
skips, blocks with residual mix to x0, GQA attention with q/k RMS norm, partial RoPE
(NTK-rescaled past `rope_train_len`), per-head q gain, XSA, gated attention, shared value
embedding, LeakyReLU(0.5)^2 MLP, logit softcap, and the `bos_mask` fix (SPEC section 7).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmcore.attention import resolve_backend
from lmcore.attention_layer import Attention, KVCache
from lmcore.config import ModelConfig, resolve_layers
from lmcore.layers import CastedLinear, rms_norm, rms_scale, rope_tables

# Parameter-name fragments of the small "control" tensors (kept fp32, AdamW scalar group).
CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "smear", "ve_layer_scales",
                    "ve_shared.scale", "bigram.scale")


class LatentMasks(nn.Module):
    """Per-block test-time-trainable masks (SPEC section 6): 4 vectors per block.

    MLP: h = act(h) * sigmoid(mlp_mask) + mlp_bias before the MLP output projection.
    Attention: out * sigmoid(attn_mask) + attn_bias after the attention projection.
    """

    def __init__(self, cfg: ModelConfig, init: float = 3.0):
        super().__init__()
        L = cfg.num_layers
        self.mlp_mask = nn.Parameter(torch.full((L, cfg.mlp_hidden), float(init)))
        self.mlp_bias = nn.Parameter(torch.zeros(L, cfg.mlp_hidden))
        self.attn_mask = nn.Parameter(torch.full((L, cfg.model_dim), float(init)))
        self.attn_bias = nn.Parameter(torch.zeros(L, cfg.model_dim))

    @staticmethod
    def apply(h: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
        return h * torch.sigmoid(mask).to(h.dtype) + bias.to(h.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim, zero_init=True)
        self.slope = cfg.leaky_slope
        self.fused_op = None  # GPT.use_fused_mlp: lmcore.mlp_kernel.leaky_mlp

    def forward(self, x: Tensor, mask: tuple[Tensor, Tensor] | None = None, out_scale: Tensor | None = None,
                token: Tensor | None = None) -> Tensor:
        """out_scale (Block.fold_scales): out_scale * proj(h), as proj's rows scaled before its GEMM. token
        (Block.zero_dq): the attention op's, for the fused op (its backward zeroes FA3's dQ accumulator)."""
        proj = self.proj.cast_weight if out_scale is None else functools.partial(self.proj.scaled_weight, out_scale)
        if self.fused_op is not None and mask is None:  # the same math, one op (LatentMask TTT: plain)
            on = torch.is_autocast_enabled(x.device.type)
            dt = torch.get_autocast_dtype(x.device.type) if on else x.dtype
            return self.fused_op(x.to(dt), self.fc.cast_weight(dt), proj(dt), self.slope, token=token)
        h = F.leaky_relu(self.fc(x), negative_slope=self.slope).square()
        if mask is not None:
            h = LatentMasks.apply(h, *mask)
        return self.proj(h) if out_scale is None else F.linear(h, proj(h.dtype))  # GPTQ hooks self.proj


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, xsa: bool, gated: bool):
        super().__init__()
        d = cfg.model_dim
        self.layer = layer
        self.attn = Attention(cfg, layer, xsa, gated)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.ln_factor = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.fold_scales = False  # GPT.fold_output_scales
        self.zero_dq = False  # GPT.use_mlp_zeroes_dq_accum: the MLP's backward zeroes attention's dQ accumulator
        self.mix_op: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None  # GPT.use_fused_resid_mix

    def forward(
        self,
        x: Tensor,
        x0: Tensor,
        ve: Tensor | None,
        rope: tuple[Tensor, Tensor],
        latent: LatentMasks | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        tok = self.zero_dq and latent is None and cache is None  # the attention op's token, for the MLP's op
        folded = self.fold_scales and latent is None  # the scales inside the output projections' GEMMs
        scaled = folded and self.attn.row_scaled and cache is None  # GPT.fold_attn_norm: x and its norm's row scale
        if scaled and self.mix_op is not None:  # GPT.use_fused_resid_mix: the mix, its row scale and q/k/v as one op
            x, r, qkv = self.mix_op(x, x0, self.resid_mix, self.attn.qkv_weight(x.dtype), self.ln_factor)
            a, t = self._attend(tok, x, ve, rope, cache, self.attn_scale, r, qkv=qkv)
        else:
            mix = self.resid_mix.to(x.dtype)
            x = mix[0] * x + mix[1] * x0
            if folded:
                n, r = (x, rms_scale(x, self.ln_factor)) if scaled else (rms_norm(x) * self.ln_factor, None)
                a, t = self._attend(tok, n, ve, rope, cache, self.attn_scale, r)
        if folded:
            x = x + a
            return x + self.mlp(rms_norm(x) * self.ln_factor, None, self.mlp_scale, t)
        a, t = self._attend(tok, rms_norm(x) * self.ln_factor, ve, rope, cache)
        mlp_mask = None
        if latent is not None:
            i = self.layer
            a = LatentMasks.apply(a, latent.attn_mask[i], latent.attn_bias[i])
            mlp_mask = (latent.mlp_mask[i], latent.mlp_bias[i])
        x = x + self.attn_scale.to(x.dtype) * a
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_factor, mlp_mask, token=t)

    def _attend(self, token: bool, *args, **kwargs) -> tuple[Tensor, Tensor | None]:
        """The attention's output and, with `token`, its op's token for the MLP (else None)."""
        return self.attn(*args, token=True, **kwargs) if token else (self.attn(*args, **kwargs), None)


def previous_ids(ids: Tensor, bos_mask: bool, bos_id: int) -> Tensor:
    """The previous token of each position (0 at position 0, and at BOS with bos_mask)."""
    prev = F.pad(ids[:, :-1], (1, 0), value=0)
    if bos_mask:
        prev = prev.masked_fill(ids == bos_id, 0)
    return prev


class ProductKeyBigram(nn.Module):
    """embed_prev[prev] * embed_cur[cur] * scale (SPEC section 3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_prev = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.embed_cur = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.embed_prev.weight, std=0.02)
        nn.init.normal_(self.embed_cur.weight, std=0.02)
        self.scale = nn.Parameter(torch.tensor(cfg.bigram_scale_init))

    def forward(self, ids: Tensor, prev: Tensor) -> Tensor:
        h = self.embed_prev(prev) * self.embed_cur(ids)
        return h * self.scale.to(h.dtype)


class HashedBigram(nn.Module):
    """Hash (prev, cur) into `buckets`, embed in `dim`, project to the model width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets = cfg.bigram_buckets
        self.embed = nn.Embedding(cfg.bigram_buckets, cfg.bigram_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim)
        self.scale = nn.Parameter(torch.tensor(cfg.bigram_scale_init))

    def bucket(self, ids: Tensor, prev: Tensor) -> Tensor:
        h = torch.bitwise_xor(36313 * ids.long(), 27191 * prev.long()) % (self.buckets - 1)
        return torch.where(prev == 0, torch.full_like(h, self.buckets - 1), h)

    def forward(self, ids: Tensor, prev: Tensor) -> Tensor:
        h = self.proj(self.embed(self.bucket(ids, prev)))
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    """x_t = (1 - g) x_t + g x_{t-1}, g = sigmoid(gate) per channel (x_{-1} = 0)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, prev_x: Tensor, keep_prev: Tensor | None) -> Tensor:
        if keep_prev is not None:
            prev_x = prev_x * keep_prev.unsqueeze(-1).to(prev_x.dtype)
        g = torch.sigmoid(self.gate.to(x.dtype))
        return (1 - g) * x + g * prev_x


class ValueEmbedding(nn.Module):
    """Embedding (vocab x ve_dim) -> linear to the KV width, times a scale (SPEC section 3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(cfg.ve_dim, kv_dim) if cfg.ve_dim != kv_dim else None
        self.scale = nn.Parameter(torch.tensor(cfg.ve_scale_init))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L, d = cfg.num_layers, cfg.model_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        bigrams = {"product_key": ProductKeyBigram, "hashed": HashedBigram, "none": lambda c: None}
        self.bigram: nn.Module | None = bigrams[cfg.bigram](cfg)
        self.smear = SmearGate(d) if cfg.smear_gate else None
        self.num_encoder = L // 2 if cfg.unet_skips else 0
        n_skip = min(self.num_encoder, L - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d)) if n_skip else None
        xsa = set(resolve_layers(cfg.xsa_layers, L))
        gated = set(resolve_layers(cfg.gated_attn_layers, L))
        self.blocks = nn.ModuleList(Block(cfg, i, i in xsa, i in gated) for i in range(L))
        self.ve_layers = resolve_layers(cfg.ve_layers, L)
        if self.ve_layers:
            self.ve_shared = ValueEmbedding(cfg)
            self.ve_layer_scales = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in self.ve_layers)
        else:
            self.ve_shared = None
            self.ve_layer_scales = nn.ParameterList()
        self._init_weights()
        self.ce_op: Callable[..., Tensor] | None = None  # lmcore.ce_kernel.softcap_cross_entropy when fused
        self.embed_op: Callable[..., Tensor] | None = None  # lmcore.embed_kernel.embed_smear (use_fused_embed)
        # RoPE tables of one sequence length, computed once (cache_rope); None: every forward computes them
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        # The backend is resolved for a device: a CUDA-only choice starts as the CPU default until train/eval/pack
        # call set_attention_backend(cfg.attention, device). That stand-in is never silent: `attention_fallback` says
        # why, and the first forward that runs it warns.
        self.attention_fallback: str | None = None
        self._fallback_warned = False
        try:
            self.set_attention_backend(cfg.attention, torch.device("cpu"))
        except ValueError as e:
            self.set_attention_backend("auto", torch.device("cpu"))
            self.attention_fallback = (f"model.attention={cfg.attention!r}: {e}; running {self.attention_backend!r} "
                                       "until set_attention_backend() is called")

    # ------------------------------------------------------------------ setup
    def _init_weights(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.tied_embed_init_std)
        scale = 1.0 / math.sqrt(2 * self.cfg.num_layers)
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if getattr(m, "zero_init", False):
                nn.init.zeros_(m.weight)
            elif m.weight.shape[0] >= 64 and m.weight.shape[1] >= 64:
                nn.init.orthogonal_(m.weight)
                if name.endswith(".proj"):
                    with torch.no_grad():
                        m.weight.mul_(scale)

    def set_attention_backend(self, name: str, device: torch.device | str) -> str:
        """Resolve `name` for `device` (raises if unavailable); returns the backend used."""
        backend = resolve_backend(name, torch.device(device))
        for b in self.blocks:
            b.attn.backend = backend
        self.attention_backend = backend
        self.attention_fallback = None
        return backend

    def cache_rope(self, length: int) -> None:
        """Compute RoPE's cos/sin tables for sequences of `length` once, on the model's device (train.rope_cache).
        Forwards over that length read them; any other length computes its own. Under torch.compile the tables then
        are an input of the graph: computed inside it, inductor recomputes them (pow, cos, sin per element) in every
        kernel that reads them."""
        cos, sin = rope_tables(self.cfg, length, self.tok_emb.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    def use_fused_qk_norm_rope(self) -> None:
        """q/k RMSNorm + RoPE + q_gain through lmcore.kernels.qk_norm_rope (train.fused_qk_norm_rope): one Triton pass
        each way on CUDA; imported here, so that an exported script without the switch does not embed it."""
        from lmcore.kernels import qk_norm_rope

        for b in self.blocks:
            b.attn.qk_op = qk_norm_rope

    def use_fused_qkv(self, repeat_v: bool = False, gate: bool = False) -> None:
        """q, k and v from one GEMM on c_q, c_k and c_v's concatenated weights, then lmcore.kernels.qkv_norm_rope
        (train.fused_qkv): the q/k kernels read their slices of its output in place and write their gradients into one
        tensor for the input's gradient GEMM. With `repeat_v` (train.fused_qkv_repeat_v; with use_expanded_kv) they
        also write v's heads repeated for attention and sum their gradients, on the layers without value embeddings.
        With `gate` (train.fused_qkv_gate) the gated layers' GEMM gives the gate's logits too. KV-cached decoding keeps
        the three GEMMs; imported here, like use_fused_qk_norm_rope's."""
        from lmcore.kernels import qkv_norm_rope

        for b in self.blocks:
            b.attn.qkv_op, b.attn.qkv_repeat_v, b.attn.qkv_gate = qkv_norm_rope, repeat_v, gate

    def fold_attn_norm(self) -> None:
        """Attention's input RMSNorm folded into v and the gate (train.fold_attn_norm; after use_fused_qkv and
        fold_output_scales): q/k's own RMSNorm cancels the row scale r = ln_factor / rms(x), the GEMM reads x."""
        if not all(b.attn.qkv_op is not None and b.fold_scales for b in self.blocks):
            raise ValueError("fold_attn_norm needs use_fused_qkv and fold_output_scales first")
        for b in self.blocks:
            b.attn.row_scaled = True

    def use_fused_resid_mix(self) -> None:
        """Each block's residual mix, its row scale and the q/k/v GEMM as lmcore.mix_kernel.resid_mix_qkv
        (train.fused_resid_mix; after fold_attn_norm): its backward writes the mix's gradient (column sums over the
        tokens) in the pass that writes x's and x0's. Imported here, like use_fused_qk_norm_rope's."""
        if not all(b.attn.row_scaled for b in self.blocks):
            raise ValueError("use_fused_resid_mix needs fold_attn_norm first")
        from lmcore.mix_kernel import resid_mix_qkv

        for b in self.blocks:
            b.mix_op = resid_mix_qkv

    def use_expanded_kv(self) -> None:
        """k and v repeated to the query heads for attention (train.expand_kv): the kernel then runs MHA, and autograd
        sums each kv head's copies' gradients. KV-cached decoding keeps the kv heads."""
        for b in self.blocks:
            b.attn.kv_repeat = b.attn.num_heads // b.attn.num_kv_heads

    def use_fused_mlp(self, descriptors: str = "device", sign: bool = False) -> None:
        """The MLP's LeakyReLU^2 as its GEMMs' epilogues through lmcore.mlp_kernel.leaky_mlp (train.fused_mlp): TMA
        descriptors built on the "device" or the "host" (train.fused_mlp_descriptors), or the "pingpong" kernel
        (train.fused_mlp_pingpong; "pingpong_quarter" with train.fused_mlp_quarter_tiles); `sign`
        (train.fused_mlp_sign): pre's signs kept instead of pre. Imported here."""
        from lmcore.mlp_kernel import leaky_mlp

        for b in self.blocks:
            b.mlp.fused_op = functools.partial(leaky_mlp, descriptors=descriptors, sign=sign)

    def fold_output_scales(self) -> None:
        """attn_scale and mlp_scale folded into the output projections' rows (train.fold_output_scales):
        x + (diag(s) W) h instead of x + s * (W h); LatentMask TTT runs the plain path."""
        for b in self.blocks:
            b.fold_scales = True

    def use_fused_xsa_gate(self) -> None:
        """XSA + the attention gate through lmcore.xsa_kernel.xsa_gate on the XSA layers (train.fused_xsa_gate): one
        Triton pass each way on CUDA; imported here, like use_fused_qk_norm_rope's."""
        from lmcore.xsa_kernel import xsa_gate

        for b in self.blocks:
            if b.attn.xsa:
                b.attn.xsa_op = xsa_gate

    def use_fa3_xsa_rowsum(self, dq_accum: bool = False) -> None:
        """Attention, XSA and the gate as one op on the XSA layers (train.fa3_xsa_rowsum, lmcore.fa3_xsa): XSA's
        backward gives FA3's its rowsums (needs use_expanded_kv). dq_accum (train.fa3_dq_accum; with use_fused_qkv):
        q's gradient as FA3's dQ accumulator."""
        from lmcore.fa3_xsa import attention_xsa

        for b in self.blocks:
            if b.attn.xsa:
                b.attn.attn_xsa_op, b.attn.dq_accum = attention_xsa, dq_accum

    def use_mlp_zeroes_dq_accum(self) -> None:
        """On the layers whose attention gives q's gradient as FA3's dQ accumulator (use_fa3_xsa_rowsum(dq_accum=True)),
        the block's fused MLP (use_fused_mlp) zeroes that accumulator in its backward kernel and hands it to the
        attention's backward (train.mlp_zeroes_dq_accum; lmcore.fa3_xsa's docstring). The same math."""
        if any(b.mlp.fused_op is None for b in self.blocks):
            raise RuntimeError("use_mlp_zeroes_dq_accum: call use_fused_mlp first")
        for b in self.blocks:
            b.zero_dq = b.attn.attn_xsa_op is not None and b.attn.dq_accum

    def use_fused_softcap_ce(self) -> None:
        """The training loss (logit softcap, mean cross-entropy) through lmcore.ce_kernel.softcap_cross_entropy
        (train.fused_softcap_ce): one Triton pass each way on CUDA, no logits in memory. Logits, per-token losses
        (evaluation, TTT) and other reductions keep the plain path; imported here."""
        from lmcore.ce_kernel import softcap_cross_entropy

        self.ce_op = softcap_cross_entropy

    def use_fused_embed(self) -> None:
        """The input stage (token embedding, product-key bigram, RMS norm, SmearGate) through
        lmcore.embed_kernel.embed_smear (train.fused_embed): Triton on CUDA, the tables' gradients summed by token
        before they are added. KV-cached decoding keeps the plain path; imported here."""
        if not isinstance(self.bigram, ProductKeyBigram) or self.smear is None:
            raise ValueError("use_fused_embed needs model.bigram=product_key and model.smear_gate=true")
        from lmcore.embed_kernel import embed_smear

        self.embed_op = embed_smear

    def set_qat(self, bits: int) -> None:
        """Turn straight-through fake quantization of the block linears on (bits) or off (0)."""
        for b in self.blocks:
            for m in b.modules():
                if isinstance(m, CastedLinear):
                    m.qat_bits = bits

    def embedding_params(self) -> list[nn.Parameter]:
        """The embedding tables (token, bigram, value embedding)."""
        out = [self.tok_emb.weight]
        if isinstance(self.bigram, ProductKeyBigram):
            out += [self.bigram.embed_prev.weight, self.bigram.embed_cur.weight]
        elif isinstance(self.bigram, HashedBigram):
            out.append(self.bigram.embed.weight)
        if self.ve_shared is not None:
            out.append(self.ve_shared.embed.weight)
        return out

    def cast_embeddings(self, dtype: torch.dtype) -> None:
        """Store the embedding tables in `dtype` (bf16 on GPU, as the original does)."""
        for p in self.embedding_params():
            p.data = p.data.to(dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        ids: Tensor,
        targets: Tensor | None = None,
        reduction: str = "mean",
        latent: LatentMasks | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits (B, T, V) without targets; otherwise the cross-entropy with `reduction`
        ("mean", "sum" or "none" -> (B, T)). `latent` applies TTT masks; `cache` decodes
        one token per call (T == 1) against a KVCache."""
        if self.attention_fallback is not None and not self._fallback_warned and not torch.compiler.is_compiling():
            warnings.warn(self.attention_fallback, stacklevel=2)
            self._fallback_warned = True
        cfg = self.cfg
        x = self.embed(ids, cache)
        x0 = x
        if cache is not None:
            idx = cache.pos.view(1)
            rope = (cache.cos.index_select(0, idx), cache.sin.index_select(0, idx))
        elif self.rope_cos is not None and self.rope_cos.size(0) == ids.size(1):
            rope = (self.rope_cos, self.rope_sin)  # cache_rope's tables
        else:
            rope = rope_tables(cfg, ids.size(1), ids.device)
        ve_base = self.ve_shared(ids) if self.ve_shared is not None else None
        skips: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            ve = None
            if ve_base is not None and i in self.ve_layers:
                ve = ve_base * self.ve_layer_scales[self.ve_layers.index(i)].to(ve_base.dtype)
            x = block(x, x0, ve, rope, latent, cache)
            if i < self.num_encoder:
                skips.append(x)
        if cache is not None:
            cache.pos.add_(1)
        h = rms_norm(x)
        if self.ce_op is not None and targets is not None and reduction == "mean":  # GPT.use_fused_softcap_ce
            return self.ce_op(self.unembed(h).flatten(0, 1), targets.flatten(), self.cfg.logit_softcap).mean()
        logits = self.logits(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def embed(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Input stage: tok_emb + bigram, RMS norm, SmearGate (x0 of the blocks)."""
        cfg = self.cfg
        if cache is None:
            prev = previous_ids(ids, cfg.bos_mask, cfg.bos_id)
        else:
            prev = cache.prev_ids if ids.size(1) == 1 else None
            if prev is None:
                raise ValueError("KVCache decoding takes one token per call")
            # position 0 has no previous token; with bos_mask neither has a BOS token
            prev = torch.where(cache.pos == 0, torch.zeros_like(prev), prev)
            if cfg.bos_mask:
                prev = prev.masked_fill(ids == cfg.bos_id, 0)
        if self.embed_op is not None and cache is None:  # GPT.use_fused_embed: the same math, one op
            big, bos = self.bigram, cfg.bos_id if cfg.bos_mask else -1
            return self.embed_op(ids, prev, self.tok_emb.weight, big.embed_prev.weight, big.embed_cur.weight,
                                 big.scale, self.smear.gate, bos)
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids, prev)
        x = rms_norm(x)
        if self.smear is not None:
            if cache is None:
                prev_x = F.pad(x[:, :-1], (0, 0, 1, 0))
                keep = (ids != cfg.bos_id) if cfg.bos_mask else None
            else:
                prev_x = cache.prev_x.to(x.dtype) * (cache.pos > 0).to(x.dtype)
                keep = (ids != cfg.bos_id) if cfg.bos_mask else None
                cache.prev_x.copy_(x)
            x = self.smear(x, prev_x, keep)
        if cache is not None:
            cache.prev_ids.copy_(ids)
        return x

    def unembed(self, h: Tensor) -> Tensor:
        """The logits before the softcap: h times the tied embedding."""
        return F.linear(h, self.tok_emb.weight.to(h.dtype))

    def logits(self, h: Tensor) -> Tensor:
        z = self.unembed(h)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(z / cap) if cap > 0 else z


def param_counts(model: GPT) -> dict[str, int]:
    """Parameter counts, total and per component."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            sub = parts[2]
            key = {"attn": "blocks.attn", "mlp": "blocks.mlp"}.get(sub, "blocks.control")
            if sub == "attn" and parts[3] == "attn_gate":
                key = "blocks.attn_gate"
        elif parts[0] in ("ve_shared", "ve_layer_scales"):
            key = "value_embedding"
        else:
            key = parts[0]
        groups[key] = groups.get(key, 0) + p.numel()
    groups["total"] = sum(p.numel() for p in model.parameters())
    return groups
