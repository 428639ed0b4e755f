"""The study's figures, from the run tables of `lmcore.study.results`.

Each `plot_*` function takes a runs DataFrame (`load_runs`; `plot_eval_sweep` an
`eval_table`) and returns a matplotlib `Figure` (object API, no pyplot state: in a notebook
with `%matplotlib inline`, a Figure as a cell's last expression is shown inline), or raises
`NoData` with the reason when no run has what it needs. Sizes and "fits" are pack.json's own
numbers, never recomputed here; the limit line is `lmcore.pack.SIZE_LIMIT`. `save_figure`
writes PNG and SVG; `export_figures` makes every figure of the study into a folder, skipping
(and reporting) those without data.

The loading and table functions (`load_runs`, `load_run`, `find_runs`, `aggregate`,
`comparison_table`, ...) live in `lmcore.study.results` and are importable from here too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from lmcore.study.results import (
    BACKUP_PREFIX,
    aggregate,
    chunk_gains,
    comparison_table,
    find_runs,
    finite,
    is_backup,
    load_metrics,
    load_run,
    load_runs,
)

__all__ = [
    "BACKUP_PREFIX",
    "FIGURES",
    "NoData",
    "aggregate",
    "chunk_gains",
    "comparison_table",
    "export_figures",
    "figure",
    "find_runs",
    "is_backup",
    "load_metrics",
    "load_run",
    "load_runs",
    "new_figure",
    "plot_artifact_size",
    "plot_bpb_by_variant",
    "plot_eval_sweep",
    "plot_loss_curves",
    "plot_throughput_by_backend",
    "plot_ttt_gain",
    "save_figure",
]


class NoData(Exception):
    """A figure has nothing to show; the message says why."""


def new_figure(w: float = 7.0, h: float = 4.0) -> Figure:
    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _label(row: pd.Series) -> str:
    if row.get("study") and row.get("variant"):
        s = f"{row['study']}:{row['variant']}"
        return s + (f" s{row['seed']}" if finite(row.get("seed")) else "")
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
    fig = new_figure(11, 4.2)
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
    fig = new_figure(max(5.0, 3.8 * len(studies)), 4.0)
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
    fig = new_figure(max(5.0, 1.3 * len(sub) + 2), 4.0)
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
    fig = new_figure(8, max(2.5, 0.35 * len(ok) + 1.5))
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
    fig = new_figure(8, 4.0)
    ax = fig.subplots()
    for label, g, total in series[:max_runs]:
        tag = f" (total {total:+.4f})" if finite(total) else ""
        ax.plot(range(len(g)), g, marker="." if len(g) < 60 else None, lw=1, label=label + tag)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="validation chunk", ylabel="bpb gain (sliding - TTT)", title="test-time training gain per chunk")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _setting_key(v: Any) -> str:
    v = v.item() if hasattr(v, "item") else v  # numpy scalars (from pandas) as Python numbers
    return json.dumps(v, sort_keys=True, default=str)


def _sort_key(v: Any) -> tuple[int, float, str]:
    v = v.item() if hasattr(v, "item") else v
    return (0, float(v), "") if finite(v) else (1, 0.0, str(v))


def plot_eval_sweep(table: pd.DataFrame, metric: str = "bpb") -> Figure:
    """Eval-only variants of one packed model (an `eval_table`): `metric` by setting, one
    panel per eval field a variant changed alone (x: its values, the run's own setting
    marked), variants that changed several fields in a last panel; the dotted line is the
    sliding-window bpb without TTT."""
    ok = table[(table["status"] == "ok") & table[metric].notna()] if metric in table.columns else table.iloc[0:0]
    if ok.empty:
        raise NoData(f"no evaluation has a {metric} (run an eval-only sweep first)")
    fields = [c for c in table.columns if c.startswith("eval.")]
    base = ok[ok["variant"] == "run"]
    ref = base.iloc[0] if len(base) else None

    def reference(f: str) -> str:
        if ref is not None:
            return _setting_key(ref[f])
        return pd.Series([_setting_key(v) for v in ok[f]]).mode().iloc[0]

    panels: dict[str, list[tuple[Any, float, bool]]] = {}
    for _, row in ok.iterrows():
        if row["variant"] == "run":
            continue
        changed = [f for f in fields if _setting_key(row[f]) != reference(f)]
        if len(changed) == 1:
            panels.setdefault(changed[0], []).append((row[changed[0]], float(row[metric]), False))
        else:
            panels.setdefault("variants", []).append((row["variant"], float(row[metric]), False))
    if ref is not None:
        for f in [k for k in panels if k != "variants"]:
            panels[f].append((ref[f], float(ref[metric]), True))
        if not panels:  # only the run's own evaluation
            panels["variants"] = [("run", float(ref[metric]), True)]
    fig = new_figure(max(5.0, 3.8 * len(panels)), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    sliding = pd.to_numeric(ok["sliding_bpb"], errors="coerce").dropna() if metric == "bpb" else pd.Series([])
    for ax, (name, pts) in zip(axes, panels.items()):
        pts = sorted(pts, key=lambda p: _sort_key(p[0]))
        x = range(len(pts))
        ax.plot(list(x), [p[1] for p in pts], marker="o", color="tab:blue", lw=1.2)
        for xi, (_v, y, own) in zip(x, pts):
            if own:
                ax.plot([xi], [y], marker="o", ms=9, mfc="none", mec="red", mew=1.5, label="the run's own setting")
        if len(sliding):
            ax.axhline(float(sliding.median()), color="gray", ls=":", lw=1, label="no TTT (sliding window)")
        ax.set_xticks(list(x), [str(p[0]) for p in pts], fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set(title=name, xlabel=name if name != "variants" else "variant", ylabel=f"val {metric} (lower is better)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7)
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


def figure(name: str, df: pd.DataFrame | str | Path = "runs", save_to: str | Path | None = None) -> Figure | str:
    """The figure `name` of FIGURES from a runs DataFrame (or a runs folder), written as
    save_to/name.{png,svg} when `save_to` is given; or the reason it was skipped
    ("NAME: skipped: ...") when no run has its data. A notebook cell ending with it shows
    either."""
    if not isinstance(df, pd.DataFrame):
        df = load_runs(df)
    try:
        fig = FIGURES[name](df)
    except NoData as e:
        return f"{name}: skipped: {e}"
    if save_to is not None:
        save_figure(fig, save_to, name)
    return fig
