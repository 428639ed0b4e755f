"""The figures of a study plan (`lmcore.study.plan`), drawn from its run folders: every
ablation with every seed, throughput by attention kernel, loss curves per ablation, the TTT
settings and TTT gain per chunk of the eval sweep, artifact bytes by component.
`export_plan_figures` writes them as <study>_<name>.png/.svg; `lmcore study figures` calls it
for every plan.json under the runs folder. Each `plot_*` returns a matplotlib Figure or
raises `NoData` naming what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lmcore.plots import NoData, new_figure, plot_artifact_size, plot_eval_sweep, save_figure
from lmcore.study.paths import resolve
from lmcore.study.plan import Plan, load_plan
from lmcore.study.report import LABELS, ablation_table, plan_frame, values
from lmcore.study.results import chunk_gains, eval_table, finite, load_metrics

__all__ = ["PLAN_FIGURES", "export_plan_figures", "plot_ablations", "plot_kernel_throughput",
           "plot_plan_loss_curves", "plot_ttt_chunks", "plot_ttt_settings"]


def _strip(ax, groups: list[tuple[str, list[float]]], base: float | None, ylabel: str) -> None:
    """Every value of each group as a dot (spread sideways), the group mean as a bar."""
    rng = np.random.default_rng(0)
    for i, (_label, vals) in enumerate(groups):
        if vals:
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=18, color="tab:blue", zorder=3)
            ax.hlines(float(np.mean(vals)), i - 0.3, i + 0.3, color="black", lw=2, zorder=4)
    if base is not None and finite(base):
        ax.axhline(base, color="gray", ls=":", lw=1)
    long = any(len(g) > 12 for g, _v in groups)
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={len(v)})" for g, v in groups], fontsize=7,
                  rotation=20 if long else 0, ha="right" if long else "center")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_ablations(plan: Plan, df: pd.DataFrame) -> Figure:
    """One panel per ablation: each seed's value per variant (dots), the mean (bar), the
    baseline's mean (dotted), and the one-sided Welch p that the baseline is better."""
    if df.empty:
        raise NoData(f"no run of plan {plan.study} exists")
    names = list(plan.ablations)
    if not names:
        raise NoData(f"plan {plan.study} has no ablations")
    fig = new_figure(3.4 * len(names), 4.2)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        ab = plan.ablations[name]
        table = ablation_table(plan, df, ab)
        metric = ab.metric or plan.metric
        if ab.columns:
            groups = [(label, values(df, ab.runs, col)) for label, col in ab.columns.items()]
            for i in range(min(len(g[1]) for g in groups)):  # the same run across columns
                ax.plot(range(len(groups)), [g[1][i] for g in groups], color="tab:blue", alpha=0.3, lw=0.8)
            ylabel = "val bpb"
        else:
            groups = [(v, values(df, v, metric)) for v in (ab.baseline, *ab.variants)]
            ylabel = LABELS.get(metric, metric)
        base = table.loc[table["row"] == ab.baseline, "mean"]
        _strip(ax, groups, float(base.iloc[0]) if len(base) else None, ylabel)
        for i, (_, r) in enumerate(table.iterrows()):
            if finite(r["p_baseline_better"]):
                ax.annotate(f"{r['diff']:+.4f}\np={r['p_baseline_better']:.2g}", (i, 1.0),
                            xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=6)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{plan.study}: ablations (p: one-sided Welch, baseline better; lower is better)", fontsize=9)
    return fig


def plot_kernel_throughput(plan: Plan, df: pd.DataFrame, ablation: str = "attention") -> Figure:
    """Mean step ms of each run of the attention-kernel ablation, by the backend it used."""
    ab = plan.ablations.get(ablation)
    if ab is None or ab.columns:
        raise NoData(f"plan {plan.study} has no {ablation!r} ablation of variants")
    groups = []
    for v in (ab.baseline, *ab.variants):
        sub = df[df["variant"] == v] if len(df) else df
        backend = sub["attention_backend"].dropna().iloc[0] if len(sub) and sub["attention_backend"].notna().any() else v
        groups.append((f"{backend}\n({v})", values(df, v, "mean_step_ms")))
    if not any(g[1] for g in groups):
        raise NoData(f"no run of the {ablation!r} ablation has a mean step time")
    cards = sorted({str(c) for c in df["card"].dropna()}) if "card" in df.columns else []
    fig = new_figure(6.0, 4.0)
    ax = fig.subplots()
    _strip(ax, groups, None, "mean step ms (lower is faster)")
    ax.set_title(f"training step time by attention kernel ({', '.join(cards) or '?'}, one GPU a run)", fontsize=9)
    return fig


def plot_plan_loss_curves(plan: Plan, df: pd.DataFrame) -> Figure:
    """Training loss vs step, one panel per ablation of variants, one colour per variant
    (every seed drawn), from step 50 on."""
    names = [n for n, ab in plan.ablations.items() if not ab.columns]
    if not names or df.empty:
        raise NoData(f"plan {plan.study} has no ablation of variants with runs")
    fig = new_figure(3.6 * len(names), 3.8)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    drawn = 0
    for ax, name in zip(axes, names):
        ab = plan.ablations[name]
        for k, v in enumerate((ab.baseline, *ab.variants)):
            color = "black" if k == 0 else f"C{k}"
            for j, (_, row) in enumerate(df[df["variant"] == v].iterrows()):
                m = load_metrics(row["path"])
                if m.empty or "train_loss" not in m.columns:
                    continue
                m = m[m["step"] >= 50]
                ax.plot(m["step"], m["train_loss"], color=color, lw=0.9, alpha=0.8, label=v if j == 0 else None)
                drawn += 1
        ax.set(xlabel="step", title=name)
        ax.set_ylabel("train loss (nats/token)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if not drawn:
        raise NoData(f"no run of plan {plan.study} has train lines in metrics.jsonl")
    return fig


def _sweep_table(plan: Plan, runs_dir: Path) -> pd.DataFrame:
    if not plan.eval_sweep_run:
        raise NoData(f"plan {plan.study} has no eval sweep")
    rd = resolve(runs_dir) / plan.study / plan.eval_sweep_run
    if not rd.is_dir():
        raise NoData(f"the eval sweep's run {rd} does not exist")
    return eval_table(rd)


def plot_ttt_settings(plan: Plan, runs_dir: Path, reference: str = "ttt-record") -> Figure:
    """val bpb of each TTT setting of the eval sweep, one panel per setting changed, the
    `reference` evaluation (record's TTT settings) circled; dotted: no TTT."""
    table = _sweep_table(plan, runs_dir)
    table = table[table["variant"] != "run"].copy()  # the run's own (plain, no TTT) evaluation
    table.loc[table["variant"] == reference, "variant"] = "run"
    fig = plot_eval_sweep(table.reset_index(drop=True))
    fig.suptitle(f"{plan.study}: TTT settings on {plan.eval_sweep_run}'s packed model (one model, no seeds)",
                 fontsize=9)
    return fig


def plot_ttt_chunks(plan: Plan, runs_dir: Path) -> Figure:
    """Per-chunk TTT gain (sliding bpb - TTT bpb) along the validation stream, one line per
    TTT setting of the eval sweep."""
    table = _sweep_table(plan, runs_dir).set_index("variant")
    rd = resolve(runs_dir) / plan.study / (plan.eval_sweep_run or "")
    series = []
    for name in plan.eval_sweep_variants:
        g = chunk_gains(rd, name)
        if g:
            series.append((name, g, table["ttt_gain_bpb"].get(name)))
    if not series:
        raise NoData(f"no evaluation of plan {plan.study}'s eval sweep has per-chunk TTT gains")
    fig = new_figure(8, 4.0)
    ax = fig.subplots()
    for name, g, total in series:
        ax.plot(range(len(g)), g, marker=".", lw=1, label=f"{name} (total {total:+.4f})" if finite(total) else name)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(xlabel="validation chunk", ylabel="bpb gain (sliding - TTT)",
           title=f"TTT gain per chunk, {plan.eval_sweep_run}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


PLAN_FIGURES: dict[str, Callable[[Plan, pd.DataFrame, Path], Figure]] = {
    "ablations": lambda plan, df, runs: plot_ablations(plan, df),
    "throughput_by_kernel": lambda plan, df, runs: plot_kernel_throughput(plan, df),
    "loss_curves": lambda plan, df, runs: plot_plan_loss_curves(plan, df),
    "ttt_settings": lambda plan, df, runs: plot_ttt_settings(plan, runs),
    "ttt_gain_per_chunk": lambda plan, df, runs: plot_ttt_chunks(plan, runs),
    "artifact_size": lambda plan, df, runs: plot_artifact_size(df),
}


def export_plan_figures(plan: Plan | str | Path, runs_dir: str | Path, out_dir: str | Path,
                        log: Callable[[str], None] | None = print) -> dict[str, list[Path] | str]:
    """Every figure of the plan into out_dir as <study>_<name>.png/.svg; returns {name: paths
    or the reason it was skipped}."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    runs = resolve(runs_dir)
    df = plan_frame(plan, runs)
    out: dict[str, list[Path] | str] = {}
    for name, make in PLAN_FIGURES.items():
        try:
            fig = make(plan, df, runs)
        except NoData as e:
            out[name] = f"skipped: {e}"
        else:
            out[name] = save_figure(fig, out_dir, f"{plan.study}_{name}")
        if log:
            log(f"{plan.study}_{name}: " + (out[name] if isinstance(out[name], str) else ", ".join(map(str, out[name]))))
    return out
