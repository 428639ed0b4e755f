"""Where a training step's milliseconds go: one optimizer step under torch.profiler
(`train.profile_step=N` profiles step N), written to RUN/profile/: `trace.json.gz` (a Chrome /
Perfetto trace) and `breakdown.json`: the step's wall time, the device's busy time, the time
by category (gemm, attention, communication, fused elementwise from inductor's Triton
kernels, eager elementwise, memory copies, other) and the 20 most expensive kernels (on a CPU run: aten ops).
The categories come from kernel names (`category`); busy time below the wall time is the
device waiting (launch overhead, the host, synchronisation).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmcore.runs import atomic_write_json

__all__ = ["CATEGORIES", "breakdown", "category", "profile_step"]

# (category, name fragments), first match wins; names are compared in lower case
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl", "gloo", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "c10d")),
    ("attention", ("flash", "fmha", "sdpa", "scaled_dot_product", "attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "triton_tem", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm",
              "aten::matmul", "aten::linear")),
    ("memory", ("memcpy", "memset", "aten::copy_", "aten::to", "aten::clone")),
    ("fused elementwise (triton)", ("triton",)),
    ("elementwise (aten)", ("elementwise_kernel", "reduce_kernel", "at::native")),
)


def category(name: str) -> str:
    """The category of a kernel or op name (see CATEGORIES), else "other"."""
    low = name.lower()
    for cat, frags in CATEGORIES:
        if any(f in low for f in frags):
            return cat
    return "other"


def _self_ms(evt: Any, on_device: bool) -> float:
    if on_device:
        us = getattr(evt, "self_device_time_total", None)
        if us is None:  # older torch
            us = getattr(evt, "self_cuda_time_total", 0.0)
    else:
        us = evt.self_cpu_time_total
    return float(us) / 1000.0


def breakdown(prof: torch.profiler.profile, *, on_device: bool, wall_ms: float, top: int = 20) -> dict[str, Any]:
    """The profile as {wall_ms, busy_ms, categories: {name: ms}, top: [...]}: device (CUDA)
    self time per kernel when `on_device`, else CPU self time per op."""
    rows = []
    for evt in prof.key_averages():
        ms = _self_ms(evt, on_device)
        if ms > 0:
            rows.append({"name": evt.key, "ms": round(ms, 4), "calls": int(evt.count), "category": category(evt.key)})
    rows.sort(key=lambda r: -r["ms"])
    cats: dict[str, float] = {}
    for r in rows:
        cats[r["category"]] = cats.get(r["category"], 0.0) + r["ms"]
    busy = sum(cats.values())
    return {
        "on_device": on_device, "wall_ms": round(wall_ms, 3), "busy_ms": round(busy, 3),
        "categories": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top": rows[:top],
    }


@contextlib.contextmanager
def profile_step(out_dir: str | Path, device: torch.device, *, step: int, enabled: bool = True) -> Iterator[None]:
    """Profile the enclosed block (one optimizer step) into out_dir (see the module
    docstring); a no-op when not `enabled` (e.g. on ranks other than 0)."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    on_device = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tprofile(activities=acts, record_shapes=False) as prof:
        if on_device:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if on_device:
            torch.cuda.synchronize(device)
        wall_ms = 1000.0 * (time.perf_counter() - t0)
    info = breakdown(prof, on_device=on_device, wall_ms=wall_ms)
    info["step"] = int(step)
    info["device"] = torch.cuda.get_device_name(device) if on_device else "cpu"
    raw = out / ".trace.json"
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(out / ".trace.json.gz.tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (out / ".trace.json.gz.tmp").replace(out / "trace.json.gz")
    raw.unlink()
    atomic_write_json(out / "breakdown.json", info)
    print(f"profile of step {step}: {json.dumps(info['categories'])} (wall {wall_ms:.1f} ms) -> {out}", flush=True)
