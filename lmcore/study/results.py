"""Run folders into pandas tables: every run of a study in one DataFrame, one run's summary,
and the eval-only variants of one packed model.

Loading. `find_runs(runs_dir)` finds every run folder below `runs_dir` (a folder holding
config.json, summary.json, FAILED.json or study.json; checkpoints are not runs, nor are the
backups of replaced runs, `replaced-YYYYmmdd-HHMMSS` subfolders: `is_backup`). `load_run`
flattens one folder into a dict: what the study layer recorded (study.json: study, variant,
seed, overrides), the config (preset, bigram, gated layers, attention), training
(summary.json), packing (pack.json: model / code / total bytes, fits) and evaluation
(eval.json: TTT and sliding bpb, TTT gain). `val_bpb` / `val_loss` are the run's score: from
eval.json (the packed model, after TTT) when present, else the pre-quantization numbers of
summary.json; `score_source` says which. `load_runs` makes the DataFrame, `load_metrics` a
run's metrics.jsonl lines, `chunk_gains` its per-chunk TTT gains; `expand_runs` turns paths
and glob patterns into run folders.

Tables. `aggregate` (mean, std, n per variant), `comparison_table` (the columns of a sweep
worth comparing), `run_table` (one run as what / value rows) and `eval_table` (one row per
evaluation of a packed model: eval.json and every eval-NAME.json of an eval-only sweep, with
the eval settings that differ between them).
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore.errors import InputNotFound
from lmcore.runs import read_jsonl
from lmcore.study.paths import resolve, root_of

__all__ = [
    "aggregate",
    "chunk_gains",
    "comparison_table",
    "eval_table",
    "expand_runs",
    "find_runs",
    "finite",
    "is_backup",
    "load_metrics",
    "load_run",
    "load_runs",
    "run_table",
]

RUN_MARKERS = ("config.json", "summary.json", "FAILED.json", "study.json")
# A replaced run's files, moved aside inside its run folder by the study layer.
BACKUP_PREFIX = "replaced-"
_BACKUP_NAME = re.compile(re.escape(BACKUP_PREFIX) + r"\d{8}-\d{6}(-\d+)?")


class NoData(Exception):
    """A figure has nothing to show; the message says why."""


# ---------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return {"_unreadable": str(path)}


def is_backup(path: str | Path) -> bool:
    """Whether `path` is the backup of a replaced run (RUN/replaced-YYYYmmdd-HHMMSS)."""
    return _BACKUP_NAME.fullmatch(Path(path).name) is not None


def find_runs(runs_dir: str | Path = "runs") -> list[Path]:
    """Every run folder below `runs_dir` (itself included), sorted; [] if it does not exist.
    Checkpoints and backups of replaced runs are not runs."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found: set[Path] = set()
    for marker in RUN_MARKERS:
        for p in root.rglob(marker):
            d = p.parent
            parts = d.relative_to(root).parts
            if "checkpoints" in parts or any(is_backup(x) for x in parts):
                continue
            found.add(d)
    return sorted(found)


def _get(d: dict[str, Any] | None, *keys: str, default: Any = None) -> Any:
    cur: Any = d
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return default
        cur = cur[k]
    return cur


def _layers(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, list):
        return ",".join(str(i) for i in v) if v else "none"
    return str(v)


def load_run(run_dir: str | Path, runs_dir: str | Path | None = None) -> dict[str, Any]:
    """One run folder as a flat dict (see the module docstring); missing values are None."""
    d = Path(run_dir)
    base = Path(runs_dir) if runs_dir is not None else d.parent
    try:
        name = d.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        name = d.name
    name = d.name if name in ("", ".") else name
    cfg = _read_json(d / "config.json")
    summ = _read_json(d / "summary.json")
    pack = _read_json(d / "pack.json")
    ev = _read_json(d / "eval.json")
    study = _read_json(d / "study.json") or {}
    failed = _read_json(d / "FAILED.json")
    row: dict[str, Any] = {
        "run": name,
        "path": str(d.resolve()),
        "study": study.get("study"),
        "variant": study.get("variant"),
        "seed": study.get("seed", _get(summ, "seed", default=_get(cfg, "train", "seed"))),
        "preset": _get(cfg, "name", default=study.get("preset")),
        "overrides": " ".join(study.get("overrides") or []) or None,
        "bigram": _get(cfg, "model", "bigram"),
        "gated_attn_layers": _layers(_get(cfg, "model", "gated_attn_layers")),
        "attention_requested": _get(cfg, "model", "attention", default=study.get("attention")),
        "iterations": _get(cfg, "train", "iterations"),
        "num_gpus": study.get("num_gpus"),
    }
    # training
    for k in ("steps", "tokens", "train_time_s", "wall_time_s", "tokens_per_s", "mean_step_ms",
              "peak_memory_mib", "peak_rss_mib", "val_loss_raw", "val_bpb_raw", "val_loss_ema",
              "val_bpb_ema", "ema", "ema_alt", "val_loss_ema_alt", "val_bpb_ema_alt", "world_size", "card",
              "git_commit", "completed"):
        row[k] = _get(summ, k)
    row["attention_backend"] = _get(summ, "attention_backend")
    row["prequant_val_loss"] = _get(summ, "val_loss")
    row["prequant_val_bpb"] = _get(summ, "val_bpb")
    # packing
    row["model_bytes"] = _get(pack, "model_bytes")
    row["code_bytes"] = _get(pack, "code_bytes")
    row["total_bytes"] = _get(pack, "total_bytes")
    row["fits"] = _get(pack, "fits")
    row["pack_time_s"] = _get(pack, "timings_s", "total")
    # evaluation
    row["eval_loss"] = _get(ev, "loss")
    row["eval_bpb"] = _get(ev, "bpb")
    row["sliding_bpb"] = _get(ev, "sliding", "bpb")
    row["sliding_loss"] = _get(ev, "sliding", "loss")
    row["ttt_bpb"] = _get(ev, "ttt", "bpb")
    row["ttt_gain_bpb"] = _get(ev, "ttt_gain_bpb")
    row["eval_time_s"] = _get(ev, "time_s", "total")
    row["eval_tokens"] = _get(ev, "tokens")
    row["eval_bytes"] = _get(ev, "bytes")
    # the score
    if row["eval_bpb"] is not None:
        row["val_bpb"], row["val_loss"] = row["eval_bpb"], row["eval_loss"]
        row["score_source"] = "eval (packed" + (", TTT)" if row["ttt_bpb"] is not None else ")")
    elif row["prequant_val_bpb"] is not None:
        row["val_bpb"], row["val_loss"] = row["prequant_val_bpb"], row["prequant_val_loss"]
        row["score_source"] = "train (pre-quantization)"
    else:
        row["val_bpb"] = row["val_loss"] = row["score_source"] = None
    # status
    if failed is not None:
        row["status"] = "failed"
        row["error"] = failed.get("error") or failed.get("_unreadable") or "failed"
    elif study.get("status") == "unavailable":
        row["status"] = "unavailable"
        row["error"] = study.get("reason")
    elif ev is not None:
        row["status"] = "ok"
        row["error"] = None
    elif pack is not None:
        row["status"] = "packed"
        row["error"] = None
    elif summ is not None:
        row["status"] = "trained" if summ.get("completed", True) else "incomplete"
        row["error"] = None
    else:
        row["status"] = "incomplete"
        row["error"] = None
    return row


def load_runs(runs_dir: str | Path = "runs", runs: Iterable[str | Path] | None = None) -> pd.DataFrame:
    """A DataFrame with one row per run folder below `runs_dir` (or of the given `runs`)."""
    dirs = [Path(r) for r in runs] if runs is not None else find_runs(runs_dir)
    rows = [load_run(d, runs_dir) for d in dirs]
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=list(load_run(Path(runs_dir) / "_none_").keys()))
    return df


def load_metrics(run_dir: str | Path, kind: str | None = "train") -> pd.DataFrame:
    """metrics.jsonl of a run as a DataFrame (only lines of `kind`, unless None)."""
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if kind is not None:
        rows = [r for r in rows if r.get("kind", "train") == kind]
    return pd.DataFrame(rows)


def chunk_gains(run_dir: str | Path, name: str | None = None) -> list[float] | None:
    """Per-chunk TTT gain (sliding bpb - TTT bpb) from eval.json (eval-NAME.json of an
    eval-only variant), or None."""
    ev = _read_json(Path(run_dir) / ("eval.json" if name is None else f"eval-{name}.json"))
    g = _get(ev, "chunk_gain_bpb")
    if g:
        return [float(x) for x in g]
    base, ttt = _get(ev, "sliding", "chunk_bpb"), _get(ev, "ttt", "chunk_bpb")
    if base and ttt:
        return [float(b) - float(t) for b, t in zip(base, ttt)]
    return None


# ---------------------------------------------------------------------------- tables


def finite(v: Any) -> bool:
    """Whether `v` is a finite number (not None, not a bool, not nan or inf)."""
    return v is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(df: pd.DataFrame, by: str | list[str] = "variant",
              metrics: Iterable[str] = ("val_bpb", "val_loss", "tokens_per_s", "total_bytes", "ttt_gain_bpb")
              ) -> pd.DataFrame:
    """Mean, std and count of `metrics` per group of `by` (only runs with a score)."""
    by_l = [by] if isinstance(by, str) else list(by)
    cols = [m for m in metrics if m in df.columns]
    ok = df[df["val_bpb"].notna()] if "val_bpb" in df.columns else df
    if ok.empty:
        return pd.DataFrame(columns=by_l)
    num = ok[by_l + cols].copy()
    for c in cols:
        num[c] = pd.to_numeric(num[c], errors="coerce")
    g = num.groupby(by_l, dropna=False, sort=False)
    out = g[cols].agg(["mean", "std"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    out.insert(0, "n", g.size())
    return out.reset_index()


COMPARISON_COLUMNS = [
    "variant", "seed", "status", "val_bpb", "val_loss", "prequant_val_bpb", "ttt_gain_bpb",
    "tokens_per_s", "mean_step_ms", "attention_backend", "total_bytes", "fits", "error",
]


def comparison_table(df: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """The columns of a sweep worth comparing, in a fixed order (missing ones left out)."""
    cols = [c for c in (columns or COMPARISON_COLUMNS) if c in df.columns]
    return df[cols].reset_index(drop=True)




def expand_runs(patterns: str | Path | Iterable[str | Path], root: str | Path | None = None) -> list[Path]:
    """Run folders from paths or glob patterns (relative to the repository root), in
    order, without duplicates; a glob skips backups of replaced runs. A pattern that
    matches nothing raises InputNotFound."""
    pats = [patterns] if isinstance(patterns, (str, Path)) else list(patterns)
    r = root_of(root)
    out: list[Path] = []
    for p in pats:
        ap = resolve(p, r)
        if any(c in str(p) for c in "*?["):
            hits = sorted(Path(h) for h in glob.glob(str(ap)) if Path(h).is_dir() and not is_backup(h))
        else:
            hits = [ap] if ap.is_dir() else []
        if not hits:
            raise InputNotFound(f"no run folder matches {str(p)!r} (under {r})")
        out += [h for h in hits if h not in out]
    return out


RUN_TABLE_FIELDS = [
    ("preset", "preset"), ("seed", "seed"), ("status", "status"), ("card", "card"),
    ("world_size", "world size"), ("attention_backend", "attention backend"), ("steps", "steps"),
    ("tokens", "tokens"), ("train_time_s", "train time (s)"), ("tokens_per_s", "tokens/s"),
    ("mean_step_ms", "mean step (ms)"), ("peak_memory_mib", "peak GPU memory (MiB)"),
    ("val_bpb_raw", "val bpb, raw weights (pre-quant)"), ("val_bpb_ema", "val bpb, EMA (pre-quant)"),
    ("model_bytes", "model bytes (int6 + Brotli)"), ("code_bytes", "code bytes"),
    ("total_bytes", "artifact bytes"), ("fits", "fits the size limit"), ("pack_time_s", "pack time (s)"),
    ("sliding_bpb", "val bpb, packed, sliding"), ("ttt_bpb", "val bpb, packed, TTT"),
    ("ttt_gain_bpb", "TTT gain (bpb)"), ("eval_time_s", "eval time (s)"), ("val_bpb", "score: val bpb"),
    ("val_loss", "score: val loss (nats)"), ("score_source", "score from"), ("error", "error"),
]


def run_table(run: str | Path | dict[str, Any], root: str | Path | None = None) -> pd.DataFrame:
    """A run's summary as a two-column table (what, value), phase times included. Sizes and
    "fits" are pack.json's; the limit they are measured against is lmcore.pack.SIZE_LIMIT."""
    from lmcore.pack import SIZE_LIMIT

    row = run if isinstance(run, dict) else load_run(resolve(run, root))
    rows = [(f"fits {SIZE_LIMIT:,}" if k == "fits" else label, row.get(k))
            for k, label in RUN_TABLE_FIELDS if row.get(k) is not None]
    phases = (_read_json(Path(row["path"]) / "study.json") or {}).get("phases", {})
    for k in ("data", "train", "pack", "eval"):
        if k in phases:
            rows.append((f"phase {k} (s, wall)", phases[k]))
    rows.insert(0, ("run folder", row["path"]))
    return pd.DataFrame(rows, columns=["what", "value"])


EVAL_COLUMNS = ["variant", "status", "bpb", "loss", "sliding_bpb", "ttt_bpb", "ttt_gain_bpb", "eval_time_s",
                "overrides", "error"]
_EVAL_FILE = re.compile(r"eval-(?P<name>[A-Za-z0-9._-]+)\.json")
_EVAL_FAILED = re.compile(r"FAILED-eval-(?P<name>[A-Za-z0-9._-]+)\.json")


def eval_table(run_dir: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """Every evaluation of a run's packed model, one row each: eval.json (variant "run": the
    run's own eval settings) and each eval-NAME.json of an eval-only sweep (variant NAME),
    then the failed variants (FAILED-eval-NAME.json). Columns: EVAL_COLUMNS, then one column
    "eval.FIELD" per eval setting that differs between the rows (from each file's
    eval_config), so the table shows what each variant changed."""
    rd = resolve(run_dir, root)
    if not rd.is_dir():
        raise InputNotFound(f"run folder not found: {rd}")
    recorded = (_read_json(rd / "study.json") or {}).get("evals", {})
    found: list[tuple[str, Path]] = [("run", rd / "eval.json")] if (rd / "eval.json").is_file() else []
    for f in sorted(rd.iterdir()):
        m = _EVAL_FILE.fullmatch(f.name) or _EVAL_FAILED.fullmatch(f.name)
        if m and f.is_file():
            found.append((m["name"], f))
    rows, configs = [], []
    for name, f in found:
        ev = _read_json(f) or {}
        failed = f.name.startswith("FAILED-")
        ov = (recorded.get(name) or {}).get("overrides")
        rows.append({
            "variant": name, "status": "failed" if failed else "ok", "bpb": _get(ev, "bpb"), "loss": _get(ev, "loss"),
            "sliding_bpb": _get(ev, "sliding", "bpb"), "ttt_bpb": _get(ev, "ttt", "bpb"),
            "ttt_gain_bpb": _get(ev, "ttt_gain_bpb"), "eval_time_s": _get(ev, "time_s", "total"),
            "overrides": " ".join(ov) if ov else None, "error": ev.get("error") if failed else None,
        })
        configs.append(_get(ev, "eval_config") or {})
    df = pd.DataFrame(rows, columns=EVAL_COLUMNS)
    keys = list(dict.fromkeys(k for c in configs for k in c))
    for k in keys:
        vals = [c.get(k) for c in configs if c]
        if len({json.dumps(v, sort_keys=True) for v in vals}) > 1:
            df[f"eval.{k}"] = [c.get(k) if c else None for c in configs]
    return df
