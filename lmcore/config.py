"""Typed configuration for every lmcore job, its presets, overrides and JSON round trip.

A `Config` holds one dataclass per concern (model, data, train, quant, eval). Presets are
built once (`record` is SPEC.md exactly) and the others are derived from it with
`dataclasses.replace`, so a preset only states what differs. Overrides use the CLI form
`section.field=value`; values are parsed by the field's declared type, and any unknown
section, field or unparsable value raises `ConfigError` naming it. The train section's
dataclass, with the speed switches, lives in `lmcore.train_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmcore.errors import InputError
from lmcore.train_config import COMPILE_MODES, TrainConfig

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
        if self.train.fused_resid_mix and not self.train.fold_attn_norm:
            raise ConfigError("train.fused_resid_mix=true needs train.fold_attn_norm=true")
        if self.train.fused_embed and not (self.model.bigram == "product_key" and self.model.smear_gate):
            raise ConfigError("train.fused_embed=true needs model.bigram=product_key and model.smear_gate=true")
        if self.train.inductor_mix_order_tuning and not self.train.inductor_mix_order_reduction:
            raise ConfigError("train.inductor_mix_order_tuning=true needs train.inductor_mix_order_reduction=true")
        if self.train.fused_mlp_pingpong and not self.train.fused_mlp:
            raise ConfigError("train.fused_mlp_pingpong=true needs train.fused_mlp=true")
        if self.train.fused_mlp_quarter_tiles and not (self.train.fused_mlp_pingpong and not self.train.fused_mlp_sign):
            raise ConfigError("train.fused_mlp_quarter_tiles=true needs train.fused_mlp_pingpong=true and "
                              "train.fused_mlp_sign=false")
        if self.train.mlp_zeroes_dq_accum and not (self.train.fa3_dq_accum and self.train.fused_mlp_pingpong):
            raise ConfigError("train.mlp_zeroes_dq_accum=true needs train.fa3_dq_accum=true and "
                              "train.fused_mlp_pingpong=true")
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

# record with issue 16's speed switches that need no FA3 build of lmcore's own: the q/k/v, XSA, MLP (ping-pong on
# Hopper) and softcapped cross-entropy kernels, the output scales and attention's input norm folded into the GEMMs,
# the gate's logits from the q/k/v GEMM, summed gradients by foreach, CUDA graphs, one DDP graph. Each is the same
# math on CPU or a named rounding change (README, "Speed"); `record` stays the study's baseline. With FA3 built
# FA3_DPSUM=1, train.fa3_xsa_rowsum and train.fa3_dq_accum add on top (benchmarks/lever_sets.sh's GATE set).
RECORD_FAST = replace(
    RECORD,
    name="record_fast",
    train=replace(
        RECORD.train, fused_qkv=True, fused_qkv_repeat_v=True, fused_xsa_gate=True, expand_kv=True, fused_mlp=True,
        fold_output_scales=True, foreach_grad_accum=True, compile_mode="reduce-overhead", fused_mlp_pingpong=True,
        ddp_split_graph=False, fused_softcap_ce=True, fold_attn_norm=True, fused_qkv_gate=True,
    ),
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

PRESETS: dict[str, Config] = {"record": RECORD, "record_fast": RECORD_FAST, "proxy1": PROXY1, "proxy500": PROXY500,
                               "smoke": SMOKE, "tiny": TINY}


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
