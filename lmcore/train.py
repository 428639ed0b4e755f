"""Training (SPEC section 4): `train(cfg, run_dir)` and the `lmcore train` command.

One loop serves one process or several under torchrun (DDP, gradient sync only on the
last micro-batch; NCCL on GPU, gloo on CPU). Each step takes `batch_tokens` tokens as
grad_accum / world_size micro-batches per rank, clips the global gradient norm, and
steps Muon (matrices) and AdamW (embeddings, control tensors) with the LR multiplier of
`lmcore.optim.lr_multiplier` and the Muon momentum warm-up. On CUDA the model is
compiled (fullgraph, static shapes) and `compile_warmup_steps` steps run first (late-QAT
graph included) after which weights, optimizer states and loader are restored; training
time excludes that warm-up, validations and checkpoint writes. lmcore's own late QAT (off
in every preset: the original's never runs, SPEC section 3) switches on when the
multiplier drops below `lmcore_late_qat_threshold`; starting within the first 10% of the
run is flagged in the log and summary.json (`qat_warning`). An EMA (fp32, `ema_decay`) of all
weights is kept in one of three modes: "original" (starts at the initial weights, as the
seed), "bias_corrected" (starts at zero and divides by 1 - decay^steps, so the initial
weights carry no weight), "off". At the end the raw and the EMA weights are both
evaluated (val loss and bpb over seq_len sequences) and the EMA (raw if off) are kept.

Run folder: config.json, metrics.jsonl (train / val / event lines), summary.json,
model.pt ({"model": state_dict on CPU, "config": dict}) and checkpoints/step_NNNNNN.pt
(model, optimizers, EMA, loader position, step, train time, QAT flag, RNG states), all
written atomically by rank 0. `train(..., resume=True)` continues from the latest
readable checkpoint bit-exactly (on CPU; an unreadable one is named and skipped);
`max_steps` ends a session early with a checkpoint.

Never silent: rank 0 holds RUN/.lock for the whole job (a second job on the folder stops at
once); everything that can be checked (config, shards, tokenizer) is checked before the
folder is written; a non-finite gradient norm (checked every step, one step late so the GPU
never waits) stops training with `NonFiniteLoss` and saves nothing after the last good
checkpoint; SIGTERM (preemption) ends the session at the next step with a checkpoint
(stopped_by "sigterm"), so a run killed before its first periodic checkpoint still resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from lmcore.config import Config, ConfigError, is_smoke_config
from lmcore.errors import InputError, InputNotFound
from lmcore.optim import build_optimizers, lr_multiplier, muon_momentum
from lmcore.runs import RunLock, append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from lmcore.runtime import (
    DistInfo,
    autocast,
    card_name,
    dist_from_env,
    git_commit,
    init_distributed,
    pick_device,
    seed_all,
    shutdown_distributed,
    synchronize,
    use_bf16,
)

__all__ = [
    "EMA", "NonFiniteLoss", "RESUMABLE_FIELDS", "RunResult", "evaluate_val", "latest_checkpoint", "register_cli", "train",
]

# Fields that may differ between a run's config.json and the config it is resumed with.
RESUMABLE_FIELDS = ("train.iterations", "train.max_wallclock_seconds", "train.log_every", "train.checkpoint_every")
CHECKPOINT_FORMAT = 1
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
SINGLE_PROCESS = DistInfo()  # the default: one process, rank 0
QAT_EARLY_FRACTION = 0.10  # lmcore's QAT starting before this fraction of the run is flagged
EXIT_SIGTERM = 143  # the CLI's exit status after a SIGTERM checkpoint (128 + 15)


class NonFiniteLoss(InputError):
    """Training produced a NaN/inf loss or gradient norm; nothing was saved after the last good checkpoint."""


@dataclass
class RunResult:
    """What `train` returns; also written as summary.json."""

    run_dir: str
    preset: str
    completed: bool  # False when the session ended early (max_steps, sigterm); resume to finish
    stopped_by: str  # iterations | wallclock | max_steps | sigterm
    steps: int
    tokens: int
    wall_time_s: float  # this session, start to end
    train_time_s: float  # all sessions; excludes warm-up, validation, checkpoints
    tokens_per_s: float
    mean_step_ms: float
    peak_memory_mib: float | None  # CUDA max allocated (None on CPU)
    peak_rss_mib: float
    val_loss_raw: float | None
    val_bpb_raw: float | None
    val_loss_ema: float | None
    val_bpb_ema: float | None
    val_loss: float | None  # of the final weights (EMA, or raw when ema=off)
    val_bpb: float | None
    ema: str
    ema_alt: str | None  # with compare_ema: the other EMA mode, derived from the same run
    val_loss_ema_alt: float | None
    val_bpb_ema_alt: float | None
    qat_step: int | None  # lmcore's own late QAT (None: never on, as the original effectively trains)
    qat_warning: str | None  # set when that QAT started within the first 10% of the run
    attention_requested: str  # model.attention as configured ("auto" or a backend)
    attention_backend: str  # the backend that ran
    world_size: int
    grad_accum_per_rank: int
    seed: int
    device: str
    card: str
    compiled: bool
    git_commit: str | None
    torch_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- EMA


class EMA:
    """fp32 exponential moving average of every tensor of a model's state_dict.

    mode "original": the shadow starts at the current (initial) weights, as the seed;
    "bias_corrected": the shadow starts at zero and `weights()` divides by
    1 - decay^steps, so the initial weights carry no weight. The initial weights are kept
    (fp32, on the CPU) so that `weights(other_mode)` gives the other mode's average of
    the same run exactly: original = zero-started + decay^n * w0. Updates use foreach ops.
    """

    MODES = ("original", "bias_corrected")

    def __init__(self, model: nn.Module, decay: float, mode: str = "original"):
        if mode not in self.MODES:
            raise ValueError(f"EMA mode {mode!r}: expected one of {', '.join(self.MODES)}")
        self.decay, self.mode = float(decay), mode
        sd = model.state_dict()
        self.names = list(sd.keys())
        self._src = list(sd.values())  # alias the model's storage (updated in place)
        self.init = [t.detach().to("cpu", torch.float32, copy=True) for t in self._src]
        if mode == "original":
            self.shadow = [t.detach().float().clone() for t in self._src]
        else:
            self.shadow = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in self._src]
        self.steps = 0
        self._f32 = [i for i, t in enumerate(self._src) if t.dtype == torch.float32]
        self._other = [i for i, t in enumerate(self._src) if t.dtype != torch.float32]

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
        sh = self.shadow
        dst = [sh[i] for i in self._f32]
        if dst:
            torch._foreach_mul_(dst, d)
            torch._foreach_add_(dst, [self._src[i] for i in self._f32], alpha=1.0 - d)
        for i in self._other:
            sh[i].mul_(d).add_(self._src[i].float(), alpha=1.0 - d)
        self.steps += 1

    @torch.no_grad()
    def weights(self, mode: str | None = None) -> dict[str, Tensor]:
        """The averaged weights (fp32) of `mode` (default: this EMA's own mode)."""
        mode = mode or self.mode
        if mode not in self.MODES:
            raise ValueError(f"EMA mode {mode!r}: expected one of {', '.join(self.MODES)}")
        dn = self.decay**self.steps
        out = {}
        for n, s, w0 in zip(self.names, self.shadow, self.init):
            if mode == self.mode == "original":
                out[n] = s.clone()
            elif mode == "original":  # zero-started shadow + the initial weights' share
                out[n] = s + dn * w0.to(s.device)
            elif self.steps == 0:  # bias corrected, nothing averaged yet: the initial weights
                out[n] = w0.to(s.device).clone()
            elif self.mode == "bias_corrected":
                out[n] = s / (1.0 - dn)
            else:  # from the original shadow: remove the initial weights' share
                out[n] = (s - dn * w0.to(s.device)) / (1.0 - dn)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "decay": self.decay,
            "steps": self.steps,
            "shadow": {n: s.detach().cpu() for n, s in zip(self.names, self.shadow)},
            "init": dict(zip(self.names, self.init)),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"EMA state has mode {state['mode']!r}, this run uses {self.mode!r}")
        if set(state["shadow"]) != set(self.names):
            raise ValueError("EMA state does not match the model's tensors")
        for n, s, w0 in zip(self.names, self.shadow, self.init):
            s.copy_(state["shadow"][n])
            w0.copy_(state["init"][n])
        self.steps = int(state["steps"])


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_val(
    model: nn.Module,
    val_tokens: Tensor,
    seq_len: int,
    tables: Any,
    device: torch.device,
    bf16: bool,
    rank: int = 0,
    world_size: int = 1,
    batch_tokens: int = 65_536,
) -> dict[str, float]:
    """Plain validation: val_tokens cut into seq_len sequences, every target scored once.

    Sequences are split evenly across ranks and the sums all-reduced. Returns
    {"loss": nats/token, "bpb", "tokens", "bytes"} (lmcore.bpb byte counting).
    """
    from lmcore.bpb import BpbMeter

    n_seqs = (val_tokens.numel() - 1) // seq_len
    lo, hi = (n_seqs * rank) // world_size, (n_seqs * (rank + 1)) // world_size
    per_batch = max(1, batch_tokens // seq_len)
    meter = BpbMeter(tables, device)
    was_training = model.training
    model.eval()
    try:
        for s in range(lo, hi, per_batch):
            e = min(s + per_batch, hi)
            chunk = val_tokens[s * seq_len : e * seq_len + 1].to(device=device, dtype=torch.int64)
            x = chunk[:-1].view(-1, seq_len)
            y = chunk[1:].view(-1, seq_len)
            with autocast(device, bf16):
                nll = model(x, y, reduction="none")
            meter.add(nll.float(), x, y)
    finally:
        model.train(was_training)
    meter.all_reduce()
    d = meter.as_dict()
    return {"loss": d["loss"], "bpb": d["bpb"], "tokens": d["tokens"], "bytes": d["bytes"]}


# ---------------------------------------------------------------------------- run folder


def checkpoints(run_dir: str | Path) -> list[Path]:
    """run_dir/checkpoints/step_*.pt, highest step first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in run_dir/checkpoints (None if none)."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def load_resumable_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint that loads: (path, state, notes naming each unreadable newer one).

    Raises InputError naming every file when none loads.
    """
    notes: list[str] = []
    for path in checkpoints(run_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not an lmcore checkpoint of format {CHECKPOINT_FORMAT}")
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
            notes.append(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            continue
        return path, state, notes
    raise InputError(f"{run_dir}: no readable checkpoint to resume from: " + "; ".join(notes))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _check_resume_config(run_dir: Path, cfg: Config) -> None:
    path = run_dir / "config.json"
    if not path.is_file():
        raise InputNotFound(f"{run_dir}: cannot resume, no config.json in the run folder")
    saved = Config.load(path)
    a, b = _flat(saved.to_dict()), _flat(cfg.to_dict())
    diffs = [
        f"{k} ({a.get(k)!r} in config.json, {b.get(k)!r} now)"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS
    ]
    if diffs:
        raise ConfigError(
            f"{run_dir}: cannot resume with a different configuration: "
            + "; ".join(diffs)
            + f" (only {', '.join(RESUMABLE_FIELDS)} may change)"
        )


def _prepare_run_dir(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Validate the folder for a fresh run or a resume."""
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise InputNotFound(
                f"{run_dir}: nothing to resume: no checkpoints/step_*.pt in the run folder"
                + ("" if run_dir.exists() else " (the folder does not exist)")
            )
        _check_resume_config(run_dir, cfg)
        return
    if (run_dir / "model.pt").exists() or latest_checkpoint(run_dir) is not None:
        raise InputError(
            f"{run_dir}: already holds a run (model.pt or checkpoints); resume it with --resume "
            "or choose another --run-dir"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines a resumed session will write again (after checkpoint `step`)."""
    if not path.exists():
        return
    keep = [
        r
        for r in read_jsonl(path)
        if (r.get("kind") == "train" and r.get("step", 0) <= step)
        or (r.get("kind") != "train" and r.get("step", 0) < step)
    ]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}



def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------- training


def train(
    cfg: Config,
    run_dir: str | Path,
    dist: DistInfo = SINGLE_PROCESS,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    compare_ema: bool = False,
) -> RunResult:
    """Train `cfg` into `run_dir` (see the module docstring); returns the RunResult.

    `dist` gives rank / world size (the process group is created here when needed, and
    destroyed at the end if created here). `resume` continues from the latest checkpoint.
    `max_steps` ends this session after that many optimizer steps, with a checkpoint
    (completed=False); the schedule still runs to cfg.train.iterations. `compare_ema`
    also evaluates the other EMA mode (original vs bias_corrected) of the same run (the
    kept weights are still the configured mode's). SIGTERM, when this runs in the main
    thread, ends the session at the next step with a checkpoint (stopped_by "sigterm").
    """
    wall0 = time.perf_counter()
    cfg = cfg.validate()
    tc = cfg.train
    if tc.grad_accum % dist.world_size:
        raise ConfigError(f"train.grad_accum={tc.grad_accum} is not divisible by the world size {dist.world_size}")
    accum = tc.grad_accum // dist.world_size
    if max_steps is not None and max_steps < 0:
        raise InputError(f"max_steps must be >= 0, got {max_steps}")
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    lock = RunLock(run_dir, "lmcore train").acquire() if dist.is_main else None
    created_pg = False
    try:
        _prepare_run_dir(run_dir, cfg, resume)
        device = pick_device(tc.device, dist.local_rank)
        created_pg = dist.distributed and not tdist.is_initialized()
        init_distributed(dist, device)
        with _StopSignal() as stop:
            return _train(cfg, run_dir, dist, accum, device, resume, progress, max_steps, compare_ema, wall0, stop)
    except BaseException:
        if lock is not None and not existed and {p.name for p in run_dir.iterdir()} <= {".lock"}:
            lock.release()
            lock = None
            (run_dir / ".lock").unlink(missing_ok=True)
            run_dir.rmdir()  # nothing was written: leave no half-started folder behind
        raise
    finally:
        if created_pg:
            shutdown_distributed()
        if lock is not None:
            lock.release()


class _StopSignal:
    """While active (main thread only), SIGTERM sets `requested` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class _FiniteWatch:
    """Checks every step's gradient norm for NaN/inf without making the GPU wait.

    On CUDA each step's flag is copied to pinned host memory asynchronously and read one
    step later (by then it is long done); on CPU it is read at once. `push` and `flush`
    return the first bad step seen, or None. The gradient norm is computed after DDP's
    all-reduce, so every rank sees the same flags and stops at the same step.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.bool, pin_memory=self.cuda)
        self.pending: list[tuple[int, int, Any]] = []  # (slot, step, event)
        self.n = 0

    def push(self, step: int, grad_norm: Tensor) -> int | None:
        bad = ~torch.isfinite(grad_norm)
        if not self.cuda:
            return step if bool(bad) else None
        slot = self.n % 2
        self.n += 1
        self.host[slot].copy_(bad, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.pending.append((slot, step, ev))
        return self._check(keep=1)

    def flush(self) -> int | None:
        return self._check(keep=0)

    def _check(self, keep: int) -> int | None:
        first = None
        while len(self.pending) > keep:
            slot, step, ev = self.pending.pop(0)
            ev.synchronize()
            if first is None and bool(self.host[slot]):
                first = step
        return first


def _train(
    cfg: Config,
    run_dir: Path,
    dist: DistInfo,
    accum: int,
    device: torch.device,
    resume: bool,
    progress: bool,
    max_steps: int | None,
    compare_ema: bool,
    wall0: float,
    stop: _StopSignal,
) -> RunResult:
    from lmcore.bpb import ByteTables
    from lmcore.data import DistributedTokenLoader, load_val_tokens
    from lmcore.model import GPT

    tc, main = cfg.train, dist.is_main
    say = (lambda msg: print(msg, flush=True)) if (progress and main) else (lambda msg: None)

    def barrier() -> None:
        if dist.distributed:
            tdist.barrier()

    # ---- data first: a bad shard, tokenizer or checkpoint is reported before anything is written
    if main and is_smoke_config(cfg):
        from lmcore.smoke_data import ensure_smoke_data

        ensure_smoke_data(cfg.data.data_dir, cfg.data.tokenizer, progress=progress)
    barrier()
    bf16 = use_bf16(device, tc.precision)
    seq_len = cfg.data.seq_len
    vocab = cfg.model.vocab_size  # every shard read is checked against it (an id past it is named, never indexed)
    loader = DistributedTokenLoader(cfg.data.data_dir, cfg.data.train_pattern, dist.rank, dist.world_size, vocab_size=vocab)
    val_tokens = load_val_tokens(cfg.data.data_dir, cfg.data.val_pattern, seq_len, cfg.data.val_max_tokens, vocab_size=vocab)
    tables = ByteTables.from_sentencepiece(cfg.data.tokenizer, cfg.model.vocab_size).to(device)
    if tables.size > cfg.model.vocab_size:
        raise ConfigError(
            f"{cfg.data.tokenizer}: tokenizer has {tables.size} pieces, more than model.vocab_size={cfg.model.vocab_size}"
        )
    ckpt_path: Path | None = None
    ckpt: dict[str, Any] | None = None
    if resume:
        ckpt_path, ckpt, unreadable = load_resumable_checkpoint(run_dir)
        for note in unreadable:
            if main:
                print(f"warning: {note}; resuming from {ckpt_path.name} instead", file=sys.stderr, flush=True)

    # ---- run folder
    metrics = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt_path is None:
            metrics.unlink(missing_ok=True)
        cfg.save(run_dir / "config.json")
    barrier()

    def log(obj: dict[str, Any]) -> None:
        if main:
            append_jsonl(metrics, obj)

    # ---- model and optimizers
    seed_all(tc.seed)
    model = GPT(cfg.model).to(device)
    if device.type == "cuda" and bf16:
        model.cast_embeddings(torch.bfloat16)
    backend = model.set_attention_backend(cfg.model.attention, device)
    opt = build_optimizers(model, tc)
    compiled = device.type == "cuda" and tc.compile
    fwd: nn.Module = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
    ddp: nn.parallel.DistributedDataParallel | None = None
    if dist.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    train_model = ddp if ddp is not None else fwd
    n_params = sum(p.numel() for p in model.parameters())
    qat_possible = tc.lmcore_late_qat_threshold > 0 and cfg.model.qat_bits > 0 and tc.warmdown_iters > 0

    pin = device.type == "cuda"

    def to_device(t: Tensor) -> Tensor:
        # from pinned memory the copy is truly asynchronous; a pageable source would make
        # the host wait for the GPU's queue to drain at every micro-batch
        return (t.pin_memory() if pin else t).to(device, non_blocking=True)

    def train_step() -> Tensor:
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = loader.next_batch(tc.batch_tokens, seq_len, accum)
            x, y = to_device(x), to_device(y)
            sync = contextlib.nullcontext() if ddp is None or micro == accum - 1 else ddp.no_sync()
            with sync:
                with autocast(device, bf16):
                    loss = train_model(x, y)
                (loss * (1.0 / accum)).backward()
            loss_sum += loss.detach()
        # the norm (after DDP's all-reduce, so equal on every rank) also flags NaN/inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        opt.step()
        opt.zero_grad()
        return loss_sum / accum, grad_norm

    # ---- state: fresh or from a checkpoint
    step, train_ms, qat_on, qat_step = 0, 0.0, False, None
    qat_warning: str | None = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizers"])
        loader.load_state_dict(ckpt["loader"])
        step, train_ms = int(ckpt["step"]), float(ckpt["train_ms"])
        qat_on, qat_step = bool(ckpt["qat"]), ckpt.get("qat_step")
        qat_warning = ckpt.get("qat_warning")
        if main:
            _truncate_metrics(metrics, step)
        for note in unreadable:
            log({"kind": "event", "step": step, "event": "checkpoint_unreadable", "detail": note})
        say(f"resuming {run_dir} from {ckpt_path.name} (step {step}, {train_ms / 1000:.1f}s trained)")

    # ---- compile warm-up (CUDA), then restore everything
    warm_n = _compile_warmup_steps(tc, device)
    if warm_n > 0:
        t_w = time.perf_counter()
        saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        saved_opt = _clone_state(opt.state_dict())
        saved_loader = loader.state_dict()
        saved_rng = _rng_state(device)
        qat_from = warm_n - max(1, warm_n // 4) if (qat_possible and warm_n >= 2) else warm_n
        model.train()
        for i in range(warm_n):
            model.set_qat(cfg.model.qat_bits if i >= qat_from else 0)
            train_step()
        synchronize(device)
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        loader.load_state_dict(saved_loader)
        _set_rng_state(saved_rng, device)
        del saved_model, saved_opt
        say(f"compile warm-up: {warm_n} steps in {time.perf_counter() - t_w:.1f}s (restored)")
    model.set_qat(cfg.model.qat_bits if qat_on else 0)

    ema: EMA | None = None
    if tc.ema != "off":
        ema = EMA(model, tc.ema_decay, tc.ema)
        if ckpt is not None:
            if ckpt.get("ema") is None:
                raise InputError(f"{ckpt_path}: checkpoint has no EMA state but train.ema={tc.ema!r}")
            ema.load_state_dict(ckpt["ema"])
    if ckpt is not None:
        _set_rng_state(ckpt["rng"], device)
        del ckpt

    def save_checkpoint() -> None:
        if not main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "train_ms": train_ms,
            "model": _cpu_state(model),
            "optimizers": _to_cpu(opt.state_dict()),
            "ema": ema.state_dict() if ema is not None else None,
            "loader": loader.state_dict(),
            "qat": qat_on,
            "qat_step": qat_step,
            "qat_warning": qat_warning,
            "rng": _rng_state(device),
            "config": cfg.to_dict(),
            "world_size": dist.world_size,
        }
        _save_torch(run_dir / "checkpoints" / f"step_{step:06d}.pt", state)

    def validate(tag: str) -> dict[str, float]:
        r = evaluate_val(model, val_tokens, seq_len, tables, device, bf16, dist.rank, dist.world_size)
        log(
            {
                "kind": "val",
                "step": step,
                "weights": tag,
                "val_loss": r["loss"],
                "val_bpb": r["bpb"],
                "elapsed_ms": round(train_ms, 1),
            }
        )
        say(f"step {step}/{tc.iterations} val ({tag}) loss {r['loss']:.4f} bpb {r['bpb']:.4f}")
        return r

    say(
        f"training {cfg.name}: {n_params:,} params, {dist.world_size} process(es) x {accum} micro-batches, "
        f"{tc.batch_tokens:,} tokens/step, attention {backend}, device {card_name(device)}"
        + (", compiled" if compiled else "")
    )

    # ---- the loop
    cap_ms = 1000.0 * tc.max_wallclock_seconds if tc.max_wallclock_seconds > 0 else None
    if qat_possible and not qat_on and cap_ms is None:
        first = next((i for i in range(step, tc.iterations) if lr_multiplier(i, 0.0, tc) < tc.lmcore_late_qat_threshold), None)
        if first is not None and first < QAT_EARLY_FRACTION * tc.iterations:
            say("warning: " + _qat_early_message(first, first / tc.iterations, tc, cfg.model.qat_bits, "will start"))
    stop_after: int | None = None
    sigterm_at: int | None = None
    stopped_by = "iterations"
    session_steps = 0
    watch = _FiniteWatch(device)

    def diverged(bad_step: int) -> None:
        log({"kind": "event", "step": bad_step, "event": "non_finite_loss"})
        last = latest_checkpoint(run_dir)
        raise NonFiniteLoss(
            f"{run_dir}: non-finite loss, gradient or weights (NaN/inf) at step {bad_step}; training stopped and nothing "
            f"was saved after it; last good checkpoint: {last if last else 'none (train.checkpoint_every=0)'}. "
            "Check the learning rates (train.matrix_lr, train.embed_lr, train.scalar_lr) and train.grad_clip"
        )
    last_log = (step, train_ms)
    model.train()
    synchronize(device)
    t0 = time.perf_counter()

    def now_ms() -> float:
        return train_ms + 1000.0 * (time.perf_counter() - t0)

    while True:
        if step >= tc.iterations:
            break
        if stop_after is not None and step >= stop_after:
            stopped_by = "wallclock"
            break
        if sigterm_at is not None:
            stopped_by = "sigterm"
            break
        if max_steps is not None and session_steps >= max_steps:
            stopped_by = "max_steps"
            break
        if tc.val_every > 0 and step % tc.val_every == 0:
            synchronize(device)
            train_ms = now_ms()
            validate("raw")
            t0 = time.perf_counter()
        mul = lr_multiplier(step, now_ms(), tc)
        if qat_possible and not qat_on and mul < tc.lmcore_late_qat_threshold:
            model.set_qat(cfg.model.qat_bits)
            qat_on, qat_step = True, step
            frac = now_ms() / cap_ms if cap_ms is not None else step / tc.iterations
            if frac < QAT_EARLY_FRACTION:
                qat_warning = _qat_early_message(step, frac, tc, cfg.model.qat_bits, "started")
                say("warning: " + qat_warning)
            log({"kind": "event", "step": step, "event": "late_qat", "lr_mul": mul, "warning": qat_warning})
            say(f"step {step}: lmcore late QAT on (int{cfg.model.qat_bits}), lr_mul {mul:.4f}")
        opt.set_lr_mul(mul)
        opt.set_momentum(muon_momentum(step, tc))
        loss, grad_norm = train_step()
        if ema is not None:
            ema.update()
        step += 1
        session_steps += 1
        bad = watch.push(step, grad_norm)
        if bad is not None:
            diverged(bad)
        elapsed = now_ms()
        reached, sig = cap_ms is not None and elapsed >= cap_ms, stop.requested
        log_now = tc.log_every > 0 and (step <= 10 or step % tc.log_every == 0 or step >= tc.iterations)
        if dist.distributed and (cap_ms is not None or log_now):  # every rank stops at the same step
            flags = torch.tensor([int(reached), int(sig)], device=device)
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
            reached, sig = bool(flags[0].item()), bool(flags[1].item())
        elif dist.distributed:
            sig = False  # seen at the next all-reduce
        if reached and stop_after is None:
            stop_after = step
        if sig and sigterm_at is None:
            sigterm_at = step
            say(f"step {step}: SIGTERM received: writing a checkpoint and stopping")
        end_now = step >= tc.iterations or stop_after == step  # (a max_steps pause logs nothing extra)
        if tc.log_every > 0 and (log_now or end_now):
            if dist.distributed:
                tdist.all_reduce(loss, op=tdist.ReduceOp.SUM)
                loss = loss / dist.world_size
            loss_v = float(loss.item())
            if not math.isfinite(loss_v):
                diverged(watch.flush() or step)
            elapsed = now_ms()
            step_ms = (elapsed - last_log[1]) / max(step - last_log[0], 1)
            last_log = (step, elapsed)
            tok_s = tc.batch_tokens / (step_ms / 1000.0) if step_ms > 0 else float("nan")
            log(
                {
                    "kind": "train",
                    "step": step,
                    "train_loss": loss_v,
                    "lr_mul": mul,
                    "tokens": step * tc.batch_tokens,
                    "elapsed_ms": round(elapsed, 2),
                    "step_ms": round(step_ms, 3),
                    "tokens_per_s": round(tok_s, 1),
                }
            )
            mean_ms = elapsed / max(step, 1)
            eta = (tc.iterations - step) * mean_ms / 1000.0
            if cap_ms is not None:
                eta = min(eta, max(cap_ms - elapsed, 0.0) / 1000.0)
            say(
                f"step {step}/{tc.iterations} loss {loss_v:.4f} lr_mul {mul:.3f} "
                f"{tok_s / 1e3:.1f}k tok/s {step_ms:.1f} ms/step eta {_fmt_eta(eta)}"
            )
        pause = max_steps is not None and session_steps >= max_steps
        if tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0 and not (end_now or pause or sig):
            synchronize(device)
            train_ms = now_ms()
            if (bad := watch.flush()) is not None or not _all_finite(model):
                diverged(bad or step)
            save_checkpoint()
            t0 = time.perf_counter()

    synchronize(device)
    train_ms = now_ms()
    if (bad := watch.flush()) is not None or not _all_finite(model):
        diverged(bad or step)
    save_checkpoint()  # the end of this session: raw weights, optimizers, EMA, position
    completed = stopped_by not in ("max_steps", "sigterm")

    # ---- final evaluation: raw and EMA weights; keep the EMA (raw if off)
    raw = ema_r = alt_r = None
    alt = None
    if completed:
        raw = validate("raw")
        if ema is not None:
            if compare_ema:
                alt = next(m for m in EMA.MODES if m != ema.mode)
                model.load_state_dict(ema.weights(alt))
                alt_r = validate(f"ema_{alt}")
            model.load_state_dict(ema.weights())
            ema_r = validate("ema")
        if main:
            _save_torch(run_dir / "model.pt", {"model": _cpu_state(model), "config": cfg.to_dict()})
    final = ema_r if ema_r is not None else raw
    barrier()

    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    tokens = step * tc.batch_tokens
    result = RunResult(
        run_dir=str(run_dir),
        preset=cfg.name,
        completed=completed,
        stopped_by=stopped_by,
        steps=step,
        tokens=tokens,
        wall_time_s=round(time.perf_counter() - wall0, 3),
        train_time_s=round(train_ms / 1000.0, 3),
        tokens_per_s=round(tokens / (train_ms / 1000.0), 1) if train_ms > 0 else 0.0,
        mean_step_ms=round(train_ms / step, 3) if step else 0.0,
        peak_memory_mib=round(peak, 1) if peak is not None else None,
        peak_rss_mib=round(_peak_rss_mib(), 1),
        val_loss_raw=raw["loss"] if raw else None,
        val_bpb_raw=raw["bpb"] if raw else None,
        val_loss_ema=ema_r["loss"] if ema_r else None,
        val_bpb_ema=ema_r["bpb"] if ema_r else None,
        val_loss=final["loss"] if final else None,
        val_bpb=final["bpb"] if final else None,
        ema=tc.ema,
        ema_alt=alt,
        val_loss_ema_alt=alt_r["loss"] if alt_r else None,
        val_bpb_ema_alt=alt_r["bpb"] if alt_r else None,
        qat_step=qat_step,
        qat_warning=qat_warning,
        attention_requested=cfg.model.attention,
        attention_backend=backend,
        world_size=dist.world_size,
        grad_accum_per_rank=accum,
        seed=tc.seed,
        device=str(device),
        card=card_name(device),
        compiled=compiled,
        git_commit=git_commit(),
        torch_version=torch.__version__,
    )
    if main:
        atomic_write_json(run_dir / "summary.json", result.to_dict())
        if completed:
            say(
                f"done: {step} steps, {result.train_time_s:.1f}s training, val loss {result.val_loss:.4f} "
                f"bpb {result.val_bpb:.4f} (raw {result.val_bpb_raw:.4f}"
                + (f", ema {result.val_bpb_ema:.4f})" if ema_r else ")")
            )
        else:
            say(f"stopped after {session_steps} steps this session (step {step}); resume with --resume")
    return result


@torch.no_grad()
def _all_finite(model: nn.Module) -> bool:
    """Every parameter finite (one device sync: called only before a checkpoint is written)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all().item())


def _qat_early_message(step: int, frac: float, tc: Any, bits: int, verb: str) -> str:
    return (
        f"lmcore late QAT (fake int{bits}) {verb} at step {step}, {100 * frac:.1f}% into the run (within the first "
        f"{100 * QAT_EARLY_FRACTION:.0f}%): train.lmcore_late_qat_threshold={tc.lmcore_late_qat_threshold} is "
        f"reached early with train.warmdown_iters={tc.warmdown_iters}; most of the run trains quantized"
    )


def _compile_warmup_steps(tc: Any, device: torch.device) -> int:
    """Warm-up steps to run (and undo) before training: only where there is compiling to do."""
    return tc.compile_warmup_steps if device.type == "cuda" else 0


def _peak_rss_mib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return float("nan")


def _clone_state(obj: Any) -> Any:
    """Deep copy of a (nested) optimizer state dict, tensors cloned on their device."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_state(v) for v in obj)
    return obj


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------- CLI


def _cmd_train(args: argparse.Namespace, env: dict[str, str] | None = None) -> int:
    from lmcore.info import config_from_args

    env = dict(os.environ) if env is None else env  # the CLI is the only place reading it
    resume = bool(args.resume)
    if isinstance(args.resume, str) and args.run_dir and Path(args.resume) != Path(args.run_dir):
        raise InputError(f"--resume {args.resume} and --run-dir {args.run_dir} name different folders")
    run_dir_arg = args.run_dir or (args.resume if isinstance(args.resume, str) else None)
    if not run_dir_arg:
        raise InputError("give --run-dir (or --resume RUN_DIR)")
    run_dir = Path(run_dir_arg)
    if args.config or args.preset:
        cfg = config_from_args(args)
    elif resume:
        if not (run_dir / "config.json").is_file():
            raise InputNotFound(f"{run_dir}: nothing to resume: no config.json in the run folder")
        cfg = Config.load(run_dir / "config.json").override(args.overrides)
    else:
        raise ConfigError("give --preset or --config (or --resume with a run folder holding config.json)")
    info = dist_from_env(env)
    result = train(
        cfg,
        run_dir,
        info,
        resume=resume,
        progress=not args.no_progress,
        max_steps=args.max_steps,
        compare_ema=args.compare_ema,
    )
    if info.is_main:
        print(json.dumps(result.to_dict(), indent=2))
    if result.stopped_by == "sigterm":
        if info.is_main:
            print(f"lmcore train: stopped by SIGTERM at step {result.steps}; checkpoint written; "
                  f"continue with: lmcore train --resume {run_dir}", file=sys.stderr)
        return EXIT_SIGTERM
    return 0


def register_cli(sub: Any) -> None:
    """Add `lmcore train`."""
    from lmcore.info import add_config_args

    p = sub.add_parser(
        "train",
        help="train a model into a run folder (single process or under torchrun)",
        description="Train with Muon + AdamW, the SPEC schedule, EMA and late QAT. Writes config.json, "
        "metrics.jsonl, summary.json, model.pt and checkpoints/ into --run-dir. Under torchrun, "
        "RANK / WORLD_SIZE / LOCAL_RANK are read from the environment (NCCL on GPU, gloo on CPU).",
    )
    add_config_args(p, default_preset=None)
    p.add_argument("--run-dir", default=None, help="run folder, e.g. runs/ID (created if missing)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue a run from its latest checkpoint: `--resume runs/ID` or `--resume "
        "--run-dir runs/ID` (config from its config.json unless --preset/--config is given)",
    )
    p.add_argument("--no-progress", action="store_true", help="do not print progress lines")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="end this session after N optimizer steps with a checkpoint (the LR schedule "
        "still targets train.iterations); continue later with --resume",
    )
    p.add_argument(
        "--compare-ema",
        action="store_true",
        help="also evaluate the other EMA mode (original vs bias_corrected) derived from the "
        "same run; reported as val_loss_ema_alt / val_bpb_ema_alt",
    )
    p.set_defaults(func=_cmd_train)
