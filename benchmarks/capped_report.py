"""The tables of benchmarks/capped_2gpu.sh (quality at equal wall time), as Markdown.

usage: python benchmarks/capped_report.py ORIGINAL_LOG SUMMARY_JSON N_GPUS CAP_S NPROC [--seed SEED]
       python benchmarks/capped_report.py --seeds-of RES

The first: one seed's table. The original's row comes from its log: the last validation line
(steps, step_avg, raw val_bpb) and its post-EMA diagnostic. lmcore's row comes from its run's
summary.json. N_GPUS is the machine's GPU count (4 or more with NPROC 2: the runs went side by
side). A missing line shows as "?" or nan.

The second: the job's seeds (RES/sSEED/original.log and RES/sSEED/lmcore_run/summary.json), one
row each with lmcore's raw val_bpb minus the original's, then their mean, standard deviation and
worst seed against issue 16's bar (lmcore at least 0.01 better).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

VAL = re.compile(r"step:(\d+)/\d+ val_loss:([\d.]+) val_bpb:([\d.]+) train_time:(\d+)ms step_avg:([\d.]+)ms")
EMA = re.compile(r"DIAGNOSTIC post_ema val_loss:([\d.]+) val_bpb:([\d.]+)")
BAR = 0.01  # issue 16: lmcore's val_bpb at least this much under the original's at equal wall time


def original_last_val(original_log: str) -> tuple[str, str, str]:
    """(steps, step_avg ms, raw val_bpb) of the original's last validation line; ("?", "nan", "nan") without one."""
    vals = VAL.findall(original_log)
    steps, _, bpb, _, step_ms = vals[-1] if vals else ("?", 0, "nan", 0, "nan")
    return steps, step_ms, bpb


def table(original_log: str, summary: dict, n_gpus: int, cap_s: str, nproc: int, seed: int = 1337) -> str:
    """The card line and the two rows, as capped_2gpu.sh prints them."""
    steps, step_ms, bpb = original_last_val(original_log)
    ema = EMA.search(original_log)
    where = "side by side on one 4-GPU host" if n_gpus >= 4 and nproc == 2 else "one after the other"
    ema_bpb = float(ema.group(2)) if ema else float("nan")
    card = (f"card: {summary['card']}; {nproc} rank(s) under torchrun (grad accum {8 // nproc}), record preset, "
            f"{cap_s} s cap, seed {seed}, proxy data; {where}")
    original = (f"| original | FA3 (the wheel's flash_attn_interface) | {steps} | {float(step_ms):.1f} | "
                f"{float(bpb):.4f} | {ema_bpb:.4f} |")
    lm = (f"| lmcore `record` | {summary['attention_backend']} | {summary['steps']} | {summary['mean_step_ms']:.1f} | "
          f"{summary['val_bpb_raw']:.4f} | {summary['val_bpb_ema']:.4f} |")
    head = "| run | attention | steps | mean step ms | val_bpb raw | val_bpb EMA |\n|---|---|---|---|---|---|"
    return f"{card}\n{head}\n{original}\n{lm}\n"


def seeds_table(res: Path) -> str:
    """One row a seed folder of `res` (sSEED, by seed), then lmcore minus the original over the seeds."""
    rows, diffs = [], []
    for d in sorted(res.glob("s[0-9]*"), key=lambda p: int(p.name[1:])):
        log, summ = d / "original.log", d / "lmcore_run" / "summary.json"
        steps, _, bpb = original_last_val(log.read_text() if log.is_file() else "")
        lm = json.loads(summ.read_text()) if summ.is_file() else {}
        lm_steps, lm_bpb = lm.get("steps", "?"), float(lm.get("val_bpb_raw", "nan"))
        diffs.append(lm_bpb - float(bpb))
        rows.append(f"| {d.name[1:]} | {steps} | {float(bpb):.4f} | {lm_steps} | {lm_bpb:.4f} | {diffs[-1]:+.4f} |")
    head = ("| seed | original steps | original val_bpb | lmcore steps | lmcore val_bpb | lmcore - original |\n"
            "|---|---|---|---|---|---|")
    sd = f"{statistics.stdev(diffs):.4f}" if len(diffs) > 1 else "-"
    met = all(x <= -BAR for x in diffs)  # a nan difference (a run without its line) is not met
    foot = (f"lmcore - original over {len(diffs)} seed(s): mean {statistics.mean(diffs):+.4f}, sd {sd}, "
            f"worst {max(diffs):+.4f}; at least {BAR} better at every seed: {'yes' if met else 'no'}")
    return "\n".join([head, *rows, "", foot]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original_log", type=Path, nargs="?")
    ap.add_argument("summary_json", type=Path, nargs="?")
    ap.add_argument("n_gpus", type=int, nargs="?")
    ap.add_argument("cap_s", nargs="?")
    ap.add_argument("nproc", type=int, nargs="?")
    ap.add_argument("--seed", type=int, default=1337, help="the seed both runs trained with (default 1337)")
    ap.add_argument("--seeds-of", type=Path, help="capped_2gpu.sh's results folder: the table over its seeds")
    a = ap.parse_args(argv)
    if a.seeds_of is not None:
        if not any(a.seeds_of.glob("s[0-9]*")):
            print(f"capped_report: {a.seeds_of}: no seed folders (sSEED)", file=sys.stderr)
            return 2
        print(seeds_table(a.seeds_of), end="")
        return 0
    if a.nproc is None:
        ap.error("give ORIGINAL_LOG SUMMARY_JSON N_GPUS CAP_S NPROC, or --seeds-of RES")
    summary = json.loads(a.summary_json.read_text())
    print(table(a.original_log.read_text(), summary, a.n_gpus, a.cap_s, a.nproc, a.seed), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
