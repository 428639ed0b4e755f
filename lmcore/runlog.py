"""The training + evaluation log of a run (`train_seed{S}.log`): written and read back.

`format_log(summary, metrics, pack, ev, code_bytes)` turns a run folder's summary.json,
metrics.jsonl, pack.json and eval.json into the readable log that a submission hands
in; `parse_log(text)` reads the summary fields back (what `lmcore submission check`
compares with submission.json). The exported train_gpt.py embeds this module and writes
its own log with the same function, so lmcore's export and the script's log read the
same and the check parses either. Standard library only (the script embeds it).
"""

from __future__ import annotations

import re
from typing import Any


def _metric_line(r: dict[str, Any]) -> str | None:
    """One line of a metrics.jsonl record (train step, validation, event), or None."""
    k = r.get("kind")
    if k == "train":
        return (
            f"step:{r['step']} train_loss:{r['train_loss']:.4f} lr_mul:{r['lr_mul']:.3f} "
            f"step_ms:{r['step_ms']:.2f} elapsed_ms:{r['elapsed_ms']:.1f}"
        )
    if k == "val":
        return (
            f"step:{r['step']} val({r.get('weights')}) val_loss:{r['val_loss']:.6f} "
            f"val_bpb:{r['val_bpb']:.6f} elapsed_ms:{r['elapsed_ms']:.1f}"
        )
    if k == "event":
        return f"step:{r['step']} event:{r.get('event')}"
    return None


def _eval_phases(ts: dict[str, Any], ttt: bool) -> str:
    """The evaluation phases and their seconds, in the order they ran."""

    def sec(k: str) -> float:
        return ts.get(k) or 0.0

    phases = [f"load {sec('load'):.3f}s", f"compile {sec('compile'):.3f}s"]
    if ttt and ts.get("sliding") is not None:
        phases.append(f"plain pass {sec('sliding'):.3f}s (diagnostic, not needed for the score)")
    if ttt:
        phases.append(f"ttt scoring {sec('ttt_score'):.3f}s, ttt training {sec('ttt_train'):.3f}s")
    else:
        phases.append(f"sliding scoring {sec('sliding'):.3f}s")
    return ", ".join(phases)


def format_log(
    summary: dict[str, Any], metrics: list[dict[str, Any]], pack: dict[str, Any], ev: dict[str, Any], code_bytes: int
) -> str:
    """A readable training + evaluation log from a run's summary, metrics, pack and eval."""
    lines = [
        (
            f"# train_gpt.py log: seed {summary.get('seed')}, config {summary.get('preset')}, "
            f"card {summary.get('card')}, world_size {summary.get('world_size')}"
        )
    ]
    lines += [x for x in map(_metric_line, metrics) if x is not None]
    ts = ev.get("time_s", {})
    ttt = "ttt" in ev
    scoring = (ts.get("ttt") if ttt else ts.get("sliding")) or 0.0
    cal = pack.get("calibration_time_s", (pack.get("timings_s") or {}).get("calibration"))
    lines += [
        f"steps: {summary['steps']}",
        f"step_avg_ms: {summary['mean_step_ms']:.3f}",
        f"stopped_by: {summary.get('stopped_by')}",
        f"train_time: {summary['train_time_s']:.3f}s",
        f"pre-quant val_loss:{summary['val_loss']:.8f} val_bpb:{summary['val_bpb']:.8f}",
        f"model_bytes: {pack['model_bytes']}",
        f"code_bytes: {code_bytes}",
        f"total_bytes: {pack['model_bytes'] + code_bytes}",
        f"artifact_sha256: {pack.get('sha256')}",
        (
            f"calibration_time: {cal or 0.0:.3f}s (samples the model itself, reads no training data: "
            "in neither the training nor the evaluation budget)"
        ),
        "ttt: " + ("score-first (LatentMask TTT: every chunk is scored before it is trained on)" if ttt else "none"),
        "eval_phases: " + _eval_phases(ts, ttt),
        f"eval_time: {ts.get('total') or 0.0:.3f}s (wall, from the artifact load to the final score)",
        (
            f"eval_scoring_time: {scoring:.3f}s "
            f"(the {'TTT' if ttt else 'sliding'} scoring pass alone, as accepted records time it)"
        ),
        f"final val_loss:{ev['loss']:.8f} val_bpb:{ev['bpb']:.8f}",
    ]
    return "\n".join(lines) + "\n"


_LOG_PATTERNS = {
    "train_time": r"^train_time: ([0-9.eE+-]+)s",
    "eval_time": r"^eval_time: ([0-9.eE+-]+)s",
    "eval_scoring_time": r"^eval_scoring_time: ([0-9.eE+-]+)s",
    "calibration_time": r"^calibration_time: ([0-9.eE+-]+)s",
    "model_bytes": r"^model_bytes: (\d+)",
    "code_bytes": r"^code_bytes: (\d+)",
    "total_bytes": r"^total_bytes: (\d+)",
    "steps": r"^steps: (\d+)",
    "ttt": r"^ttt: (.*)$",
    "final": r"^final val_loss:(\S+) val_bpb:(\S+)",
}


def parse_log(text: str) -> dict[str, Any]:
    """The summary fields of a log written by `format_log` (missing ones are absent)."""
    out: dict[str, Any] = {}
    for key, pat in _LOG_PATTERNS.items():
        m = None
        for m in re.finditer(pat, text, flags=re.MULTILINE):
            pass  # the last occurrence counts
        if m is None:
            continue
        if key == "final":
            out["val_loss"], out["val_bpb"] = float(m.group(1)), float(m.group(2))
        elif key == "ttt":
            out["ttt"] = m.group(1).strip()
        elif key.endswith("_time"):
            out[key] = float(m.group(1))
        else:
            out[key] = int(m.group(1))
    return out
