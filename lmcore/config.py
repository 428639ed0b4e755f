"""Typed configuration for every lmcore job, its presets, overrides and JSON round trip.

A `Config` holds one dataclass per concern (model, data, train, quant, eval). Presets are
built once (`record` is SPEC.md exactly) and the others are derived from it with
`dataclasses.replace`, so a preset only states what differs. Overrides use the CLI form
`section.field=value`; values are parsed by the field's declared type, and any unknown
section, field or unparsable value raises `ConfigError` naming it.
"""

from __future__ import annotations

from lmcore.errors import InputError

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# A layer selection: "all", "none", "even", "odd", "last:N", or an explicit list of indices.
LayerSpec = str | list[int]


class ConfigError(InputError):
    """A configuration value, field or file is invalid; the message names it."""


def resolve_layers(spec: LayerSpec, num_layers: int, name: str = "layers") -> list[int]:
    """Turn a LayerSpec into a sorted list of layer indices, validating the range."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            out = list(range(num_layers))
        elif s == "none" or s == "":
            out = []
        elif s == "even":
            out = list(range(0, num_layers, 2))
        elif s == "odd":
            out = list(range(1, num_layers, 2))
        elif s.startswith("last:"):
            n = int(s.split(":", 1)[1])
            out = list(range(max(0, num_layers - n), num_layers))
        else:
            try:
                out = [int(p) for p in s.split(",") if p.strip()]
            except ValueError as e:
                raise ConfigError(f"{name}: cannot parse layer selection {spec!r}") from e
    else:
        out = [int(i) for i in spec]
    for i in out:
        if not 0 <= i < num_layers:
            raise ConfigError(f"{name}: layer {i} out of range for {num_layers} layers")
    return sorted(set(out))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_hidden: int = 1536
    leaky_slope: float = 0.5
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0  # <= 0 disables the tanh softcap
    rope_base: float = 10000.0
    rope_dims: int = 16  # rotary on the first rope_dims of each head; 0 = whole head
    rope_train_len: int = 1024  # past this length the rope base is rescaled (NTK)
    qk_gain_init: float = 1.5
    ln_scale: bool = True  # block inputs scaled by 1/sqrt(layer + 1)
    bigram: str = "product_key"  # product_key | hashed | none
    bigram_buckets: int = 2048  # hashed only
    bigram_dim: int = 128  # hashed only
    bigram_scale_init: float = 0.05
    smear_gate: bool = True
    unet_skips: bool = True
    xsa_layers: LayerSpec = "all"
    gated_attn_layers: LayerSpec = "even"
    gate_bias_init: float = 4.0
    ve_layers: LayerSpec = "5,7,10"
    ve_dim: int = 128
    ve_scale_init: float = 0.1
    bos_mask: bool = False  # SPEC 7: no mixing across documents in SmearGate and bigram
    bos_id: int = 1
    attention: str = "auto"  # auto | fa3 | fa2 | sdpa_flash | sdpa_cudnn | math
    qat_bits: int = 6  # late-QAT fake quantization: values in [-2^(b-1), 2^(b-1)-1]

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def validate(self) -> None:
        if self.model_dim % self.num_heads:
            raise ConfigError("model.model_dim must be divisible by model.num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("model.num_heads must be divisible by model.num_kv_heads")
        if self.head_dim % 2:
            raise ConfigError("model.head_dim (model_dim/num_heads) must be even for RoPE")
        if self.rope_dims % 2 or self.rope_dims > self.head_dim:
            raise ConfigError(f"model.rope_dims={self.rope_dims} must be even and <= head_dim")
        if self.bigram not in ("product_key", "hashed", "none"):
            raise ConfigError(f"model.bigram={self.bigram!r}: expected product_key, hashed or none")
        for name in ("xsa_layers", "gated_attn_layers", "ve_layers"):
            resolve_layers(getattr(self, name), self.num_layers, f"model.{name}")


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = "data/datasets/fineweb10B_sp1024"
    tokenizer: str = "data/tokenizers/fineweb_1024_bpe.model"
    train_pattern: str = "fineweb_train_*.bin"
    val_pattern: str = "fineweb_val_*.bin"
    seq_len: int = 2048
    val_max_tokens: int = 0  # 0 = the whole validation split


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1337
    iterations: int = 20000
    warmdown_iters: int = 3500
    compile_warmup_steps: int = 20
    batch_tokens: int = 786_432
    grad_accum: int = 8  # micro-batches per step on one process; divided by world size
    max_wallclock_seconds: float = 600.0  # 0 = no cap
    matrix_lr: float = 0.028
    muon_momentum: float = 0.99
    muon_momentum_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_ns_steps: int = 5
    muon_wd: float = 0.0417
    embed_lr: float = 0.035
    scalar_lr: float = 0.025
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.04
    grad_clip: float = 0.3
    ema_decay: float = 0.997
    ema: str = "original"  # original (starts at init) | bias_corrected | off
    compare_ema: bool = False  # also validate the other EMA mode's weights of the same run at the end
    # lmcore's own late QAT (off in every preset). The original's late QAT never runs: its switch is a class attribute
    # flipped inside a model compiled with fullgraph=True, which torch.compile constant-folds at the first trace
    # (openai/parameter-golf #315, #1032, #667). Measured on 2xH200, 400 steps with QAT "on" from step 1 (SPEC 8b):
    # the original's loss curve equals lmcore's without QAT to the 4th decimal (val_bpb 1.7997 vs 1.8002), while real
    # QAT gives 2.7617. So `record` trains without fake quantization, as the original effectively does. > 0: fake
    # int(model.qat_bits) (straight-through) in the block linears once the LR multiplier is below it (original: 0.15)
    lmcore_late_qat_threshold: float = 0.0
    val_every: int = 0  # steps between validations; 0 = only at the end
    log_every: int = 50
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = True  # torch.compile on CUDA (never on CPU)
    # torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune | reduce-overhead (CUDA graphs),
    # given to torch.compile as the mode's inductor options, so it combines with the switches below
    compile_mode: str = "default"
    # inductor's mix-order reduction (torch >= 2.11; parameter-golf #1420: +5.9 ms a backward on 8xH100), true = torch's
    # default. Off: 627.4/625.3 -> 592.8/595.1 ms a step on one H200 with rope_cache (RESULTS.md "Speed"); session 29's
    # fused column-sum kernels ran at 2.2 TB/s. A torch without the option ignores off.
    inductor_mix_order_reduction: bool = False
    inductor_coordinate_descent: bool = False  # inductor's Triton kernels' block sizes tuned at compile (the same math)
    rope_cache: bool = True  # RoPE tables computed once for data.seq_len (GPT.cache_rope), not in the graph
    # q/k RMSNorm + RoPE + q_gain as one op (lmcore.kernels: Triton on CUDA, the same math in PyTorch
    # elsewhere; the same math as the plain path up to fp32 rounding). The exported script embeds the kernels.
    fused_qk_norm_rope: bool = False
    # XSA + the attention gate as one op on the XSA layers (lmcore.xsa_kernel.xsa_gate; the same math up
    # to fp32 rounding). The exported script embeds the kernels.
    fused_xsa_gate: bool = False
    # The logit softcap and the training loss's cross-entropy as one op (lmcore.ce_kernel: Triton on CUDA); the
    # same math up to fp32 rounding and the tanh formula. The exported script embeds the kernels.
    fused_softcap_ce: bool = False
    # c_q, c_k and c_v as one GEMM on their weights concatenated (1024 x 512 at record's widths), then the q/k
    # op (as fused_qk_norm_rope's, which it subsumes) on the q and k slices of its output in place; the
    # backward writes q's, k's and v's gradients into one tensor, so the input's gradient is one GEMM and the
    # weights' gradients one GEMM (lmcore.kernels.qkv_norm_rope). The normed input is read once instead of
    # three times each way. The same math up to the GEMMs' accumulation order. KV-cached decoding keeps the
    # three GEMMs. The exported script embeds the kernels. k's kernels move v's rows out of (and its gradient
    # into) its slice. On one H200: 534.3 -> 525.4 ms a step (benchmarks/RESULTS.md, session 18).
    fused_qkv: bool = False
    # With fused_qkv and expand_kv: k's kernels also write v's heads repeated for attention, and sum those copies'
    # gradients with v's own (XSA's) in fp32 into v's slice of the fused gradient, in place of inductor's repeat
    # and sum kernels (3.3 + 3.9 ms a step on one H200, session 18's profile), on the layers without value
    # embeddings. The same math up to the sum's rounding. On one H200: 516.5 -> 513.3 ms a step (session 21).
    fused_qkv_repeat_v: bool = False
    # With fused_qkv: the gated layers' q/k/v GEMM also gives the attention gate's logits (its weight's rows appended),
    # so x is not read again for them, nor dx a GEMM of its own. The bias is added in fp32: a rounding apart.
    fused_qkv_gate: bool = False
    # FA3's backward takes rowsum(dO * O) from fused_xsa_gate's backward (lmcore.fa3_xsa; FA3 built with FA3_DPSUM=1)
    fa3_xsa_rowsum: bool = False
    # With fa3_xsa_rowsum and fused_qkv: FA3 skips its dQ postprocess and q's backward kernel reads FA3's fp32 dQ
    # accumulator instead of a bf16 dq (lmcore.fa3_xsa; FA3_DPSUM build). One bf16 rounding of dq fewer.
    fa3_dq_accum: bool = False
    # The MLP's LeakyReLU^2 as its first GEMM's epilogue, act' as the backward GEMM's (lmcore.mlp_kernel; the same
    # math up to the GEMMs' accumulation order; the exported script embeds it). One H200 (session 14, TMA kernel):
    # 541.3 -> 533.1 ms a step; losses within run-to-run noise (benchmarks/RESULTS.md).
    fused_mlp: bool = False
    # Where the fused MLP's TMA kernel builds its descriptors: device (each program, at its start; the launch
    # takes pointers) | host (at every launch). The same kernel body and numbers and step time (session 15).
    fused_mlp_descriptors: str = "device"
    # With fused_mlp: both of its GEMMs as lmcore.mlp_pingpong's warp-specialized kernel (Gluon, Hopper only;
    # elsewhere the TMA kernel): two consumer warpgroups take tiles in turn, one's epilogue beside the other's
    # GEMM. Its outputs equal the TMA kernel's bit for bit (benchmarks/mlp_pingpong_bench.py). Session 23, H200s:
    # 0.316 / 0.308 ms a call forward / backward against the TMA kernel's 0.359 / 0.417; in the fastest set on
    # 2 ranks 262.3 -> 257.2 ms a step, losses within the noise (benchmarks/RESULTS.md). Not with fused_mlp_sign.
    fused_mlp_pingpong: bool = False
    # With fused_mlp: its forward keeps post and pre's signs instead of pre, and its backward takes act'(pre) from
    # them (lmcore.mlp_kernel._dpre_sign_math); a deliberate rounding change. mlp_hidden a multiple of 32. Slower on
    # an H200 (session 19): 0.316 / 0.443 ms a call forward / backward against 0.339 / 0.403 without it.
    fused_mlp_sign: bool = False
    # k and v repeated to the query heads before attention (GQA run as MHA: FA3's backward then writes dk/dv without
    # its fp32 GQA accumulators and their converts); autograd, or the q/k kernel (fused_qk_norm_rope), sums the
    # copies' gradients: the same math up to those sums' order (GPT.use_expanded_kv). Session 10, one H200: 578.5 ->
    # 573.9 ms a step on the defaults, 1.6 GB more peak memory; losses within run-to-run noise (RESULTS.md).
    expand_kv: bool = False
    # With fused_qkv and fold_output_scales: the q/k/v GEMM reads the residual stream, and v's rows (and the gate's)
    # take its RMSNorm's scale in the q/k/v kernels; q/k's RMSNorm cancels it (GPT.fold_attn_norm). A rounding fewer.
    fold_attn_norm: bool = False
    # attn_scale and mlp_scale folded into the rows of the output projections they scale (GPT.fold_output_scales):
    # x + (diag(s) W) h as one GEMM instead of x + s * (W h), so the scaled branches are never written and the
    # backward takes ds and dW from the scaled weight's gradient instead of a column sum over the tokens. A
    # deliberate numeric change: s W is rounded to bf16 once before the GEMM, where the plain path rounds W h and
    # then s * (W h). LatentMask TTT keeps the plain path. On one H200 (session 17, with both fused ops, expand_kv
    # and fused_mlp): 534.1 -> 522.0 ms a step, max |dloss| 0.0138 over 200 steps (benchmarks/RESULTS.md).
    fold_output_scales: bool = False
    # The micro-batches' gradients summed with foreach adds, one a dtype (torch.autograd.grad, then
    # torch._foreach_add_ into .grad) instead of autograd's AccumulateGrad, one add kernel a parameter: the same
    # fp32 sums in the same order. Under DDP the last micro-batch keeps .backward() for the all-reduce. One H200
    # (session 16): 4 multi-tensor kernels an accumulation instead of 134 adds, 545.8 -> 543.1 ms a step; max
    # |dloss| 0.0329 over 200 steps (two plain runs: 0.0316). Off by default, like the other speed switches.
    foreach_grad_accum: bool = False
    # A step's tokens for this rank read into one pinned host buffer (int32, two used in turn) and copied to the GPU
    # at once (x and y cast to int64 there), instead of a pin and a copy of x and of y for every micro-batch. The same
    # batches, so on by default since session 22. There, on two H200s of one host (the fastest set), steady step minus
    # the profiled step's kernel time: 18.1 ms without it (GPU 0, 521.8 ms a step), 9.2 with it (GPU 1, 512.8 ms), the
    # GPU waiting for the first micro-batch's two pins; on 2 ranks the same step time (266.6 against 266.7 ms). false:
    # the pin-and-copy path, to ablate.
    step_batch_copy: bool = True
    ddp_bucket_cap_mb: float = 25.0  # DDP gradient bucket size (torch's default 25)
    ddp_grad_as_bucket_view: bool = False  # DDP gradients as views into its buckets (saves a copy)
    # A compiled model under DDP: dynamo splits its graph at DDP's buckets (torch's optimize_ddp), so each bucket's
    # all-reduce starts while the backward goes on. false: one graph (optimize_ddp off), the all-reduce after the
    # whole backward; the same math. Two H200s (session 24, the fastest set): 264.7 -> 258.1 ms a step on 2 ranks.
    ddp_split_graph: bool = True
    profile_step: int = 0  # > 0: profile that optimizer step into RUN/profile/ (lmcore.profiling)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32


@dataclass(frozen=True)
class QuantConfig:
    calib_seqs: int = 64
    calib_len: int = 2048
    calib_temperature: float = 0.8
    calib_seed: int = 42
    calib_batch: int = 64
    hessian_damp: float = 0.01
    int6_range: int = 31
    gptq_block: int = 128
    clip_quantiles: tuple[float, ...] = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
    passthrough_max_numel: int = 65_536
    int8_clip_percentile: float = 99.99984
    brotli_quality: int = 11
    device: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    seq_len: int = 2048
    stride: int = 64
    batch_seqs: int = 32
    ttt: bool = True
    ttt_lr: float = 0.0008
    ttt_epochs: int = 4
    ttt_chunk_tokens: int = 65_536
    ttt_momentum: float = 0.9
    ttt_batch_seqs: int = 32
    ttt_grad_clip: float = 1.0
    ttt_warmup_frac: float = 0.05
    ttt_flat_until: float = 0.70
    mask_init: float = 3.0
    compile: bool = True  # compile the scoring forward (CUDA)
    compile_train: bool = False  # also compile the mask-training step: pays off on long val sets


@dataclass(frozen=True)
class Config:
    name: str = "record"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        self.model.validate()
        _check_finite(self)
        for key in _POSITIVE:
            sec, name = key.split(".")
            v = getattr(getattr(self, sec), name)
            if v <= 0:
                raise ConfigError(f"{key}={v} must be positive")
        for key in _NON_NEGATIVE:
            sec, name = key.split(".")
            v = getattr(getattr(self, sec), name)
            if v < 0:
                raise ConfigError(f"{key}={v} must be >= 0")
        if self.train.batch_tokens % (self.train.grad_accum * self.data.seq_len):
            raise ConfigError(
                f"train.batch_tokens={self.train.batch_tokens} must be a multiple of "
                f"train.grad_accum * data.seq_len = {self.train.grad_accum * self.data.seq_len}"
            )
        if self.train.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"train.compile_mode={self.train.compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
        if self.train.fused_mlp_descriptors not in ("device", "host"):
            raise ConfigError(f"train.fused_mlp_descriptors={self.train.fused_mlp_descriptors!r}: expected device or host")
        if self.train.fused_qkv_repeat_v and not (self.train.fused_qkv and self.train.expand_kv):
            raise ConfigError("train.fused_qkv_repeat_v=true needs train.fused_qkv=true and train.expand_kv=true")
        if self.train.fa3_xsa_rowsum and not (self.train.fused_xsa_gate and self.train.expand_kv):
            raise ConfigError("train.fa3_xsa_rowsum=true needs train.fused_xsa_gate=true and train.expand_kv=true")
        if self.train.fa3_dq_accum and not (self.train.fa3_xsa_rowsum and self.train.fused_qkv):
            raise ConfigError("train.fa3_dq_accum=true needs train.fa3_xsa_rowsum=true and train.fused_qkv=true")
        if self.train.fused_qkv_gate and not self.train.fused_qkv:
            raise ConfigError("train.fused_qkv_gate=true needs train.fused_qkv=true")
        if self.train.fold_attn_norm and not (self.train.fused_qkv and self.train.fold_output_scales):
            raise ConfigError("train.fold_attn_norm=true needs train.fused_qkv=true and train.fold_output_scales=true")
        if self.train.fused_mlp_pingpong and not self.train.fused_mlp:
            raise ConfigError("train.fused_mlp_pingpong=true needs train.fused_mlp=true")
        if self.train.fused_mlp_pingpong and self.train.fused_mlp_sign:
            raise ConfigError("train.fused_mlp_pingpong=true does not take train.fused_mlp_sign=true")
        if self.train.fused_mlp_sign and not self.train.fused_mlp:
            raise ConfigError("train.fused_mlp_sign=true needs train.fused_mlp=true")
        if self.train.fused_mlp_sign and self.model.mlp_hidden % 32:
            raise ConfigError(f"train.fused_mlp_sign=true needs model.mlp_hidden a multiple of 32, "
                              f"not {self.model.mlp_hidden}")
        if self.train.ema not in ("original", "bias_corrected", "off"):
            raise ConfigError(f"train.ema={self.train.ema!r}: expected original, bias_corrected or off")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> None:
        from lmcore.runs import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "config") -> Config:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(Config):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name == "name":
                kwargs["name"] = str(v)
                continue
            cls = _SECTIONS[f.name]
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: section {f.name!r} must be an object")
            known = {ff.name: ff for ff in dataclasses.fields(cls)}
            sec: dict[str, Any] = {}
            for k, val in v.items():
                if k not in known:
                    raise ConfigError(f"{source}: unknown field {f.name}.{k}" + _RENAMED.get(f"{f.name}.{k}", ""))
                sec[k] = _coerce(val, _field_type(cls, k), f"{f.name}.{k}")
            kwargs[f.name] = cls(**sec)
        unknown = set(d) - {f.name for f in dataclasses.fields(Config)}
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}")
        return Config(**kwargs).validate()

    @staticmethod
    def load(path: str | Path) -> Config:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{p}: config file not found") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return Config.from_dict(d, source=str(p))

    def override(self, assignments: list[str] | None) -> Config:
        """Apply `section.field=value` strings; returns a new validated Config."""
        cfg = self
        for a in assignments or []:
            if "=" not in a:
                raise ConfigError(f"override {a!r}: expected section.field=value")
            key, raw = a.split("=", 1)
            parts = key.strip().split(".")
            if len(parts) != 2 or parts[0] not in _SECTIONS:
                raise ConfigError(f"override {a!r}: key must be one of {sorted(_SECTIONS)}.<field>")
            sec_name, fname = parts
            cls = _SECTIONS[sec_name]
            if fname not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"override {a!r}: unknown field {sec_name}.{fname}" + _RENAMED.get(key.strip(), ""))
            val = _parse_str(raw.strip(), _field_type(cls, fname), key)
            cfg = replace(cfg, **{sec_name: replace(getattr(cfg, sec_name), **{fname: val})})
        return cfg.validate()


# Fields that were renamed: the message for a config or override that still uses the old name.
_RENAMED = {
    "train.late_qat_threshold": (
        " (renamed train.lmcore_late_qat_threshold: lmcore's own late QAT, off by default because the "
        "original's late QAT never runs, SPEC section 3)"
    ),
}

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "quant": QuantConfig, "eval": EvalConfig}


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(val: Any, tp: Any, key: str) -> Any:
    """Coerce a JSON value to a declared field type."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if not isinstance(val, bool):
                raise TypeError
            return val
        if tp is int:
            if isinstance(val, bool) or (isinstance(val, float) and not val.is_integer()):
                raise TypeError
            return int(val)
        if tp is float:
            if isinstance(val, bool):
                raise TypeError
            return float(val)
        if tp is str:
            if not isinstance(val, str):
                raise TypeError
            return val
        if origin is tuple:
            return tuple(float(x) for x in val)
        if tp == LayerSpec or origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            if isinstance(val, str):
                return val
            return [int(x) for x in val]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: value {val!r} is not a valid {getattr(tp, '__name__', tp)}") from e
    return val


def _parse_str(raw: str, tp: Any, key: str) -> Any:
    """Parse the text of a CLI override for a declared field type."""
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: {raw!r} is not a boolean (true/false)")
    if tp is str:
        return raw
    if tp is int or tp is float:
        try:
            return tp(float(raw)) if tp is int and float(raw).is_integer() else tp(raw)
        except ValueError as e:
            raise ConfigError(f"{key}: {raw!r} is not a valid {tp.__name__}") from e
    if typing.get_origin(tp) is tuple:
        try:
            return tuple(float(x) for x in raw.strip("()[]").split(",") if x.strip())
        except ValueError as e:
            raise ConfigError(f"{key}: {raw!r} is not a list of numbers") from e
    # LayerSpec: keep keywords as strings, turn "1,2,3" / "[1,2]" into a list
    s = raw.strip("[]")
    if s and all(p.strip().lstrip("-").isdigit() for p in s.split(",")):
        return [int(p) for p in s.split(",")]
    return raw


# Integer fields that must be >= 1, and numbers that must be >= 0 (checked by Config.validate).
_POSITIVE = (
    "model.vocab_size", "model.num_layers", "model.model_dim", "model.num_heads", "model.num_kv_heads",
    "model.mlp_hidden", "data.seq_len", "train.iterations", "train.batch_tokens", "train.grad_accum",
    "train.ddp_bucket_cap_mb", "quant.calib_seqs", "quant.calib_len", "quant.calib_batch", "quant.gptq_block", "eval.seq_len",
    "eval.stride", "eval.batch_seqs", "eval.ttt_chunk_tokens", "eval.ttt_batch_seqs",
)
_NON_NEGATIVE = (
    "train.warmdown_iters", "train.compile_warmup_steps", "train.max_wallclock_seconds", "train.matrix_lr",
    "train.embed_lr", "train.scalar_lr", "train.grad_clip", "train.lmcore_late_qat_threshold", "train.val_every",
    "train.log_every", "train.checkpoint_every", "data.val_max_tokens", "eval.ttt_lr", "eval.ttt_epochs",
    "train.profile_step",
)


def _check_finite(cfg: Config) -> None:
    """Every float field is finite (a NaN learning rate would train on NaN silently)."""
    for sec in _SECTIONS:
        section = getattr(cfg, sec)
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in vals):
                raise ConfigError(f"{sec}.{f.name}={v!r} must be a finite number")


# ---------------------------------------------------------------------------- presets

RECORD = Config(name="record")

PROXY1 = replace(
    RECORD,
    name="proxy1",
    data=replace(RECORD.data, data_dir="data/proxy"),
    train=replace(RECORD.train, batch_tokens=196_608, iterations=1000, warmdown_iters=400, max_wallclock_seconds=0.0),
)

SMOKE = replace(
    RECORD,
    name="smoke",
    model=replace(
        RECORD.model,
        num_layers=4,
        model_dim=64,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden=192,
        rope_dims=8,
        rope_train_len=64,
        ve_layers="2,3",
        ve_dim=32,
        attention="auto",
    ),
    data=replace(RECORD.data, data_dir="data/smoke", tokenizer="data/smoke/tokenizer.model", seq_len=128),
    train=replace(
        RECORD.train,
        iterations=200,
        warmdown_iters=60,
        compile_warmup_steps=0,
        batch_tokens=4096,
        grad_accum=2,
        max_wallclock_seconds=0.0,
        muon_momentum_warmup_steps=50,
        matrix_lr=0.02,
        embed_lr=0.03,
        scalar_lr=0.02,
        log_every=20,
        val_every=50,
        compile=False,
        ema="bias_corrected",  # the original's EMA from init ruins short runs (SPEC 7)
    ),
    quant=replace(RECORD.quant, calib_seqs=4, calib_len=128, calib_batch=4, passthrough_max_numel=4096, gptq_block=32),
    eval=replace(RECORD.eval, seq_len=128, stride=32, batch_seqs=16, ttt_chunk_tokens=2048, ttt_epochs=1, ttt_batch_seqs=8, ttt_lr=0.002, compile=False),
)

# The GPU study's proxy run (runs/README.md): proxy1 cut to 500 steps of 196,608 tokens (98M
# tokens, about 100 s on one H200), warmdown 200 (proxy1's 40%). The EMA is bias_corrected:
# the original's EMA starts at the initial weights and keeps 0.997^500 = 22% of them after 500
# steps, against 0.997^7000 < 1e-9 in a record run, where the two modes are equal; with
# compare_ema both modes of every run are validated, which is the EMA ablation.
PROXY500 = replace(
    PROXY1,
    name="proxy500",
    train=replace(PROXY1.train, iterations=500, warmdown_iters=200, ema="bias_corrected", compare_ema=True),
)

# The smoke model and data made tiny: every phase (train, pack, eval with TTT) in seconds on a
# CPU, to exercise a notebook or a study end to end, not to measure anything. 10 steps of
# 2,048 tokens, a 2,048-token validation slice, EMA off (10 steps are too few for decay 0.997).
TINY = replace(
    SMOKE,
    name="tiny",
    data=replace(SMOKE.data, val_max_tokens=2048),
    train=replace(
        SMOKE.train, iterations=10, warmdown_iters=4, batch_tokens=2048, grad_accum=1, val_every=5, log_every=2,
        ema="off",
    ),
    quant=replace(SMOKE.quant, calib_seqs=2, calib_len=64),
    eval=replace(SMOKE.eval, stride=64, ttt_chunk_tokens=512),
)

PRESETS: dict[str, Config] = {"record": RECORD, "proxy1": PROXY1, "proxy500": PROXY500, "smoke": SMOKE, "tiny": TINY}


def is_smoke_config(cfg: Config) -> bool:
    """Whether `cfg` trains on the smoke corpus (data and tokenizer where `smoke` keeps them):
    then training builds that corpus itself when it is missing."""
    same = lambda a, b: os.path.normpath(a) == os.path.normpath(b)  # noqa: E731
    return same(cfg.data.data_dir, SMOKE.data.data_dir) and same(cfg.data.tokenizer, SMOKE.data.tokenizer)


def preset(name: str, overrides: list[str] | None = None) -> Config:
    """A preset by name, with optional `section.field=value` overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].override(overrides)
