"""A training run's state between sessions and around the compile warm-up: the run folder's
checkpoints, the resume rules, and RNG capture.

- `TrainState`: what the training loop changes (step, training time, lmcore's QAT); with the
  tensors of model, optimizers, EMA and loader it is what a checkpoint holds.
- Checkpoints: RUN/checkpoints/step_NNNNNN.pt, written atomically (`save_checkpoint`);
  `load_resumable_checkpoint` takes the newest one that loads and names each unreadable
  newer one; `restore_checkpoint` puts one back into model, optimizers and loader.
- The run folder: `prepare_run_dir` refuses a fresh run into a folder that holds one and a
  resume without checkpoints or with another configuration (only RESUMABLE_FIELDS may
  change); `open_run_dir` writes config.json (a fresh run also drops old metrics);
  `truncate_metrics` drops the lines a resumed session writes again; `save_model` writes
  model.pt.
- RNG: `rng_state` / `set_rng_state` capture and restore Python's, NumPy's, torch's and
  CUDA's generators (checkpoints hold them, so a resume continues bit-exactly on CPU);
  `MemorySnapshot` keeps model, optimizers, loader and RNG in memory so that the compile
  warm-up steps can be undone.
"""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmcore.config import Config, ConfigError
from lmcore.errors import InputError, InputNotFound
from lmcore.runs import atomic_write_bytes, atomic_write_text, read_jsonl

__all__ = [
    "CHECKPOINT_FORMAT", "METRICS_NAME", "MemorySnapshot", "RESUMABLE_FIELDS", "TrainState", "checkpoints", "latest_checkpoint",
    "load_resumable_checkpoint", "open_run_dir", "prepare_run_dir", "restore_checkpoint", "rng_state",
    "save_checkpoint", "save_model", "set_rng_state", "truncate_metrics",
]

# Fields that may differ between a run's config.json and the config it is resumed with.
RESUMABLE_FIELDS = ("train.iterations", "train.max_wallclock_seconds", "train.log_every", "train.checkpoint_every")
CHECKPOINT_FORMAT = 1
METRICS_NAME = "metrics.jsonl"
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


@dataclass
class TrainState:
    """What the training loop changes, besides the tensors; saved in every checkpoint."""

    step: int = 0
    train_ms: float = 0.0  # all sessions; excludes warm-up, validation, checkpoints
    qat_on: bool = False
    qat_step: int | None = None  # where lmcore's late QAT switched on
    qat_warning: str | None = None  # set when it switched on within the first 10% of the run


# ---------------------------------------------------------------------------- checkpoint files


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


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    *,
    model: nn.Module,
    opt: Any,
    ema: Any,
    loader: Any,
    cfg: Config,
    world_size: int,
    device: torch.device,
) -> Path:
    """Write RUN/checkpoints/step_NNNNNN.pt (atomically): everything a resume needs."""
    path = run_dir / "checkpoints" / f"step_{state.step:06d}.pt"
    _save_torch(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "step": state.step,
            "train_ms": state.train_ms,
            "model": _cpu_state(model),
            "optimizers": _to_cpu(opt.state_dict()),
            "ema": ema.state_dict() if ema is not None else None,
            "loader": loader.state_dict(),
            "qat": state.qat_on,
            "qat_step": state.qat_step,
            "qat_warning": state.qat_warning,
            "rng": rng_state(device),
            "config": cfg.to_dict(),
            "world_size": world_size,
        },
    )
    return path


def restore_checkpoint(ckpt: dict[str, Any], *, model: nn.Module, opt: Any, loader: Any) -> TrainState:
    """Load model, optimizers and loader position from `ckpt`; returns its TrainState.

    The EMA and the RNG states are restored by the caller at their own moment (after the
    compile warm-up, which must not disturb them).
    """
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizers"])
    loader.load_state_dict(ckpt["loader"])
    return TrainState(
        step=int(ckpt["step"]),
        train_ms=float(ckpt["train_ms"]),
        qat_on=bool(ckpt["qat"]),
        qat_step=ckpt.get("qat_step"),
        qat_warning=ckpt.get("qat_warning"),
    )


def save_model(run_dir: Path, model: nn.Module, cfg: Config) -> None:
    """RUN/model.pt: {"model": state_dict on CPU, "config": dict} (atomically)."""
    _save_torch(run_dir / "model.pt", {"model": _cpu_state(model), "config": cfg.to_dict()})


# ---------------------------------------------------------------------------- the run folder


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Validate the folder for a fresh run or a resume (nothing is written)."""
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


def open_run_dir(run_dir: Path, cfg: Config, resuming: bool) -> None:
    """Create the folder and write config.json; a fresh run drops old metrics (METRICS_NAME)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        (run_dir / METRICS_NAME).unlink(missing_ok=True)
    cfg.save(run_dir / "config.json")


def truncate_metrics(path: Path, step: int) -> None:
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


# ---------------------------------------------------------------------------- RNG and memory snapshots


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python's, NumPy's and torch's generator states (and `device`'s CUDA one), picklable."""
    np_state = np.random.get_state()
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` captured (also after a round trip through torch.save/load)."""
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


class MemorySnapshot:
    """Model weights, optimizer states (cloned on their device), loader position and RNG
    states, kept in memory when made and put back by `restore` (the compile warm-up's undo)."""

    def __init__(self, *, model: nn.Module, opt: Any, loader: Any, device: torch.device):
        self.model, self.opt, self.loader, self.device = model, opt, loader, device
        self._model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._opt = _clone_state(opt.state_dict())
        self._loader = loader.state_dict()
        self._rng = rng_state(device)

    def restore(self) -> None:
        self.model.load_state_dict(self._model)
        self.opt.load_state_dict(self._opt)
        self.loader.load_state_dict(self._loader)
        set_rng_state(self._rng, self.device)
        del self._model, self._opt


# ---------------------------------------------------------------------------- helpers


def _save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return _to_cpu(dict(model.state_dict()))


def _map_tensors(obj: Any, fn: Any) -> Any:
    """`obj` (nested dicts / lists / tuples) with fn applied to every tensor."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


def _clone_state(obj: Any) -> Any:
    """Deep copy of a (nested) optimizer state dict, tensors cloned on their device."""
    return _map_tensors(obj, lambda t: t.detach().clone())


def _to_cpu(obj: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor on the CPU."""
    return _map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))
