"""Where consecutive training steps' wall time goes, on every rank (issue 16's 2-rank idle time).

A profiled step in a training run (`train.profile_step`) starts from a drained queue on rank 0
only, so it shows a step's kernels but not what happens between steps, nor on the other rank.
This script runs the training loop's steps (lmcore.session's `train_step`, the FiniteWatch, the
log steps' collectives, as `lmcore.train._train` does) after the compile warm-up, and measures:
  1. STEADY steps, unprofiled: per step and rank the GPU's time from one step's start to the
     next (CUDA events recorded as each step is enqueued), the host's time to enqueue the step,
     and the host's time blocked (the FiniteWatch's event wait, the log steps' syncs);
  2. PROFILE more steps under torch.profiler on every rank at once (no sync before them): per
     step and rank the device's busy time, its idle time split into gaps where the host had not
     yet launched the next kernel ("host") and gaps with the next kernel already launched
     ("device": waits on other streams, events, NCCL), NCCL's kernel time, and the longest
     gaps with the kernels around them and the host calls that overlapped them.
Each rank writes OUT/timeline_rank{R}.json; rank 0 then prints the tables. On a CPU (tests) the
profile has no device events and only part 1 is meaningful.

  torchrun --nproc_per_node=2 benchmarks/step_timeline.py --preset record --set ... --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from lmcore.config import preset
from lmcore.optim import muon_momentum
from lmcore.profiling import DEVICE_EVENT_CATS, SHORT_GAP_US, category
from lmcore.runtime import dist_from_env, init_distributed, pick_device, shutdown_distributed, synchronize
from lmcore.session import FiniteWatch, start_session
from lmcore.train import _agree_on_stop, _compile_warmup, _compile_warmup_steps

STEP_MARK = "timeline_step_"


def _step(s: Any, step: int, watch: FiniteWatch, log_every: int) -> tuple[float, float]:
    """One step as lmcore.train._train runs it at a constant LR (no validation, no checkpoint).
    Returns (host ms to enqueue it, host ms blocked after it)."""
    t0 = time.perf_counter()
    s.opt.set_lr_mul(1.0)
    s.opt.set_momentum(muon_momentum(step, s.cfg.train))
    loss, grad_norm = s.train_step()
    if s.ema is not None:
        s.ema.update()
    t1 = time.perf_counter()
    watch.push(step + 1, grad_norm)
    if log_every > 0 and (step + 1) % log_every == 0:  # the log step's collectives and syncs
        _agree_on_stop(s, False, False, collective=True)
        if s.dist.distributed:
            tdist.all_reduce(loss, op=tdist.ReduceOp.SUM)
        float(loss.item())
    return 1000.0 * (t1 - t0), 1000.0 * (time.perf_counter() - t1)


def steady(s: Any, first: int, n: int, watch: FiniteWatch, log_every: int) -> list[dict[str, float]]:
    """n unprofiled steps from step `first`: per step the GPU ms (start to the next start), the
    host's enqueue ms and blocked ms."""
    cuda = s.device.type == "cuda"
    marks, host = [], []
    for i in range(n):
        ev = torch.cuda.Event(enable_timing=True) if cuda else None
        if ev is not None:
            ev.record()
        marks.append((ev, time.perf_counter()))
        host.append(_step(s, first + i, watch, log_every))
    end = torch.cuda.Event(enable_timing=True) if cuda else None
    if end is not None:
        end.record()
    synchronize(s.device)
    marks.append((end, time.perf_counter()))
    rows = []
    for i in range(n):
        (a, ta), (b, tb) = marks[i], marks[i + 1]
        gpu = a.elapsed_time(b) if cuda else 1000.0 * (tb - ta)
        rows.append({"step": first + i + 1, "gpu_ms": round(gpu, 3), "enqueue_ms": round(host[i][0], 3),
                     "blocked_ms": round(host[i][1], 3)})
    return rows


def analyze(events: list[dict[str, Any]], *, top: int = 8) -> list[dict[str, Any]]:
    """Per profiled step (its device events: those launched while the host ran its STEP_MARK
    annotation; a step runs from its first device event to the next step's first, the last to its
    own last event's end): busy ms, idle split into host / device gaps (see the module docstring),
    NCCL kernel ms and the `top` longest gaps."""
    dev = sorted((e for e in events if e.get("cat") in DEVICE_EVENT_CATS and "dur" in e), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host_calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver", "cpu_op", "user_annotation")
                  and "dur" in e and not str(e.get("name", "")).startswith(STEP_MARK)]
    marks = sorted((e for e in events if e.get("cat") == "user_annotation"
                    and str(e.get("name", "")).startswith(STEP_MARK)), key=lambda e: e["ts"])

    def launched(e: dict[str, Any]) -> dict[str, Any] | None:
        return launches.get(e.get("args", {}).get("correlation"))

    starts: list[float | None] = []
    ends: list[float] = []
    for m in marks:
        a, b = float(m["ts"]), float(m["ts"]) + float(m["dur"])
        mine = [e for e in dev if (ln := launched(e)) is not None and a <= float(ln["ts"]) < b]
        starts.append(min((float(e["ts"]) for e in mine), default=None))
        ends.append(max((float(e["ts"]) + float(e["dur"]) for e in mine), default=0.0))
    out = []
    for k, m in enumerate(marks):
        lo = starts[k]
        if lo is None:
            continue
        nxt = next((x for x in starts[k + 1:] if x is not None), None)
        hi = nxt if nxt is not None else ends[k]
        busy = host_gap = dev_gap = short = nccl = 0.0
        gaps = []
        end, prev = lo, None
        for e in (e for e in dev if lo <= e["ts"] < hi):
            a, b = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            if category(e["name"]) == "communication":
                nccl += b - a
            if a > end:
                gap = a - end
                if gap < SHORT_GAP_US:
                    short += gap
                else:
                    ln = launched(e)
                    h = min(max(float(ln["ts"]) + float(ln.get("dur", 0.0)) - end, 0.0), gap) if ln else 0.0
                    host_gap += h
                    dev_gap += gap - h
                    gaps.append({"us": round(gap, 1), "host_us": round(h, 1), "after": prev, "before": e["name"][:80],
                                 "at": (end, a)})
            if b > end:
                busy += b - max(a, end)
                end = b
            prev = e["name"][:80]
        out.append({
            "step": m["name"][len(STEP_MARK):], "start_us": lo, "span_ms": round((hi - lo) / 1000, 3), "busy_ms": round(busy / 1000, 3),
            "host_gap_ms": round(host_gap / 1000, 3), "device_gap_ms": round(dev_gap / 1000, 3),
            "short_gap_ms": round(short / 1000, 3), "tail_ms": round(max(hi - end, 0.0) / 1000, 3),
            "nccl_ms": round(nccl / 1000, 3), "gaps": sorted(gaps, key=lambda g: -g["us"])[:top],
        })
        for g in out[-1]["gaps"]:
            g["host_calls"] = _overlapping(host_calls, *g.pop("at"))
    return out


def _overlapping(calls: list[dict[str, Any]], a: float, b: float, n: int = 3) -> list[str]:
    """The host calls covering at least half of [a, b], innermost (shortest) first."""
    need = 0.5 * (b - a)
    hits = [c for c in calls if min(b, c["ts"] + c["dur"]) - max(a, c["ts"]) >= need]
    return [f"{c['name'][:60]} ({c['dur'] / 1000:.2f} ms)" for c in sorted(hits, key=lambda c: c["dur"])[:n]]


def profiled(s: Any, first: int, n: int, watch: FiniteWatch, log_every: int, trace: Path | None) -> list[dict[str, Any]]:
    """n steps from `first` under torch.profiler on this rank, analysed (see `analyze`)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(n):
            with record_function(f"{STEP_MARK}{first + i + 1}"):
                _step(s, first + i, watch, log_every)
        synchronize(s.device)
    raw = Path(f"/tmp/timeline_{os.getpid()}.json") if trace is None else trace
    prof.export_chrome_trace(str(raw))
    data = json.loads(raw.read_text())
    if trace is None:
        raw.unlink()
    rows = analyze(data.get("traceEvents", []))
    for r in rows:  # the trace's clock and its base (to put the ranks' steps side by side)
        r["base_ns"] = data.get("baseTimeNanoseconds")
    return rows


def report(files: list[Path]) -> str:
    """The markdown tables of the ranks' JSON files."""
    lines = ["| rank | step | GPU ms | enqueue ms | blocked ms |", "|---|---|---|---|---|"]
    runs = [json.loads(f.read_text()) for f in files]
    for r in runs:
        lines += [f"| {r['rank']} | {x['step']} | {x['gpu_ms']:.1f} | {x['enqueue_ms']:.1f} | {x['blocked_ms']:.1f} |"
                  for x in r["steady"]]
    lines += ["", "| rank | step | span ms | busy | host gaps | device gaps | short gaps | tail | NCCL |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines += [f"| {r['rank']} | {x['step']} | {x['span_ms']:.1f} | {x['busy_ms']:.1f} | {x['host_gap_ms']:.2f} | "
                  f"{x['device_gap_ms']:.2f} | {x['short_gap_ms']:.2f} | {x['tail_ms']:.2f} | {x['nccl_ms']:.2f} |"
                  for x in r["profiled"]]
    lines += ["", "Longest gaps (rank, step: us, of which host; after -> before; host calls over them):"]
    for r in runs:
        for x in r["profiled"]:
            lines += [f"- {r['rank']}, {x['step']}: {g['us']:.0f} us ({g['host_us']:.0f} host); {g['after']} -> "
                      f"{g['before']}; {', '.join(g['host_calls']) or '-'}" for g in x["gaps"][:4]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="record")
    ap.add_argument("--set", action="append", default=[], help="section.field=value (repeatable)")
    ap.add_argument("--run-dir", required=True, help="a scratch run folder (config.json goes there)")
    ap.add_argument("--out", required=True, help="folder for timeline_rank{R}.json and timeline.md")
    ap.add_argument("--steps", type=int, default=20, help="unprofiled steady steps")
    ap.add_argument("--profile", type=int, default=3, help="profiled steps after them")
    ap.add_argument("--skip", type=int, default=5, help="steps run before the steady ones (not measured)")
    ap.add_argument("--log-every", type=int, default=10, help="a log step's collectives every N steps (0: none)")
    ap.add_argument("--trace", action="store_true", help="keep each rank's Chrome trace in OUT")
    args = ap.parse_args(argv)
    dist = dist_from_env(os.environ)
    cfg = preset(args.preset, args.set).validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.train.device, dist.local_rank)
    init_distributed(dist, device)
    try:
        s, _ = start_session(cfg, Path(args.run_dir), dist, device=device, resume=False, progress=False)
        _compile_warmup(s, _compile_warmup_steps(cfg.train, device))
        s.model.train()
        watch = FiniteWatch(device)
        for i in range(args.skip):
            _step(s, i, watch, args.log_every)
        rows = steady(s, args.skip, args.steps, watch, args.log_every)
        trace = out / f"trace_rank{dist.rank}.json" if args.trace else None
        prof = profiled(s, args.skip + args.steps, args.profile, watch, args.log_every, trace)
        watch.flush()
        info = {"rank": dist.rank, "world_size": dist.world_size, "device": str(device),
                "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "overrides": args.set, "steady": rows, "profiled": prof}
        (out / f"timeline_rank{dist.rank}.json").write_text(json.dumps(info, indent=1))
        if dist.distributed:
            tdist.barrier()
        if dist.is_main:
            table = report(sorted(out.glob("timeline_rank*.json")))
            (out / "timeline.md").write_text(table + "\n")
            print(table, flush=True)
    finally:
        if dist.distributed:
            shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
