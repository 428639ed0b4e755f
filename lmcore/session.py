"""The parts of one training session (lmcore.train runs the loop over them).

- `start_session`: checks data, tokenizer and the checkpoint to resume before anything is
  written, writes config.json, builds model, optimizers and the forward to train with
  (compiled on CUDA, DDP-wrapped under torchrun), and puts a checkpoint's state back (model,
  optimizers, loader, EMA, RNG; the `TrainState` of lmcore.checkpoint).
- `Session`: what the loop works with, and what it does with it: one optimizer step over
  the micro-batches (`train_step`), a logged validation (`validate`, lmcore.validate's
  plain_eval), metrics lines, checkpoints, and the stop on a non-finite loss (`diverged`).
- `FiniteWatch` (NaN/inf checks that never make the GPU wait), `TrainClock` (training time,
  paused for validation and checkpoints), `StopSignal` (SIGTERM asks for a checkpoint and
  a clean stop instead of killing the process), `StepRows` (train.step_batch_copy: a step's
  tokens in one copy to the device).
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from lmcore.checkpoint import (
    METRICS_NAME,
    TrainState,
    latest_checkpoint,
    load_resumable_checkpoint,
    open_run_dir,
    restore_checkpoint,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from lmcore.config import Config, ConfigError, ModelConfig, TrainConfig, is_smoke_config
from lmcore.ema import EMA
from lmcore.errors import InputError
from lmcore.optim import Optimizers, build_optimizers
from lmcore.runs import append_jsonl
from lmcore.runtime import DistInfo, autocast, card_name, seed_all, synchronize, use_bf16
from lmcore.validate import plain_eval

__all__ = ["FiniteWatch", "NonFiniteLoss", "Session", "StopSignal", "TrainClock", "all_finite", "start_session"]

VAL_BATCH_TOKENS = 65_536  # tokens per validation batch


class NonFiniteLoss(InputError):
    """Training produced a NaN/inf loss or gradient norm; nothing was saved after the last good checkpoint."""


@dataclass
class Session:
    """What one training session works with, built once by `start_session`: config, data,
    model, optimizers, EMA, the forward to train with. The loop's changing state is the
    `TrainState` passed beside it (the checkpoint is written from both, explicitly)."""

    cfg: Config
    run_dir: Path
    dist: DistInfo
    device: torch.device
    progress: bool
    accum: int  # micro-batches per rank and step
    bf16: bool
    loader: Any  # lmcore.data.DistributedTokenLoader
    val_tokens: Tensor
    tables: Any  # lmcore.bpb.ByteTables
    model: Any  # lmcore.model.GPT
    opt: Optimizers
    forward: nn.Module  # the model, compiled on CUDA, DDP-wrapped under torchrun
    ddp: nn.parallel.DistributedDataParallel | None
    backend: str  # the attention backend that runs
    compiled: bool
    ema: EMA | None = None

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @functools.cached_property
    def params(self) -> tuple[nn.Parameter, ...]:
        """The trained parameters, in the model's order (train.foreach_grad_accum's gradients)."""
        return tuple(p for p in self.model.parameters() if p.requires_grad)

    @property
    def cuda_graphs(self) -> bool:
        """A compiled model with inductor's CUDA graphs (train.compile_mode reduce-overhead or max-autotune)."""
        return self.compiled and self.cfg.train.compile_mode in ("reduce-overhead", "max-autotune")

    @property
    def metrics(self) -> Path:
        return self.run_dir / METRICS_NAME

    @property
    def qat_possible(self) -> bool:
        tc = self.cfg.train
        return tc.lmcore_late_qat_threshold > 0 and self.cfg.model.qat_bits > 0 and tc.warmdown_iters > 0

    def say(self, msg: str) -> None:
        if self.progress and self.main:
            print(msg, flush=True)

    def log(self, obj: dict[str, Any]) -> None:
        if self.main:
            append_jsonl(self.metrics, obj)

    def barrier(self) -> None:
        if self.dist.distributed:
            tdist.barrier()

    def describe(self) -> str:
        """The progress line that opens the training loop."""
        tc, n_params = self.cfg.train, sum(p.numel() for p in self.model.parameters())
        return (
            f"training {self.cfg.name}: {n_params:,} params, {self.dist.world_size} process(es) x {self.accum} "
            f"micro-batches, {tc.batch_tokens:,} tokens/step, attention {self.backend}, device {card_name(self.device)}"
            + (", compiled" if self.compiled else "")
        )

    def train_step(self) -> tuple[Tensor, Tensor]:
        """Forward/backward over this rank's micro-batches and one optimizer step: returns
        (mean loss, global gradient norm), both left on the device."""
        tc, accum, device, graphs = self.cfg.train, self.accum, self.device, self.cuda_graphs
        loss_sum = torch.zeros((), device=device)
        seq = self.cfg.data.seq_len
        rows = self.step_rows.next(tc.batch_tokens, seq, accum) if tc.step_batch_copy else None
        for micro in range(accum):
            if rows is not None:  # train.step_batch_copy: this micro-batch's row, already on the device
                x, y = rows[micro, :-1].reshape(-1, seq).long(), rows[micro, 1:].reshape(-1, seq).long()
            else:
                x, y = self.loader.next_batch(tc.batch_tokens, seq, accum)
                x, y = self._to_device(x), self._to_device(y)
            last = self.ddp is None or micro == accum - 1
            if graphs:  # each micro-batch is a new run of the graphs (their outputs are reused)
                torch.compiler.cudagraph_mark_step_begin()
            # train.foreach_grad_accum: gradients summed by foreach adds, not an AccumulateGrad add a
            # parameter; DDP's last micro-batch keeps .backward(), for its all-reduce hooks
            summed = tc.foreach_grad_accum and (self.ddp is None or not last)
            with contextlib.nullcontext() if last else self.ddp.no_sync():  # gradients sync on the last one
                with autocast(device, self.bf16):
                    loss = self.forward(x, y)
                if summed:
                    self._accumulate(torch.autograd.grad(loss * (1.0 / accum), self.params, allow_unused=True))
                else:
                    (loss * (1.0 / accum)).backward()
            if graphs and micro == 0 and not summed:
                # a parameter's first gradient is the backward graph's output itself, which the next
                # micro-batch's run overwrites: own a copy, for the next ones to add to (same values)
                for p in self.params:
                    if p.grad is not None:
                        p.grad = p.grad.clone()
            loss_sum += loss.detach()
        # the norm (after DDP's all-reduce, so equal on every rank) also flags NaN/inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        self.opt.step()
        self.opt.zero_grad()
        return loss_sum / accum, grad_norm

    def _accumulate(self, grads: tuple[Tensor | None, ...]) -> None:
        """Add a micro-batch's gradients to the parameters' .grad with a foreach add per dtype (the
        same sums, in the same order, as autograd's AccumulateGrad). A first gradient becomes
        .grad as AccumulateGrad would keep it: itself when it has the parameter's strides and is
        not a CUDA graph's output (the next replay overwrites those), else a copy in the
        parameter's layout."""
        groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        own_first = not self.cuda_graphs
        for p, g in zip(self.params, grads):
            if g is None:
                continue
            if p.grad is not None:
                # CUDA's one-kernel foreach add takes lists of one dtype and pairs of the same
                # strides; a list with any other pair falls back to an add a tensor
                into, new = groups.setdefault((p.grad.dtype, g.dtype, p.grad.stride() == g.stride()), ([], []))
                into.append(p.grad)
                new.append(g)
            elif own_first and g.stride() == p.stride():
                p.grad = g
            else:
                p.grad = torch.empty_like(p, dtype=g.dtype).copy_(g)
        for into, new in groups.values():
            torch._foreach_add_(into, new)

    @functools.cached_property
    def step_rows(self) -> StepRows:
        return StepRows(self.loader, self.device)

    def _to_device(self, t: Tensor) -> Tensor:
        # from pinned memory the copy is truly asynchronous; a pageable source would make
        # the host wait for the GPU's queue to drain at every micro-batch
        pin = self.device.type == "cuda"
        return (t.pin_memory() if pin else t).to(self.device, non_blocking=True)

    def validate(self, tag: str, st: TrainState) -> dict[str, Any]:
        """Plain validation of the model's current weights (`tag` names them), logged."""
        seq_len = self.cfg.data.seq_len
        r = plain_eval(
            self.model, self.val_tokens, seq_len, self.tables, self.device,
            bf16=self.bf16, batch_seqs=max(1, VAL_BATCH_TOKENS // seq_len), pad=False, dist=self.dist,
        )
        self.log(
            {
                "kind": "val",
                "step": st.step,
                "weights": tag,
                "val_loss": r["loss"],
                "val_bpb": r["bpb"],
                "elapsed_ms": round(st.train_ms, 1),
            }
        )
        self.say(f"step {st.step}/{self.cfg.train.iterations} val ({tag}) loss {r['loss']:.4f} bpb {r['bpb']:.4f}")
        return r

    def save_checkpoint(self, st: TrainState) -> None:
        if self.main:
            save_checkpoint(
                self.run_dir, st, model=self.model, opt=self.opt, ema=self.ema, loader=self.loader, cfg=self.cfg,
                world_size=self.dist.world_size, device=self.device,
            )

    def diverged(self, bad_step: int) -> NoReturn:
        self.log({"kind": "event", "step": bad_step, "event": "non_finite_loss"})
        last = latest_checkpoint(self.run_dir)
        raise NonFiniteLoss(
            f"{self.run_dir}: non-finite loss, gradient or weights (NaN/inf) at step {bad_step}; training stopped and "
            f"nothing was saved after it; last good checkpoint: {last if last else 'none (train.checkpoint_every=0)'}. "
            "Check the learning rates (train.matrix_lr, train.embed_lr, train.scalar_lr) and train.grad_clip"
        )


# train.inductor_mix_order_tuning's inductor options (torch._inductor.config.triton), each set true where torch has it
MIX_ORDER_TUNING = ("mix_order_reduction_autotune_split_size", "mix_order_reduction_allow_multi_stages")


def compile_kwargs(tc: TrainConfig) -> dict[str, Any]:
    """torch.compile's arguments for the training model: whole graph, static shapes, and the
    inductor options of train.compile_mode (torch's own list for the mode, so that it combines
    with the switches: torch.compile takes a mode or options, not both) and of the switches."""
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    kw: dict[str, Any] = {"fullgraph": True, "dynamic": False}
    options: dict[str, Any] = dict(list_mode_options(tc.compile_mode)) if tc.compile_mode != "default" else {}
    if not tc.inductor_mix_order_reduction and hasattr(inductor_config.triton, "mix_order_reduction"):
        options["triton.mix_order_reduction"] = False  # (torch < 2.11 has no such pass)
    if tc.inductor_coordinate_descent:  # (the max-autotune modes turn it on themselves)
        options["coordinate_descent_tuning"] = True
    if tc.inductor_combo_kernels:
        options["combo_kernels"] = True
    for name in MIX_ORDER_TUNING if tc.inductor_mix_order_tuning else ():
        if hasattr(inductor_config.triton, name):
            options[f"triton.{name}"] = True
    if options:
        kw["options"] = options
    return kw


def ddp_graph_mode(tc: TrainConfig) -> None:
    """train.ddp_split_graph as dynamo's optimize_ddp (read when it compiles): a graph a DDP bucket, or
    one graph. A process setting, like the compile itself; without DDP it changes nothing."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.optimize_ddp = tc.ddp_split_graph


def _check_fa3_rowsum(model: ModelConfig, device: torch.device, dq_accum: bool, accum_in: bool = False) -> None:
    """train.fa3_xsa_rowsum (and fa3_dq_accum) runs on FA3 built with FA3_DPSUM=1 (or the math backend): a
    ConfigError naming what is missing otherwise (before anything is written; it also loads FA3's op)."""
    from lmcore.attention import resolve_backend
    from lmcore.fa3_xsa import fa3_rowsum_reason

    if dq_accum and (model.head_dim != 64 or model.rope_dims % 16):  # the accumulator layout q's kernel reads
        raise ConfigError(f"train.fa3_dq_accum needs head dim 64 and model.rope_dims a multiple of 16, not "
                          f"{model.head_dim} and {model.rope_dims}")
    backend = resolve_backend(model.attention, device)
    if backend == "fa3":
        reason = fa3_rowsum_reason(dq_accum, accum_in)
    else:
        reason = None if backend == "math" else f"it runs on fa3, not {backend}"
    if reason:
        raise ConfigError(f"train.fa3_xsa_rowsum with model.attention={model.attention}: {reason}")


def start_session(
    cfg: Config, run_dir: Path, dist: DistInfo, *, device: torch.device, resume: bool, progress: bool
) -> tuple[Session, TrainState]:
    """Check data, tokenizer and checkpoint before anything is written; write config.json;
    build model, optimizers and forward; with `resume`, put the checkpoint's state back
    (model, optimizers, loader, EMA, RNG; its TrainState is returned, else a fresh one).
    The compile warm-up and lmcore's QAT flag are the loop's (lmcore.train)."""
    from lmcore.bpb import ByteTables
    from lmcore.data import DistributedTokenLoader, load_val_tokens
    from lmcore.model import GPT

    tc, main = cfg.train, dist.is_main
    if main and is_smoke_config(cfg):  # the smoke corpus is built on first use
        from lmcore.smoke_data import ensure_smoke_data

        ensure_smoke_data(cfg.data.data_dir, cfg.data.tokenizer, progress=progress)
    if dist.distributed:
        tdist.barrier()
    bf16 = use_bf16(device, tc.precision)
    vocab = cfg.model.vocab_size  # every shard read is checked against it (an id past it is named, never indexed)
    loader = DistributedTokenLoader(cfg.data.data_dir, cfg.data.train_pattern, dist.rank, dist.world_size, vocab_size=vocab)
    val_tokens = load_val_tokens(cfg.data.data_dir, cfg.data.val_pattern, cfg.data.seq_len, cfg.data.val_max_tokens, vocab_size=vocab)
    tables = ByteTables.from_sentencepiece(cfg.data.tokenizer, vocab).to(device)
    if tables.size > vocab:
        raise ConfigError(f"{cfg.data.tokenizer}: tokenizer has {tables.size} pieces, more than model.vocab_size={vocab}")
    if tc.fa3_xsa_rowsum:
        _check_fa3_rowsum(cfg.model, device, tc.fa3_dq_accum, tc.mlp_zeroes_dq_accum)
    found = load_resumable_checkpoint(run_dir) if resume else None
    if found is not None and main:
        for note in found[2]:
            print(f"warning: {note}; resuming from {found[0].name} instead", file=sys.stderr, flush=True)
    if main:
        open_run_dir(run_dir, cfg, resuming=found is not None)
    if dist.distributed:
        tdist.barrier()

    seed_all(tc.seed)
    model = GPT(cfg.model).to(device)
    if tc.rope_cache:
        model.cache_rope(cfg.data.seq_len)
    if tc.fused_qk_norm_rope:
        model.use_fused_qk_norm_rope()
    if tc.fused_xsa_gate:
        model.use_fused_xsa_gate()
    if tc.fused_softcap_ce:
        model.use_fused_softcap_ce()
    if tc.fused_embed:
        model.use_fused_embed()
    if tc.fa3_xsa_rowsum:
        model.use_fa3_xsa_rowsum(tc.fa3_dq_accum)
    if tc.fused_qkv:
        model.use_fused_qkv(tc.fused_qkv_repeat_v, tc.fused_qkv_gate)
    if tc.fused_mlp:
        from lmcore.mlp_kernel import PINGPONG, PINGPONG_QUARTER

        kernel = (PINGPONG_QUARTER if tc.fused_mlp_quarter_tiles else PINGPONG) if tc.fused_mlp_pingpong else None
        model.use_fused_mlp(kernel or tc.fused_mlp_descriptors, tc.fused_mlp_sign)
    if tc.mlp_zeroes_dq_accum:
        model.use_mlp_zeroes_dq_accum()
    if tc.expand_kv:
        model.use_expanded_kv()
    if tc.fold_output_scales:
        model.fold_output_scales()
    if tc.fold_attn_norm:
        model.fold_attn_norm()
    if tc.fused_resid_mix:
        model.use_fused_resid_mix()
    if device.type == "cuda" and bf16:
        model.cast_embeddings(torch.bfloat16)
    backend = model.set_attention_backend(cfg.model.attention, device)
    opt = build_optimizers(model, tc)
    compiled = device.type == "cuda" and tc.compile
    if compiled:
        ddp_graph_mode(tc)
    forward: nn.Module = torch.compile(model, **compile_kwargs(tc)) if compiled else model
    ddp = None
    if dist.distributed:
        ddp = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            bucket_cap_mb=tc.ddp_bucket_cap_mb, gradient_as_bucket_view=tc.ddp_grad_as_bucket_view,
        )
    s = Session(
        cfg=cfg, run_dir=run_dir, dist=dist, device=device, progress=progress, accum=tc.grad_accum // dist.world_size,
        bf16=bf16, loader=loader, val_tokens=val_tokens, tables=tables, model=model, opt=opt,
        forward=ddp if ddp is not None else forward, ddp=ddp, backend=backend, compiled=compiled,
    )
    st = TrainState()
    if found is not None:
        path, ckpt, unreadable = found
        st = restore_checkpoint(ckpt, model=model, opt=opt, loader=loader)
        if main:
            truncate_metrics(s.metrics, st.step)
        for note in unreadable:
            s.log({"kind": "event", "step": st.step, "event": "checkpoint_unreadable", "detail": note})
        s.say(f"resuming {run_dir} from {path.name} (step {st.step}, {st.train_ms / 1000:.1f}s trained)")
    if tc.ema != "off":
        s.ema = EMA(model, tc.ema_decay, tc.ema)
        if found is not None:
            if found[1].get("ema") is None:
                raise InputError(f"{found[0]}: checkpoint has no EMA state but train.ema={tc.ema!r}")
            s.ema.load_state_dict(found[1]["ema"])
    if found is not None:
        set_rng_state(found[1]["rng"], device)
    return s, st


class StopSignal:
    """While active (main thread only), SIGTERM sets `requested` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class StepRows:
    """train.step_batch_copy: each step's token rows for this rank (DistributedTokenLoader.next_step)
    in one copy to the device. On CUDA they are read straight into a pinned int32 host buffer
    (two, used in turn; one is rewritten only once its last copy is done) and copied without
    making the host wait; elsewhere they are the loader's array as a tensor."""

    def __init__(self, loader: Any, device: torch.device):
        self.loader, self.device = loader, device
        self.host: list[tuple[Tensor, Any]] = []  # (pinned buffer, the event after its last copy)
        self.n = 0

    def next(self, global_tokens: int, seq_len: int, accum: int) -> Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(self.loader.next_step(global_tokens, seq_len, accum))
        shape = self.loader.step_shape(global_tokens, seq_len, accum)
        if not self.host or tuple(self.host[0][0].shape) != shape:
            self.host = [(torch.empty(shape, dtype=torch.int32, pin_memory=True), None) for _ in range(2)]
        slot = self.n % 2
        self.n += 1
        buf, done = self.host[slot]
        if done is not None:
            done.synchronize()
        self.loader.next_step(global_tokens, seq_len, accum, out=buf.numpy())
        rows = buf.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.host[slot] = (buf, ev)
        return rows


class FiniteWatch:
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


class TrainClock:
    """Training time in ms over all sessions, kept in st.train_ms: it runs from `start`, is
    folded into st.train_ms by `stop`, and `paused()` stops it around validation/checkpoints."""

    def __init__(self, st: TrainState, device: torch.device):
        self.st, self.device, self.t0 = st, device, time.perf_counter()

    def start(self) -> None:
        synchronize(self.device)
        self.t0 = time.perf_counter()

    def ms(self) -> float:
        return self.st.train_ms + 1000.0 * (time.perf_counter() - self.t0)

    def stop(self) -> None:
        synchronize(self.device)
        self.st.train_ms = self.ms()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.stop()
        yield
        self.start()


@torch.no_grad()
def all_finite(model: nn.Module) -> bool:
    """Every parameter finite (one device sync: called only before a checkpoint is written)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all().item())
