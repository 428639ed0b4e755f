"""Training (SPEC section 4): `train(cfg, run_dir)` and the `lmcore train` command.

One loop (`_train`, one screen, over the parts of lmcore.session) serves one process or
several under torchrun (DDP, gradient sync only on the last micro-batch; NCCL on GPU, gloo
on CPU). Each step takes `batch_tokens` tokens as grad_accum / world_size micro-batches per
rank, clips the global gradient norm, and steps Muon (matrices) and AdamW (embeddings,
control tensors) with the LR multiplier of `lmcore.optim.lr_multiplier` and the Muon
momentum warm-up. On CUDA the model is compiled (fullgraph, static shapes) and
`compile_warmup_steps` steps run first (late-QAT graph included) after which weights,
optimizer states, loader and RNG are restored (lmcore.checkpoint.MemorySnapshot); training
time excludes that warm-up, validations and checkpoint writes. lmcore's own late QAT (off
in every preset: the original's never runs, SPEC section 3) switches on when the
multiplier drops below `lmcore_late_qat_threshold`; starting within the first 10% of the
run is flagged in the log and summary.json (`qat_warning`). An EMA of all weights
(lmcore.ema: "original", "bias_corrected" or "off") is kept; at the end the raw and the
EMA weights are both validated (lmcore.validate.plain_eval, the function evaluation's
plain pass uses too) and the EMA (raw if off) are kept.

Run folder: config.json, metrics.jsonl (train / val / event lines), summary.json,
model.pt ({"model": state_dict on CPU, "config": dict}) and checkpoints/step_NNNNNN.pt
(model, optimizers, EMA, loader position, step, train time, QAT flag, RNG states), all
written atomically by rank 0 (lmcore.checkpoint). `train(..., resume=True)` continues from
the latest readable checkpoint bit-exactly (on CPU; an unreadable one is named and
skipped); `max_steps` ends a session early with a checkpoint.

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
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

from lmcore.checkpoint import (
    RESUMABLE_FIELDS,
    MemorySnapshot,
    TrainState,
    checkpoints,
    latest_checkpoint,
    prepare_run_dir,
    save_model,
)
from lmcore.config import Config, ConfigError
from lmcore.ema import EMA
from lmcore.errors import InputError, InputNotFound
from lmcore.optim import lr_multiplier, muon_momentum
from lmcore.runs import RunLock, atomic_write_json
from lmcore.runtime import (
    ONE_PROCESS,
    DistInfo,
    card_name,
    dist_from_env,
    git_commit,
    init_distributed,
    pick_device,
    shutdown_distributed,
    synchronize,
)
from lmcore.session import (
    FiniteWatch,
    NonFiniteLoss,
    Session,
    StopSignal,
    TrainClock,
    all_finite,
    start_session,
)

__all__ = [
    "EMA", "NonFiniteLoss", "RESUMABLE_FIELDS", "RunResult", "TrainState", "checkpoints", "latest_checkpoint",
    "register_cli", "train",
]

QAT_EARLY_FRACTION = 0.10  # lmcore's QAT starting before this fraction of the run is flagged
EXIT_SIGTERM = 143  # the CLI's exit status after a SIGTERM checkpoint (128 + 15)


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


# ---------------------------------------------------------------------------- entry point


def train(
    cfg: Config,
    run_dir: str | Path,
    dist: DistInfo = ONE_PROCESS,
    *,
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
    if max_steps is not None and max_steps < 0:
        raise InputError(f"max_steps must be >= 0, got {max_steps}")
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    lock = RunLock(run_dir, "lmcore train").acquire() if dist.is_main else None
    created_pg = False
    try:
        prepare_run_dir(run_dir, cfg, resume)
        device = pick_device(tc.device, dist.local_rank)
        created_pg = dist.distributed and not tdist.is_initialized()
        init_distributed(dist, device)
        with StopSignal() as stop:
            s, st = start_session(cfg, run_dir, dist, device=device, resume=resume, progress=progress)
            try:
                return _train(s, st, max_steps=max_steps, compare_ema=compare_ema or tc.compare_ema, wall0=wall0,
                              stop=stop)
            finally:  # DDP's reducer holds the process group: free it before the group is destroyed below
                del s
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


# ---------------------------------------------------------------------------- the loop


def _train(
    s: Session, st: TrainState, *, max_steps: int | None, compare_ema: bool, wall0: float, stop: StopSignal
) -> RunResult:
    """The compile warm-up (undone), then optimizer steps from st.step until train.iterations,
    the wallclock cap, `max_steps` steps this session or SIGTERM; validations, logs and
    checkpoints on their schedules (no collective is skipped by one rank alone); then the
    final checkpoint and evaluation."""
    tc = s.cfg.train
    _compile_warmup(s, _compile_warmup_steps(tc, s.device))
    s.model.set_qat(s.cfg.model.qat_bits if st.qat_on else 0)
    s.say(s.describe())
    cap_ms = 1000.0 * tc.max_wallclock_seconds if tc.max_wallclock_seconds > 0 else None
    _predict_early_qat(s, st, cap_ms)
    stop_after: int | None = None  # the step where the wallclock cap was reached
    sigterm_at: int | None = None
    session_steps = 0
    watch = FiniteWatch(s.device)
    clock = TrainClock(st, s.device)
    last_log = (st.step, st.train_ms)
    s.model.train()
    clock.start()
    while True:
        stopped_by = _stop_reason(
            st, tc, stop_after=stop_after, sigterm_at=sigterm_at, session_steps=session_steps, max_steps=max_steps
        )
        if stopped_by is not None:
            break
        if tc.val_every > 0 and st.step % tc.val_every == 0:
            with clock.paused():
                s.validate("raw", st)
        mul = lr_multiplier(st.step, clock.ms(), tc)
        if s.qat_possible and not st.qat_on and mul < tc.lmcore_late_qat_threshold:
            _start_qat(s, st, mul, frac=clock.ms() / cap_ms if cap_ms is not None else st.step / tc.iterations)
        s.opt.set_lr_mul(mul)
        s.opt.set_momentum(muon_momentum(st.step, tc))
        with _profiled(s, st.step + 1, clock):
            loss, grad_norm = s.train_step()
        if s.ema is not None:
            s.ema.update()
        st.step += 1
        session_steps += 1
        if (bad := watch.push(st.step, grad_norm)) is not None:
            s.diverged(bad)
        log_now = tc.log_every > 0 and (st.step <= 10 or st.step % tc.log_every == 0 or st.step >= tc.iterations)
        reached, sig = _agree_on_stop(
            s, cap_ms is not None and clock.ms() >= cap_ms, stop.requested, collective=cap_ms is not None or log_now
        )
        if reached and stop_after is None:
            stop_after = st.step
        if sig and sigterm_at is None:
            sigterm_at = st.step
            s.say(f"step {st.step}: SIGTERM received: writing a checkpoint and stopping")
        end_now = st.step >= tc.iterations or stop_after == st.step  # (a max_steps pause logs nothing extra)
        if tc.log_every > 0 and (log_now or end_now):
            last_log = _log_train(s, st, loss, mul, last_log=last_log, clock=clock, cap_ms=cap_ms, watch=watch)
        pause = max_steps is not None and session_steps >= max_steps
        if tc.checkpoint_every > 0 and st.step % tc.checkpoint_every == 0 and not (end_now or pause or sig):
            with clock.paused():
                _checkpoint(s, st, watch)
    clock.stop()
    _checkpoint(s, st, watch)  # the end of this session: raw weights, optimizers, EMA, position
    return _finish(s, st, stopped_by=stopped_by, session_steps=session_steps, compare_ema=compare_ema, wall0=wall0)


def _profiled(s: Session, step: int, clock: TrainClock) -> contextlib.AbstractContextManager[None]:
    """train.profile_step's profiler around that step on rank 0 (lmcore.profiling, imported
    only then: the exported script does not embed it; its export pauses the clock), else nothing."""
    if step != s.cfg.train.profile_step or not s.dist.is_main:
        return contextlib.nullcontext()
    from lmcore.profiling import profile_step

    return profile_step(s.run_dir / "profile", s.device, step=step, pause=clock.paused)


def _stop_reason(
    st: TrainState, tc: Any, *, stop_after: int | None, sigterm_at: int | None, session_steps: int, max_steps: int | None
) -> str | None:
    """Why the session ends before the next step (RunResult.stopped_by), or None to go on."""
    if st.step >= tc.iterations:
        return "iterations"
    if stop_after is not None and st.step >= stop_after:
        return "wallclock"
    if sigterm_at is not None:
        return "sigterm"
    if max_steps is not None and session_steps >= max_steps:
        return "max_steps"
    return None


def _agree_on_stop(s: Session, reached: bool, sig: bool, *, collective: bool) -> tuple[bool, bool]:
    """(cap reached, SIGTERM) as every rank sees it, so that all stop at the same step: the
    flags are all-reduced (MAX) where a collective is due (every step under a wallclock cap,
    else the log steps); a SIGTERM between them waits for the next one."""
    if not s.dist.distributed:
        return reached, sig
    if not collective:
        return reached, False
    flags = torch.tensor([int(reached), int(sig)], device=s.device)
    tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
    return bool(flags[0].item()), bool(flags[1].item())


def _log_train(
    s: Session, st: TrainState, loss: Tensor, mul: float, *, last_log: tuple[int, float], clock: TrainClock,
    cap_ms: float | None, watch: FiniteWatch,
) -> tuple[int, float]:
    """The train line of metrics.jsonl and the progress line for step st.step (the loss
    averaged over ranks; a non-finite one stops training). Returns (step, elapsed ms), the
    reference for the next line's step time."""
    tc = s.cfg.train
    if s.dist.distributed:
        tdist.all_reduce(loss, op=tdist.ReduceOp.SUM)
        loss = loss / s.dist.world_size
    loss_v = float(loss.item())
    if not math.isfinite(loss_v):
        s.diverged(watch.flush() or st.step)
    elapsed = clock.ms()
    step_ms = (elapsed - last_log[1]) / max(st.step - last_log[0], 1)
    tok_s = tc.batch_tokens / (step_ms / 1000.0) if step_ms > 0 else float("nan")
    s.log(
        {
            "kind": "train",
            "step": st.step,
            "train_loss": loss_v,
            "lr_mul": mul,
            "tokens": st.step * tc.batch_tokens,
            "elapsed_ms": round(elapsed, 2),
            "step_ms": round(step_ms, 3),
            "tokens_per_s": round(tok_s, 1),
        }
    )
    eta = (tc.iterations - st.step) * (elapsed / max(st.step, 1)) / 1000.0
    if cap_ms is not None:
        eta = min(eta, max(cap_ms - elapsed, 0.0) / 1000.0)
    s.say(
        f"step {st.step}/{tc.iterations} loss {loss_v:.4f} lr_mul {mul:.3f} "
        f"{tok_s / 1e3:.1f}k tok/s {step_ms:.1f} ms/step eta {_fmt_eta(eta)}"
    )
    return st.step, elapsed


def _checkpoint(s: Session, st: TrainState, watch: FiniteWatch) -> None:
    """A checkpoint of finite weights only: a NaN/inf seen since the last check stops training first."""
    if (bad := watch.flush()) is not None or not all_finite(s.model):
        s.diverged(bad or st.step)
    s.save_checkpoint(st)


def _start_qat(s: Session, st: TrainState, mul: float, *, frac: float) -> None:
    """Switch lmcore's late QAT on at st.step (`frac` of the run done); flag it when early."""
    bits = s.cfg.model.qat_bits
    s.model.set_qat(bits)
    st.qat_on, st.qat_step = True, st.step
    if frac < QAT_EARLY_FRACTION:
        st.qat_warning = _qat_early_message(st.step, frac, s.cfg.train, bits, "started")
        s.say("warning: " + st.qat_warning)
    s.log({"kind": "event", "step": st.step, "event": "late_qat", "lr_mul": mul, "warning": st.qat_warning})
    s.say(f"step {st.step}: lmcore late QAT on (int{bits}), lr_mul {mul:.4f}")


def _predict_early_qat(s: Session, st: TrainState, cap_ms: float | None) -> None:
    """Without a wallclock cap the QAT step is known in advance: warn before the loop when early."""
    tc = s.cfg.train
    if not s.qat_possible or st.qat_on or cap_ms is not None:
        return
    first = next(
        (i for i in range(st.step, tc.iterations) if lr_multiplier(i, 0.0, tc) < tc.lmcore_late_qat_threshold), None
    )
    if first is not None and first < QAT_EARLY_FRACTION * tc.iterations:
        s.say("warning: " + _qat_early_message(first, first / tc.iterations, tc, s.cfg.model.qat_bits, "will start"))


def _qat_early_message(step: int, frac: float, tc: Any, bits: int, verb: str) -> str:
    return (
        f"lmcore late QAT (fake int{bits}) {verb} at step {step}, {100 * frac:.1f}% into the run (within the first "
        f"{100 * QAT_EARLY_FRACTION:.0f}%): train.lmcore_late_qat_threshold={tc.lmcore_late_qat_threshold} is "
        f"reached early with train.warmdown_iters={tc.warmdown_iters}; most of the run trains quantized"
    )


# ---------------------------------------------------------------------------- the end of a session


def _finish(
    s: Session, st: TrainState, *, stopped_by: str, session_steps: int, compare_ema: bool, wall0: float
) -> RunResult:
    """Final validation of the raw and EMA weights (a completed run only; model.pt keeps the
    EMA, raw if off), then summary.json. Every rank returns the same RunResult."""
    tc = s.cfg.train
    completed = stopped_by not in ("max_steps", "sigterm")
    raw = ema_r = alt_r = None
    alt = None
    if completed:
        raw = s.validate("raw", st)
        if s.ema is not None:
            if compare_ema:
                alt = next(m for m in EMA.MODES if m != s.ema.mode)
                s.model.load_state_dict(s.ema.weights(alt))
                alt_r = s.validate(f"ema_{alt}", st)
            s.model.load_state_dict(s.ema.weights())
            ema_r = s.validate("ema", st)
        if s.main:
            save_model(s.run_dir, s.model, s.cfg)
    final = ema_r if ema_r is not None else raw
    s.barrier()

    device, train_ms, step = s.device, st.train_ms, st.step
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    tokens = step * tc.batch_tokens
    result = RunResult(
        run_dir=str(s.run_dir),
        preset=s.cfg.name,
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
        val_loss_raw=_get(raw, "loss"),
        val_bpb_raw=_get(raw, "bpb"),
        val_loss_ema=_get(ema_r, "loss"),
        val_bpb_ema=_get(ema_r, "bpb"),
        val_loss=_get(final, "loss"),
        val_bpb=_get(final, "bpb"),
        ema=tc.ema,
        ema_alt=alt,
        val_loss_ema_alt=_get(alt_r, "loss"),
        val_bpb_ema_alt=_get(alt_r, "bpb"),
        qat_step=st.qat_step,
        qat_warning=st.qat_warning,
        attention_requested=s.cfg.model.attention,
        attention_backend=s.backend,
        world_size=s.dist.world_size,
        grad_accum_per_rank=s.accum,
        seed=tc.seed,
        device=str(device),
        card=card_name(device),
        compiled=s.compiled,
        git_commit=git_commit(),
        torch_version=torch.__version__,
    )
    if s.main:
        atomic_write_json(s.run_dir / "summary.json", result.to_dict())
        if completed:
            s.say(
                f"done: {step} steps, {result.train_time_s:.1f}s training, val loss {result.val_loss:.4f} "
                f"bpb {result.val_bpb:.4f} (raw {result.val_bpb_raw:.4f}"
                + (f", ema {result.val_bpb_ema:.4f})" if ema_r else ")")
            )
        else:
            s.say(f"stopped after {session_steps} steps this session (step {step}); resume with --resume")
    return result


# ---------------------------------------------------------------------------- helpers


def _compile_warmup(s: Session, n: int) -> None:
    """Run `n` training steps (the late-QAT graph in the last quarter when QAT can start) so
    that compiling happens here, then put weights, optimizers, loader and RNG back."""
    if n <= 0:
        return
    t0 = time.perf_counter()
    snapshot = MemorySnapshot(model=s.model, opt=s.opt, loader=s.loader, device=s.device)
    qat_from = n - max(1, n // 4) if (s.qat_possible and n >= 2) else n
    s.model.train()
    for i in range(n):
        s.model.set_qat(s.cfg.model.qat_bits if i >= qat_from else 0)
        s.train_step()
    synchronize(s.device)
    snapshot.restore()
    s.say(f"compile warm-up: {n} steps in {time.perf_counter() - t0:.1f}s (restored)")


def _compile_warmup_steps(tc: Any, device: torch.device) -> int:
    """Warm-up steps to run (and undo) before training: only where there is compiling to do."""
    return tc.compile_warmup_steps if device.type == "cuda" else 0


def _get(result: dict[str, Any] | None, key: str) -> Any:
    return result[key] if result else None


def _peak_rss_mib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return float("nan")


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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
