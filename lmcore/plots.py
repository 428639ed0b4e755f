"""Run folders into pandas tables, and the study's figures.

Loading. `find_runs(runs_dir)` finds every run folder below `runs_dir` (a folder holding
config.json, summary.json, FAILED.json or study.json; checkpoints are not runs, nor are the
backups of replaced runs, `replaced-YYYYmmdd-HHMMSS` subfolders: `is_backup`).
`load_run` flattens one folder into a dict: what the study layer recorded (study.json:
study, variant, seed, overrides), the config (preset, bigram, gated layers, attention),
training (summary.json), packing (pack.json: model / code / total bytes, fits) and evaluation
(eval.json: TTT and sliding bpb, TTT gain). `val_bpb` / `val_loss` are the run's score:
from eval.json (the packed model, after TTT) when present, else the pre-quantization
numbers of summary.json; `score_source` says which. `load_runs` makes the DataFrame,
`load_metrics` a run's metrics.jsonl lines, `chunk_gains` its per-chunk TTT gains.

Figures. Each `plot_*` function takes that DataFrame and returns a matplotlib `Figure`
(object API, no pyplot state), or raises `NoData` with the reason when no run has what
it needs. Sizes and "fits" are pack.json's own numbers, never recomputed here; the
limit line is `lmcore.pack.SIZE_LIMIT`. `save_figure` writes PNG and SVG;
`export_figures` makes every figure of the study into a folder, skipping (and
reporting) those without data.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from lmcore.runs import read_jsonl

__all__ = [
    "FIGURES",
    "NoData",
    "aggregate",
    "chunk_gains",
    "comparison_table",
    "display_figures",
    "export_figures",
    "find_runs",
    "is_backup",
    "load_metrics",
    "load_run",
    "load_runs",
    "plot_artifact_size",
    "plot_bpb_by_variant",
    "plot_loss_curves",
    "plot_throughput_by_backend",
    "plot_ttt_gain",
    "save_figure",
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
              "val_bpb_ema", "world_size", "card", "git_commit", "completed"):
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


def chunk_gains(run_dir: str | Path) -> list[float] | None:
    """Per-chunk TTT gain (sliding bpb - TTT bpb) from eval.json, or None."""
    ev = _read_json(Path(run_dir) / "eval.json")
    g = _get(ev, "chunk_gain_bpb")
    if g:
        return [float(x) for x in g]
    base, ttt = _get(ev, "sliding", "chunk_bpb"), _get(ev, "ttt", "chunk_bpb")
    if base and ttt:
        return [float(b) - float(t) for b, t in zip(base, ttt)]
    return None


# ---------------------------------------------------------------------------- tables


def _finite(v: Any) -> bool:
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


# ---------------------------------------------------------------------------- figures


def _new_figure(w: float = 7.0, h: float = 4.0) -> Figure:
    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _label(row: pd.Series) -> str:
    if row.get("study") and row.get("variant"):
        s = f"{row['study']}:{row['variant']}"
        return s + (f" s{row['seed']}" if _finite(row.get("seed")) else "")
    return str(row["run"])


def plot_loss_curves(df: pd.DataFrame, max_runs: int = 24) -> Figure:
    """Train loss vs step (left) and validation bpb vs step (right), one line per run."""
    curves = []
    for _, row in df.iterrows():
        m = load_metrics(row["path"], kind=None)
        if m.empty or "kind" not in m.columns:
            continue
        tr = m[(m["kind"] == "train")] if "train_loss" in m.columns else m.iloc[0:0]
        va = m[(m["kind"] == "val")] if "val_bpb" in m.columns else m.iloc[0:0]
        if len(tr) or len(va):
            curves.append((_label(row), tr, va))
    if not curves:
        raise NoData("no run has train or val lines in metrics.jsonl")
    curves = curves[:max_runs]
    fig = _new_figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    for label, tr, va in curves:
        if len(tr):
            ax1.plot(tr["step"], tr["train_loss"], label=label, lw=1.2)
        if len(va):
            if "weights" in va.columns:
                va = va[va["weights"].fillna("raw") == "raw"]
            ax2.plot(va["step"], va["val_bpb"], marker="o", ms=3, label=label, lw=1.2)
    ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    ax2.set(xlabel="step", ylabel="val bpb (raw weights)", title="validation bits per byte")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="upper right")
    return fig


def plot_bpb_by_variant(df: pd.DataFrame, metric: str = "val_bpb") -> Figure:
    """Mean score per variant (error bars: std over seeds), one panel per study."""
    ok = df[df[metric].notna()] if metric in df.columns else df.iloc[0:0]
    if ok.empty:
        raise NoData(f"no run has a {metric}")
    ok = ok.copy()
    ok["study"] = ok["study"].fillna("runs") if "study" in ok.columns else "runs"
    ok["variant"] = ok["variant"].where(ok["variant"].notna(), ok["run"])
    studies = list(dict.fromkeys(ok["study"]))
    ablations = [st for st in studies if ok.loc[ok["study"] == st, "variant"].nunique() > 1]
    if ablations:  # studies comparing variants; single-variant ones add nothing here
        studies = ablations
    fig = _new_figure(max(5.0, 3.8 * len(studies)), 4.0)
    axes = fig.subplots(1, len(studies), squeeze=False)[0]
    for ax, st in zip(axes, studies):
        sub = aggregate(ok[ok["study"] == st], by="variant", metrics=[metric])
        x = range(len(sub))
        err = sub[f"{metric}_std"].fillna(0.0)
        ax.bar(x, sub[f"{metric}_mean"], yerr=err, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(list(x), [f"{v}\n(n={n})" for v, n in zip(sub["variant"], sub["n"])], fontsize=8)
        lo = float((sub[f"{metric}_mean"] - err).min())
        hi = float((sub[f"{metric}_mean"] + err).max())
        pad = max((hi - lo) * 0.5, 0.01 * abs(hi), 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set(title=str(st), ylabel=f"{metric} (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    return fig


def plot_throughput_by_backend(df: pd.DataFrame) -> Figure:
    """Training tokens/s per attention backend (attention-study runs if any, else all runs)."""
    cols = {"tokens_per_s", "attention_backend"}
    if not cols <= set(df.columns):
        raise NoData("no run has a training summary")
    ok = df[df["tokens_per_s"].notna() & df["attention_backend"].notna()]
    if "study" in ok.columns and (ok["study"] == "attention").any():
        ok = ok[ok["study"] == "attention"]
    if ok.empty:
        raise NoData("no run has tokens/s and an attention backend in summary.json")
    ok = ok.copy()
    ok["card"] = ok["card"].fillna("?") if "card" in ok.columns else "?"
    ok["backend"] = ok["attention_backend"] + " (" + ok["card"].astype(str) + ")"
    sub = aggregate(ok.assign(val_bpb=0.0), by="backend", metrics=["tokens_per_s"])
    fig = _new_figure(max(5.0, 1.3 * len(sub) + 2), 4.0)
    ax = fig.subplots()
    x = range(len(sub))
    ax.bar(x, sub["tokens_per_s_mean"], yerr=sub["tokens_per_s_std"].fillna(0.0), capsize=4, color="tab:green")
    ax.set_xticks(list(x), [f"{b}\n(n={n})" for b, n in zip(sub["backend"], sub["n"])], fontsize=8)
    ax.set(ylabel="training tokens/s", title="throughput by attention backend")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.grid(axis="y", alpha=0.3)
    unavailable = df[df["status"] == "unavailable"] if "status" in df.columns else df.iloc[0:0]
    if len(unavailable):
        names = ", ".join(str(v) for v in unavailable["variant"].fillna(unavailable["run"]))
        ax.text(0.01, 0.98, f"unavailable here: {names}", transform=ax.transAxes, va="top", fontsize=7)
    return fig


def plot_artifact_size(df: pd.DataFrame, max_runs: int = 30) -> Figure:
    """Artifact bytes per run as pack.json counts them: the compressed model, then the rest
    of total_bytes (the code), each bar marked with pack.json's "fits"; the limit line."""
    from lmcore.pack import SIZE_LIMIT

    if not {"model_bytes", "total_bytes"} <= set(df.columns):
        raise NoData("no run has pack.json")
    ok = df[df["model_bytes"].notna() & df["total_bytes"].notna()]
    if ok.empty:
        raise NoData("no run has pack.json (model/total bytes)")
    ok = ok.head(max_runs)
    labels = [_label(r) for _, r in ok.iterrows()]
    model = ok["model_bytes"].astype(float).to_numpy()
    total = ok["total_bytes"].astype(float).to_numpy()
    fig = _new_figure(8, max(2.5, 0.35 * len(ok) + 1.5))
    ax = fig.subplots()
    y = range(len(ok))
    ax.barh(y, model, color="tab:blue", label="model (int6 + Brotli)")
    ax.barh(y, total - model, left=model, color="tab:orange", label="code")
    for yi, t, fits in zip(y, total, ok.get("fits", pd.Series([None] * len(ok)))):
        verdict = "fits: ?" if pd.isna(fits) else ("fits" if bool(fits) else "DOES NOT FIT")
        ax.text(t, yi, f" {t:,.0f} ({verdict})", va="center", fontsize=6, color="black" if verdict == "fits" else "red")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    top = float(total.max())
    if top > 0.25 * SIZE_LIMIT:
        ax.axvline(SIZE_LIMIT, color="red", ls="--", lw=1, label=f"limit {SIZE_LIMIT:,}")
        title = "artifact size by component"
        top = max(top, SIZE_LIMIT)
    else:
        title = f"artifact size by component (limit {SIZE_LIMIT:,} bytes; largest here {top:,.0f})"
    ax.set_xlim(0, 1.25 * top)  # room for the totals written after the bars
    ax.set(xlabel="bytes", title=title)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_ttt_gain(df: pd.DataFrame, max_runs: int = 16) -> Figure:
    """Per-chunk TTT gain (sliding bpb - TTT bpb) along the validation stream, per run."""
    series = []
    for _, row in df.iterrows():
        g = chunk_gains(row["path"])
        if g:
            series.append((_label(row), g, row.get("ttt_gain_bpb")))
    if not series:
        raise NoData("no run has per-chunk TTT results in eval.json (eval with TTT and the baseline)")
    fig = _new_figure(8, 4.0)
    ax = fig.subplots()
    for label, g, total in series[:max_runs]:
        tag = f" (total {total:+.4f})" if _finite(total) else ""
        ax.plot(range(len(g)), g, marker="." if len(g) < 60 else None, lw=1, label=label + tag)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="validation chunk", ylabel="bpb gain (sliding - TTT)", title="test-time training gain per chunk")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


FIGURES: dict[str, Callable[[pd.DataFrame], Figure]] = {
    "loss_curves": plot_loss_curves,
    "bpb_by_ablation": plot_bpb_by_variant,
    "throughput_by_backend": plot_throughput_by_backend,
    "artifact_size": plot_artifact_size,
    "ttt_gain_per_chunk": plot_ttt_gain,
}


def save_figure(fig: Figure, out_dir: str | Path, name: str, formats: Iterable[str] = ("png", "svg")) -> list[Path]:
    """Write `fig` as out_dir/name.{png,svg}; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out / f"{name}.{fmt}"
        tmp = out / f".{name}.tmp.{fmt}"
        fig.savefig(tmp, format=fmt)
        tmp.replace(p)
        paths.append(p)
    return paths


def export_figures(
    df: pd.DataFrame | str | Path = "runs",
    out_dir: str | Path = "figures",
    names: Iterable[str] | None = None,
    prefix: str = "",
    log: Callable[[str], None] | None = print,
) -> dict[str, list[Path] | str]:
    """Make every figure (or `names`) from a runs DataFrame (or a runs folder) into `out_dir`.

    Returns {figure name: [png, svg] paths, or the reason it was skipped}; the reasons
    are printed through `log`.
    """
    if not isinstance(df, pd.DataFrame):
        df = load_runs(df)
    out: dict[str, list[Path] | str] = {}
    for name in names or FIGURES:
        try:
            fig = FIGURES[name](df)
        except NoData as e:
            out[name] = f"skipped: {e}"
            if log:
                log(f"{name}: skipped: {e}")
            continue
        out[name] = save_figure(fig, out_dir, prefix + name)
        if log:
            log(f"{name}: " + ", ".join(str(p) for p in out[name]))
    return out


def display_figures(result: dict[str, list[Path] | str]) -> None:
    """Show the PNGs of an `export_figures` result inline (in a notebook), else print paths."""
    try:
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover - IPython comes with the notebook tools
        display = None
    for name, v in result.items():
        if isinstance(v, str):
            print(f"{name}: {v}")
        elif display is not None:
            pngs = [p for p in v if Path(p).suffix == ".png"]
            for p in pngs:
                display(Image(filename=str(p)))
        else:
            print(f"{name}: {', '.join(map(str, v))}")
