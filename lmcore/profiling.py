"""Where a training step's milliseconds go: one optimizer step under torch.profiler
(`train.profile_step=N` profiles step N), written to RUN/profile/: `trace.json.gz` (a Chrome /
Perfetto trace) and `breakdown.json`: the step's wall time, the device's busy time, the time
by category (gemm, attention, communication, fused elementwise from inductor's Triton
kernels, eager elementwise, memory copies, other), the 20 most expensive kernels and every
kernel's time (`kernels`, what two profiles are compared by) and when the step ran (`unix_s`:
start and end, seconds since the epoch, to find the card's clock samples of that step).

On a GPU the breakdown is read off the trace's device events (kernels, memcpy, memset) alone:
the profiler also gives host ops such as `aten::mm` a device time (that of the kernels they
launch), so summing its per-op table would count those kernels twice. Busy time is the union
of the device events' intervals (kernels on concurrent streams count once); wall minus busy is
the device waiting (launch overhead, the host, synchronisation). `gaps` splits the waiting
between device events by length: gaps under SHORT_GAP_US are one kernel's turnaround to the
next (what CUDA graphs can shorten), longer ones the device waiting for the host (the profiled
step starts with a drained queue, so its first micro-batch shows the host launching). The rest
of wall minus busy lies before the first and after the last device event. On a CPU run the
breakdown is the aten ops' own CPU time. The categories come from the names (`category`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmcore.runs import atomic_write_json

__all__ = ["CATEGORIES", "category", "device_breakdown", "host_breakdown", "profile_step"]

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


DEVICE_EVENT_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SHORT_GAP_US = 20.0  # device idle between two events shorter than this: launch turnaround


def _table(rows: dict[str, list[float]], wall_ms: float, busy_ms: float, top: int, on_device: bool) -> dict[str, Any]:
    """{name: [ms, calls]} as the breakdown dict."""
    table = sorted(({"name": n, "ms": round(ms, 4), "calls": int(c), "category": category(n)}
                    for n, (ms, c) in rows.items() if ms > 0), key=lambda r: -r["ms"])
    cats: dict[str, float] = {}
    for r in table:
        cats[r["category"]] = cats.get(r["category"], 0.0) + r["ms"]
    return {
        "on_device": on_device, "wall_ms": round(wall_ms, 3), "busy_ms": round(busy_ms, 3),
        "categories": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top": table[:top],
        "kernels": {r["name"]: [r["ms"], r["calls"]] for r in table},  # every one: {name: [ms, calls]}
    }


def device_breakdown(events: list[dict[str, Any]], *, wall_ms: float, top: int = 20) -> dict[str, Any]:
    """The breakdown of a Chrome trace's events (dicts with cat, name, ts, dur in us): device
    events only (DEVICE_EVENT_CATS), per name; busy = the union of their intervals."""
    rows: dict[str, list[float]] = {}
    spans = []
    for e in events:
        if e.get("cat") not in DEVICE_EVENT_CATS or "dur" not in e:
            continue
        r = rows.setdefault(e["name"], [0.0, 0])
        r[0] += e["dur"] / 1000.0
        r[1] += 1
        spans.append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    busy_us, end = 0.0, float("-inf")
    short_us, long_us, n_long = 0.0, 0.0, 0
    for a, b in sorted(spans):
        if a > end > float("-inf"):  # idle between the union's intervals
            if a - end < SHORT_GAP_US:
                short_us += a - end
            else:
                long_us, n_long = long_us + a - end, n_long + 1
        if b > end:
            busy_us += b - max(a, end)
            end = b
    info = _table(rows, wall_ms, busy_us / 1000.0, top, on_device=True)
    info["gaps"] = {"short_ms": round(short_us / 1000.0, 3), "long_ms": round(long_us / 1000.0, 3), "long": n_long}
    return info


def host_breakdown(prof: torch.profiler.profile, *, wall_ms: float, top: int = 20) -> dict[str, Any]:
    """The breakdown of a CPU run: each aten op's own (self) CPU time; busy = their sum."""
    rows = {evt.key: [float(evt.self_cpu_time_total) / 1000.0, evt.count] for evt in prof.key_averages()}
    return _table(rows, wall_ms, sum(ms for ms, _ in rows.values() if ms > 0), top, on_device=False)


@contextlib.contextmanager
def profile_step(
    out_dir: str | Path,
    device: torch.device,
    *,
    step: int,
    enabled: bool = True,
    pause: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Iterator[None]:
    """Profile the enclosed block (one optimizer step) into out_dir (see the module
    docstring); a no-op when not `enabled` (e.g. on ranks other than 0). Writing the trace
    and the breakdown runs under `pause()` (training passes its clock's pause, so the seconds
    of export do not count as training time)."""
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
        t0, unix0 = time.perf_counter(), time.time()
        yield
        if on_device:
            torch.cuda.synchronize(device)
        wall_ms = 1000.0 * (time.perf_counter() - t0)
    with pause():
        _export(prof, out, on_device=on_device, wall_ms=wall_ms, step=step, device=device,
                unix=(unix0, unix0 + wall_ms / 1000.0))


def _export(prof: torch.profiler.profile, out: Path, *, on_device: bool, wall_ms: float, step: int, device: torch.device,
            unix: tuple[float, float]) -> None:
    raw = out / ".trace.json"
    prof.export_chrome_trace(str(raw))
    if on_device:
        with raw.open() as f:
            info = device_breakdown(json.load(f).get("traceEvents", []), wall_ms=wall_ms)
    else:
        info = host_breakdown(prof, wall_ms=wall_ms)
    info["step"] = int(step)
    info["device"] = torch.cuda.get_device_name(device) if on_device else "cpu"
    info["unix_s"] = [round(unix[0], 3), round(unix[1], 3)]  # when the step ran (wall clock), to match clock samples
    with raw.open("rb") as src, gzip.open(out / ".trace.json.gz.tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (out / ".trace.json.gz.tmp").replace(out / "trace.json.gz")
    raw.unlink()
    atomic_write_json(out / "breakdown.json", info)
    print(f"profile of step {step}: {json.dumps(info['categories'])} (wall {wall_ms:.1f} ms) -> {out}", flush=True)
