"""The table of benchmarks/capped_2gpu.sh (quality at equal wall time), as Markdown.

usage: python benchmarks/capped_report.py ORIGINAL_LOG SUMMARY_JSON N_GPUS CAP_S NPROC

The original's row comes from its log: the last validation line (steps, step_avg, raw val_bpb)
and its post-EMA diagnostic. lmcore's row comes from its run's summary.json. N_GPUS is the
machine's GPU count (4 or more with NPROC 2: the runs went side by side). A missing line shows
as "?" or nan.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

VAL = re.compile(r"step:(\d+)/\d+ val_loss:([\d.]+) val_bpb:([\d.]+) train_time:(\d+)ms step_avg:([\d.]+)ms")
EMA = re.compile(r"DIAGNOSTIC post_ema val_loss:([\d.]+) val_bpb:([\d.]+)")


def table(original_log: str, summary: dict, n_gpus: int, cap_s: str, nproc: int) -> str:
    """The card line and the two rows, as capped_2gpu.sh prints them."""
    vals = VAL.findall(original_log)
    ema = EMA.search(original_log)
    steps, _, bpb, _, step_ms = vals[-1] if vals else ("?", 0, "nan", 0, "nan")
    where = "side by side on one 4-GPU host" if n_gpus >= 4 and nproc == 2 else "one after the other"
    ema_bpb = float(ema.group(2)) if ema else float("nan")
    card = (f"card: {summary['card']}; {nproc} rank(s) under torchrun (grad accum {8 // nproc}), record preset, "
            f"{cap_s} s cap, seed 1337, proxy data; {where}")
    original = (f"| original | FA3 (the wheel's flash_attn_interface) | {steps} | {float(step_ms):.1f} | "
                f"{float(bpb):.4f} | {ema_bpb:.4f} |")
    lm = (f"| lmcore `record` | {summary['attention_backend']} | {summary['steps']} | {summary['mean_step_ms']:.1f} | "
          f"{summary['val_bpb_raw']:.4f} | {summary['val_bpb_ema']:.4f} |")
    head = "| run | attention | steps | mean step ms | val_bpb raw | val_bpb EMA |\n|---|---|---|---|---|---|"
    return f"{card}\n{head}\n{original}\n{lm}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original_log", type=Path)
    ap.add_argument("summary_json", type=Path)
    ap.add_argument("n_gpus", type=int)
    ap.add_argument("cap_s")
    ap.add_argument("nproc", type=int)
    a = ap.parse_args(argv)
    summary = json.loads(a.summary_json.read_text())
    print(table(a.original_log.read_text(), summary, a.n_gpus, a.cap_s, a.nproc), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
