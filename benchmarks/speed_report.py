"""Issue 16's speed table, as Markdown, from the results folder of benchmarks/speed.sh.

usage: python benchmarks/speed_report.py RESULTS_DIR

Reads peak.json (benchmarks/matmul_peak.py), the original's logs (orig_fa3_1.log,
orig_fa2_1.log, orig_fa3_2.log: its step_avg lines) and lmcore's run folders (LM_RUNS:
summary.json, metrics.jsonl, profile/breakdown.json; speed.sh's VARIANTS, named in variants.txt,
as lm_v_NAME_1, and on 2 ranks as lm_v_NAME_2 where LM2 ran them). Step ms is the original's last step_avg
and lmcore's mean_step_ms (both: training time over steps after the compile warm-up);
lmcore's median step from metrics.jsonl is given too. A second table gives the steady state:
the mean step over the 10-step windows past step 10 (lmcore's metrics.jsonl lines, the window
of its profiled step left out; the original's train_time lines), so that neither the first
steps nor the profiler count. Tokens/s and MFU are per GPU; MFU uses
lmcore.flops' training FLOPs per token of `record` (the same model in both) and the measured
peak. Where both profiles list every kernel, the kernel time that changed from before to
after. The same math: lmcore's 1-GPU runs' training losses step by step against "before"
(or "after" where no "before" ran: MATH_BASES), its twin giving the run-to-run noise. Anything
missing shows as "-".
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from fa3_report import original_step_ms, read_json  # this folder: the original's log parser, shared

from lmcore.config import preset
from lmcore.flops import count_flops
from lmcore.study.speed import loss_difference

TOKENS_PER_STEP = 786_432  # record: 8 micro-batches of 48 x 2048, split over the ranks
# lmcore's runs of speed.sh per rank count: (folder, label)
LM_RUNS = {
    1: [("lm_before_1", "lmcore before"), ("lm_before_1b", "lmcore before, again"),
        ("lm_solo_1", "lmcore solo (SOLO)"), ("lm_after_1", "lmcore after")],
    2: [("lm_before_2", "lmcore before"), ("lm_after_2", "lmcore after")],
}
# the same math's baseline: "before", or "after" (or "solo") where a 1-GPU job ran no "before" (ONE_GPU_RUNS)
MATH_BASES, MATH_TWIN = ("lm_before_1", "lm_after_1", "lm_solo_1"), "lm_before_1b"
# profiled steps whose idle times differ by more than this: their kernel times are not compared as work alone
# (session 16: the card runs at its power limit, so its clock rises after idle time)
IDLE_APART_MS = 20.0
# profiled runs whose kernel times are compared (both profiles must list every kernel)
KERNEL_PAIRS = [("lm_before_1", "lm_after_1"), ("lm_after_1", "lm_solo_1"), ("lm_before_2", "lm_after_2")]


def variants(res: Path) -> list[tuple[str, str, str]]:
    """speed.sh's VARIANTS ("NAME:overrides;..." in variants.txt): (folder, label, overrides)."""
    try:
        text = (res / "variants.txt").read_text().strip()
    except OSError:
        return []
    pairs = [v.split(":", 1) for v in text.split(";") if ":" in v]
    return [(f"lm_v_{name}_1", f"lmcore {name}", sets.strip()) for name, sets in pairs if name]


def variants_2(res: Path) -> list[tuple[str, str]]:
    """The variants that ran on 2 ranks (speed.sh's LM2 naming them): (folder lm_v_NAME_2, label)."""
    folders = ((f.removesuffix("_1") + "_2", label) for f, label, _ in variants(res))
    return [(f, label) for f, label in folders if (res / f).is_dir()]


def solo_2(res: Path) -> list[tuple[str, str]]:
    """SOLO on 2 ranks (speed.sh's LM2 naming solo), where it ran."""
    return [("lm_solo_2", "lmcore solo (SOLO)")] if (res / "lm_solo_2").is_dir() else []


def lm_runs(res: Path, ranks: int) -> list[tuple[str, str]]:
    """LM_RUNS[ranks], then solo on 2 ranks where it ran, then the job's variants: every one on one
    GPU, those that ran on 2 ranks."""
    if ranks == 1:
        return LM_RUNS[1] + [(f, label) for f, label, _ in variants(res)]
    return LM_RUNS[2] + solo_2(res) + variants_2(res)


def kernel_pairs(res: Path) -> list[tuple[str, str]]:
    """KERNEL_PAIRS, each variant against after and solo (those of the two that ran; in a 2-GPU job
    after ran on GPU 0, like the variants, and solo on GPU 1), and solo and each variant on 2 ranks
    against after on 2 ranks."""
    bases = [r for r in ("lm_after_1", "lm_solo_1") if (res / r / "profile" / "breakdown.json").exists()]
    return (KERNEL_PAIRS + [(b, f) for f, _, _ in variants(res) for b in bases]
            + [("lm_after_2", f) for f, _ in solo_2(res) + variants_2(res)])


def train_lines(run: Path) -> list[dict]:
    try:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []
    return [r for r in lines if r.get("kind") == "train"]


def median_step_ms(run: Path) -> float | None:
    ms = [r["step_ms"] for r in train_lines(run) if r.get("step_ms") and r["step"] > 1]
    return statistics.median(ms) if ms else None


def steady_ms_lmcore(run: Path) -> float | None:
    """Mean step ms over the logged 10-step windows past step 10, the profiled step's left out."""
    prof = read_json(run / "config.json").get("train", {}).get("profile_step", 0)
    ms = [r["step_ms"] for r in train_lines(run)
          if r["step"] > 10 and r["step"] % 10 == 0 and not r["step"] - 10 < prof <= r["step"]]
    return statistics.mean(ms) if ms else None


def steady_ms_original(log: Path) -> float | None:
    """Mean step ms of the original past step 10, from its train_time at the logged steps."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    t = {int(a): int(b) for a, b in re.findall(r"step:(\d+)/\d+ train_loss:[\d.]+ train_time:(\d+)ms", text)}
    logged = sorted(k for k in t if k >= 10)
    return (t[logged[-1]] - t[logged[0]]) / (logged[-1] - logged[0]) if len(logged) > 1 else None


def steady_rows(res: Path) -> list[tuple[str, int, float | None, float | None, float | None]]:
    """(run, ranks, steady ms, vs original FA3, vs original FA2), the originals first."""
    rows = []
    for ranks in (1, 2):
        fa3, fa2 = steady_ms_original(res / f"orig_fa3_{ranks}.log"), steady_ms_original(res / "orig_fa2_1.log")
        entries = [("original, real FA3", fa3)] + ([("original, FA2 shim", fa2)] if ranks == 1 else [])
        entries += [(label, steady_ms_lmcore(res / folder)) for folder, label in lm_runs(res, ranks)]
        for name, ms in entries:
            rows.append((name, ranks, ms, fa3 / ms if ms and fa3 else None, fa2 / ms if ms and fa2 and ranks == 1 else None))
    return rows


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def speed_rows(res: Path, flops: float, peak: float | None) -> list[dict]:
    rows = []
    base: dict[int, dict[str, float | None]] = {}
    for ranks in (1, 2):
        base[ranks] = {"fa3": original_step_ms(res / f"orig_fa3_{ranks}.log")[0],
                       "fa2": original_step_ms(res / f"orig_fa2_{ranks}.log")[0]}
        entries = [("original, real FA3", "fa3", base[ranks]["fa3"], None),
                   ("original, FA2 shim", "fa2 (SDPA flash)", base[ranks]["fa2"], None)]
        for folder, label in lm_runs(res, ranks):
            s = read_json(res / folder / "summary.json")
            entries.append((label, s.get("attention_backend", "-"), s.get("mean_step_ms"), res / folder))
        for name, kernel, ms, run in entries:
            if ms is None and run is None and name.endswith("shim") and ranks == 2:
                continue  # the FA2 original runs on one GPU only
            tps = TOKENS_PER_STEP / ranks / (ms / 1000.0) if ms else None
            rows.append({
                "run": name, "ranks": ranks, "kernel": kernel, "step_ms": ms,
                "median_ms": median_step_ms(run) if run is not None else None, "tokens_per_s": tps,
                "mfu": tps * flops / (peak * 1e12) if tps and peak else None,
                "vs_fa3": base[ranks]["fa3"] / ms if ms and base[ranks]["fa3"] else None,
                "vs_fa2": base[1]["fa2"] / ms if ms and base[1]["fa2"] and ranks == 1 else None,
            })
    return rows


def kernel_family(name: str) -> str:
    """A kernel's name without inductor's trailing number (triton_..._view_7 -> triton_..._view),
    so the same fused kernel is matched across two compiles."""
    head, _, tail = name.rpartition("_")
    return head if head.startswith("triton_") and tail.isdigit() else name


def kernel_changes(before: dict, after: dict, n: int = 8) -> list[tuple[str, float, float]]:
    """The n largest decreases then the n largest increases of kernel time per family between
    two breakdowns' `kernels` ({name: [ms, calls]}): (family, ms before, ms after)."""
    fams: dict[str, list[float]] = {}
    for i, b in enumerate((before, after)):
        for name, (ms, _) in b.items():
            fams.setdefault(kernel_family(name), [0.0, 0.0])[i] += ms
    diffs = sorted(((f, a, b) for f, (a, b) in fams.items() if a != b), key=lambda r: r[2] - r[1])
    return [r for r in diffs if r[2] < r[1]][:n] + [r for r in diffs if r[2] > r[1]][-n:]


def same_math(res: Path) -> list[str]:
    """One line per 1-GPU run against the first of MATH_BASES that ran (lmcore.study.loss_difference):
    the largest and the mean step-by-step difference of the training loss over the steps both
    logged, and both final losses; MATH_TWIN's line is the run-to-run noise."""
    base_run = next((b for b in MATH_BASES if train_lines(res / b)), MATH_BASES[0])
    base = {r["step"]: r["train_loss"] for r in train_lines(res / base_run)}
    out = []
    for folder, label in lm_runs(res, 1):
        d = loss_difference(base, {r["step"]: r["train_loss"] for r in train_lines(res / folder)})
        if folder == base_run or not d["steps"]:
            continue
        what = "run-to-run noise" if folder == MATH_TWIN else "difference"
        out.append(f"Same math, {label} ({folder}) against {base_run}, {d['steps']} steps, seed 1337: {what} "
                   f"max |loss - loss| = {d['max_abs_diff']:.4f}, mean {d['mean_abs_diff']:.4f}; last step "
                   f"{d['last_step']}: {d['last_loss_baseline']:.4f} vs {d['last_loss']:.4f}.")
    return out


def main(res: Path) -> int:
    peak_info = read_json(res / "peak.json")
    peak = peak_info.get("peak_tflops")
    f = count_flops(preset("record"))
    card = peak_info.get("card") or read_json(res / "lm_after_1" / "summary.json").get("card", "?")
    print(f"Card: {card}; torch {peak_info.get('torch', '?')}; measured bf16 matmul peak "
          f"{_f(peak, '.1f')} TFLOP/s; record's training FLOPs per token {f.train / 1e6:.1f} M "
          f"(lmcore.flops, causal); {TOKENS_PER_STEP:,} tokens a step (48 x 2048 micro-batches).")
    if peak_info.get("sustained_tflops"):  # matmul_peak.py --sustain: the rate at the card's power limit
        held = peak_info["sustained_tflops"]
        print(f"At its power limit the card held {held:.1f} TFLOP/s ({peak_info.get('sustained_seconds', '?')} s of "
              f"8192-size matmuls, the second half timed): an MFU against that is the MFU column x {peak / held:.3f}.")
    levers = read_json(res / "levers.json")  # speed.sh's BEFORE, LEVERS ("after") and SOLO, where it wrote them
    for name in ("before", "after", "solo"):
        if levers.get(name):
            print(f"{name}: `{levers[name]}`  ")
    for _, label, sets in variants(res):
        print(f"{label.removeprefix('lmcore ')} (variant): `{sets}`  ")
    print()
    print("| run | ranks | kernel | step ms | median step ms | tokens/s per GPU | MFU | vs original FA3 | vs original FA2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in speed_rows(res, f.train, peak):
        print(f"| {r['run']} | {r['ranks']} | {r['kernel']} | {_f(r['step_ms'], '.1f')} | {_f(r['median_ms'], '.1f')} | "
              f"{_f(r['tokens_per_s'], ',.0f')} | {_f(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
              f"{_f(r['vs_fa3'], '.3f')}{'x' if r['vs_fa3'] else ''} | {_f(r['vs_fa2'], '.3f')}{'x' if r['vs_fa2'] else ''} |")
    print()
    print("Steady state (10-step windows past step 10; lmcore's profiled window left out):")
    print()
    print("| run | ranks | steady step ms | vs original FA3 | vs original FA2 |")
    print("|---|---|---|---|---|")
    for name, ranks, ms, v3, v2 in steady_rows(res):
        if ms is not None:
            print(f"| {name} | {ranks} | {ms:.1f} | {_f(v3, '.3f')}{'x' if v3 else ''} | {_f(v2, '.3f')}{'x' if v2 else ''} |")
    for run in [folder for ranks in LM_RUNS for folder, _ in lm_runs(res, ranks)]:
        b = read_json(res / run / "profile" / "breakdown.json")
        if not b:
            continue
        print()
        print(f"Profile of {run}, step {b['step']} (rank 0): wall {b['wall_ms']:.1f} ms, GPU busy {b['busy_ms']:.1f} ms")
        print()
        print("| category | ms | % of wall |")
        print("|---|---|---|")
        rows = [*b["categories"].items(), ("(idle: wall - busy)", b["wall_ms"] - b["busy_ms"])]
        if "gaps" in b:  # breakdowns since session 13 split the idle time between kernels
            g = b["gaps"]
            rows += [("(of which gaps under 20 us between kernels)", g["short_ms"]),
                     (f"(of which {g['long']} longer gaps)", g["long_ms"])]
        for label, ms in rows:
            print(f"| {label} | {ms:.1f} | {100 * ms / b['wall_ms']:.1f}% |")
        print()
        print("| top kernels | ms | calls | category |")
        print("|---|---|---|---|")
        for k in b["top"][:12]:
            print(f"| `{k['name'][:90]}` | {k['ms']:.2f} | {k['calls']} | {k['category']} |")
    for x_run, y_run in kernel_pairs(res):
        bx, by = (read_json(res / r / "profile" / "breakdown.json") for r in (x_run, y_run))
        b, a = bx.get("kernels"), by.get("kernels")
        if b and a:
            print()
            print(f"Kernel time that changed from {x_run} to {y_run} (profiled step, "
                  f"by kernel with inductor's number dropped): {x_run} {sum(v[0] for v in b.values()):.1f} ms, "
                  f"{y_run} {sum(v[0] for v in a.values()):.1f} ms")
            idle = [p["wall_ms"] - p["busy_ms"] for p in (bx, by) if "wall_ms" in p and "busy_ms" in p]
            if len(idle) == 2 and abs(idle[0] - idle[1]) > IDLE_APART_MS:
                print()
                print(f"The two profiled steps idled {idle[0]:.1f} and {idle[1]:.1f} ms. A card at its power limit "
                      "clocks higher after idle time, so these kernel times differ by clock as well as by work.")
            print()
            print(f"| kernel | ms {x_run} | ms {y_run} | change |")
            print("|---|---|---|---|")
            for fam, x, y in kernel_changes(b, a):
                print(f"| `{fam[:100]}` | {x:.2f} | {y:.2f} | {y - x:+.2f} |")
    for line in same_math(res):
        print()
        print(line)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(sys.argv[1])))
