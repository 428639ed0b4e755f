"""Where and how code runs: device choice, autocast precision, seeding, distributed info
(and each rank's share of a list of items), and facts for run summaries (card name, git
commit). No environment reads: the CLI passes rank / world size in explicitly
(`dist_from_env(os.environ)`)."""

from __future__ import annotations

import contextlib
import functools
import gc
import random
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lmcore.errors import InputError


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The CUDA device's streaming multiprocessors, cached (persistent kernels size their grids by it)."""
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:local_rank if CUDA is available, else cpu. Asking for cuda without it fails."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} requested but CUDA is not available")
        dev = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise InputError(f"unknown device {name!r}: expected auto, cuda or cpu")
    return torch.device("cpu")


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    if precision == "auto":
        return device.type == "cuda"
    if precision not in ("bf16", "fp32"):
        raise InputError(f"precision {precision!r}: expected auto, bf16 or fp32")
    return precision == "bf16"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `bf16`, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


ONE_PROCESS = DistInfo()  # the default everywhere: one process, rank 0


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of n items for `rank` (the shares of all ranks tile [0, n))."""
    return (n * rank) // world_size, (n * (rank + 1)) // world_size


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Initialise the process group (NCCL on CUDA, gloo on CPU) when world_size > 1."""
    if info.world_size <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, **kwargs)


def shutdown_distributed() -> None:
    """Destroy the default process group (if any) and free its threads at once.

    Without the collection the group's gloo threads can outlive it into interpreter
    shutdown, where one of them aborts the process ("terminate called without an active
    exception", about one 2-rank CPU run in ten before this).
    """
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def dist_from_env(env: Mapping[str, str]) -> DistInfo:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK from `env` (the command line passes os.environ)."""
    try:
        return DistInfo(
            rank=int(env.get("RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
        )
    except ValueError as e:
        raise InputError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the lmcore checkout (None outside git), with '+dirty' when modified."""
    root = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
