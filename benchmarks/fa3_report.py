"""The FA3 table of benchmarks/fa3_job.sh, as markdown, from the job's results folder.

usage: python benchmarks/fa3_report.py RESULTS_DIR FA3_VARIANT

Reads table_attn.json (attention_bench.py: fa3, sdpa_cudnn, sdpa_flash), attn_<variant>.json
(one per FA3 build), orig_fa3.log and orig_fa2.log (the original script's step lines),
lm_fa3_summary.json and lm_sdpa_cudnn_summary.json (lmcore's run summaries) and
build_gpu.out (scripts/build_fa3.sh's output). Anything missing shows as "-".
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TOKENS_PER_STEP = 786_432  # `record`: 8 micro-batches of 48 x 2048 on one GPU


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def original_step_ms(log: Path) -> tuple[float | None, str]:
    """(the last step_avg in ms, 'step:N/M') from the original script's log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None, "-"
    m = re.findall(r"step:(\d+)/(\d+) .*?train_time:\d+ms step_avg:([\d.]+)ms", text)
    return (float(m[-1][2]), f"step:{m[-1][0]}/{m[-1][1]}") if m else (None, "-")


def main(res: Path, variant: str) -> int:
    attn = read_json(res / "table_attn.json")
    card = attn.get("card", "?")
    print(f"Card: {card}, torch {attn.get('torch', '?')}; FA3: {attn.get('fa3_build', '-')}")
    print()
    print(f"Attention fwd+bwd, {attn.get('shape', '?')} (attention_bench.py):")
    print()
    print("| backend | fwd ms | fwd+bwd ms | vs sdpa_flash | rel err out / dq / dk / dv vs fp32 |")
    print("|---|---|---|---|---|")
    r = attn.get("results", {})
    base = r.get("sdpa_flash", {}).get("ms")
    for name in ("fa3", "sdpa_cudnn", "sdpa_flash"):
        x = r.get(name)
        if not x:
            print(f"| {name} | - | - | - | - |")
            continue
        ratio = f"{base / x['ms']:.2f}x" if base else "-"
        errs = " / ".join(f"{x[f'rel_{t}']:.2e}" for t in ("out", "dq", "dk", "dv"))
        print(f"| {name} | {x['fwd_ms']:.3f} | {x['ms']:.3f} | {ratio} | {errs} |")
    print()

    rows: list[tuple[str, float | None, str]] = []
    for label, log in (("original, real FA3", "orig_fa3.log"), ("original, FA2 shim", "orig_fa2.log")):
        ms, where = original_step_ms(res / log)
        rows.append((label, ms, where))
    for att in ("fa3", "sdpa_cudnn"):
        s = read_json(res / f"lm_{att}_summary.json")
        ms = s.get("mean_step_ms")
        rows.append(
            (
                f"lmcore, model.attention={att}",
                ms,
                f"ran {s.get('attention_backend', '-')}, {s.get('steps', '-')} steps",
            )
        )
    ref = rows[0][1]
    print(f"Step time at `record`'s per-GPU batch ({TOKENS_PER_STEP:,} tokens = 8 x 48 x 2048), same job:")
    print()
    print("| run | step ms | tokens/s | vs original with FA3 | |")
    print("|---|---|---|---|---|")
    for label, ms, note in rows:
        if ms:
            speed = f"{ref / ms:.3f}x" if ref else "-"
            print(f"| {label} | {ms:.1f} | {TOKENS_PER_STEP / ms * 1000:,.0f} | {speed} | {note} |")
        else:
            print(f"| {label} | - | - | - | {note} |")
    print()

    print("FA3 builds, fa3 fwd / fwd+bwd ms at the same shape (each its own process, same job):")
    print()
    print(
        "| build | fa3 fwd ms | fa3 fwd+bwd ms | fa3+packgqa fwd / fwd+bwd ms | sdpa_cudnn fwd+bwd ms (same process) |"
    )
    print("|---|---|---|---|---|")
    for path in sorted(res.glob("attn_*.json")):
        a = read_json(path).get("results", {})
        f, p, c = a.get("fa3"), a.get("fa3+packgqa"), a.get("sdpa_cudnn")
        name = path.stem[len("attn_") :] + (" (used above)" if path.stem == f"attn_{variant}" else "")
        cells = [
            f"{f['fwd_ms']:.3f}" if f else "-",
            f"{f['ms']:.3f}" if f else "-",
            f"{p['fwd_ms']:.3f} / {p['ms']:.3f}" if p else "-",
            f"{c['ms']:.3f}" if c else "-",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    try:
        built = [ln.strip() for ln in (res / "build_gpu.out").read_text().splitlines() if "] built " in ln]
    except OSError:
        built = []
    print()
    print(f"scripts/build_fa3.sh on this machine: {built[0] if built else 'no wheel (see build_gpu.out)'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
