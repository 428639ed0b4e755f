"""The results of a study plan (`lmcore.study.plan`) as tables: one per ablation, each row a
variant (or, for a "columns" ablation, a column of the same runs) with its seeds' mean and
standard deviation, the difference from the baseline and two one-sided Welch p-values from
the study's significance function (`lmcore.stats.challenge_test`, no margin): that the
baseline is better (lower) than the row, and that the row is better than the baseline.
`plan_markdown` writes every table as Markdown (`lmcore study report`).

Derived columns: `quant_gap_bpb` = eval_bpb - prequant_val_bpb (what packing costs, when the
eval uses the same plain windows as training's validation).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore.stats import challenge_test, mean_std
from lmcore.study.paths import resolve
from lmcore.study.plan import Ablation, Plan, load_plan, plan_runs
from lmcore.study.results import eval_table, finite, load_runs

__all__ = ["ablation_table", "find_plans", "plan_frame", "plan_markdown", "plan_tables", "values"]

LABELS = {
    "val_bpb_raw": "val bpb, raw weights",
    "prequant_val_bpb": "val bpb, EMA weights (pre-quant)",
    "val_bpb_ema": "val bpb, EMA",
    "val_bpb_ema_alt": "val bpb, other EMA mode",
    "eval_bpb": "val bpb, packed (int6 GPTQ)",
    "quant_gap_bpb": "quantization gap (bpb)",
    "mean_step_ms": "step ms",
    "tokens_per_s": "tokens/s",
    "total_bytes": "artifact bytes",
}


def find_plans(runs_dir: str | Path) -> list[Path]:
    """The plan.json of every study under runs_dir (RUNS_DIR/<study>/plan.json), sorted."""
    base = resolve(runs_dir)
    return sorted(p for p in base.glob("*/plan.json") if p.is_file())


def plan_frame(plan: Plan, runs_dir: str | Path) -> pd.DataFrame:
    """The plan's runs that exist under runs_dir (`load_runs` rows, seed-major), with the
    derived columns."""
    base = resolve(runs_dir)
    dirs = [rd for _v, _s, rd in plan_runs(plan, base) if rd.is_dir()]
    df = load_runs(base, runs=dirs)
    if len(df):
        df["quant_gap_bpb"] = pd.to_numeric(df["eval_bpb"], errors="coerce") - pd.to_numeric(
            df["prequant_val_bpb"], errors="coerce")
    return df


def values(df: pd.DataFrame, variant: str, column: str) -> list[float]:
    """The finite values of `column` over the runs of `variant`."""
    if column not in df.columns:
        return []
    sub = df[df["variant"] == variant] if "variant" in df.columns else df.iloc[0:0]
    return [float(v) for v in pd.to_numeric(sub[column], errors="coerce") if finite(float(v))]


def _p(cand: list[float], ref: list[float]) -> float:
    """One-sided Welch p that mean(cand) < mean(ref) (nan with fewer than 2 values a side)."""
    if len(cand) < 2 or len(ref) < 2:
        return math.nan
    return challenge_test(cand, ref, min_improvement=0.0, alpha=1.0).p_value


def _stats(vals: list[float]) -> tuple[float, float]:
    return mean_std(vals) if vals else (math.nan, math.nan)


def ablation_table(plan: Plan, df: pd.DataFrame, ablation: str | Ablation) -> pd.DataFrame:
    """One ablation's table (see the module docstring): columns row, n, seeds, metric mean and
    std, diff (row - baseline), p_baseline_better, p_row_better, then mean, std and p that the
    baseline's is lower of each extra column."""
    ab = plan.ablations[ablation] if isinstance(ablation, str) else ablation
    metric = ab.metric or plan.metric
    if ab.columns:
        rows = [(label, ab.runs, col) for label, col in ab.columns.items()]
        base_vals = values(df, ab.runs, ab.columns[ab.baseline])
    else:
        rows = [(v, v, metric) for v in (ab.baseline, *ab.variants)]
        base_vals = values(df, ab.baseline, metric)
    base_mean = _stats(base_vals)[0]
    out: list[dict[str, Any]] = []
    for label, variant, col in rows:
        vals = values(df, variant, col)
        m, s = _stats(vals)
        is_base = label == ab.baseline
        sub = df[df["variant"] == variant] if len(df) else df
        row: dict[str, Any] = {
            "row": label, "n": len(vals), "seeds": ",".join(str(int(x)) for x in sub["seed"]) if len(sub) else "",
            "metric": col, "mean": m, "std": s, "diff": math.nan if is_base else m - base_mean,
            "p_baseline_better": math.nan if is_base else _p(base_vals, vals),
            "p_row_better": math.nan if is_base else _p(vals, base_vals),
        }
        for extra in ab.extra:
            ev = values(df, variant, extra)
            em, es = _stats(ev)
            row[f"{extra}_mean"], row[f"{extra}_std"] = em, es
            row[f"{extra}_p"] = math.nan if is_base else _p(values(df, ab.baseline, extra), ev)
        out.append(row)
    return pd.DataFrame(out)


def plan_tables(plan: Plan | str | Path, runs_dir: str | Path = "runs",
                df: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Every ablation's table, plus "eval_sweep" (the eval sweep run's `eval_table`) when the
    plan has one and its run exists; `df`: the plan's runs when already loaded (`plan_frame`)."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    df = plan_frame(plan, runs_dir) if df is None else df
    out = {name: ablation_table(plan, df, ab) for name, ab in plan.ablations.items()}
    if plan.eval_sweep_run:
        rd = resolve(runs_dir) / plan.study / plan.eval_sweep_run
        if rd.is_dir():
            out["eval_sweep"] = eval_table(rd)
    return out


def _num(v: Any, digits: int) -> str:
    if not finite(v):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _pval(p: Any) -> str:
    return "<0.001" if finite(p) and p < 0.001 else _num(p, 3)


def _pm(m: Any, s: Any, digits: int) -> str:
    return _num(m, digits) + (f" ± {_num(s, digits)}" if finite(s) else "")


def _tested(col: str) -> bool:
    """Extra columns whose p (baseline lower) the Markdown shows: bpb and milliseconds."""
    return "bpb" in col or col.endswith("_ms")


def _digits(col: str) -> int:
    return 4 if "bpb" in col or col == "diff" else 1


def ablation_markdown(plan: Plan, name: str, table: pd.DataFrame) -> str:
    ab = plan.ablations[name]
    metric = ab.metric or plan.metric
    what = "val bpb" if ab.columns else LABELS.get(metric, metric)
    head = ["row", "n", f"{what} (mean ± std)", "diff vs " + str(ab.baseline),
            "p (baseline better)", "p (row better)"] + [LABELS.get(e, e) for e in ab.extra]
    lines = [f"### {name}: {ab.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [f"`{r['row']}`" + (" (baseline)" if r["row"] == ab.baseline else ""), str(r["n"]),
                 _pm(r["mean"], r["std"], 4), _num(r["diff"], 4) if finite(r["diff"]) else "",
                 _pval(r["p_baseline_better"]), _pval(r["p_row_better"])]
        cells += [_pm(r[f"{e}_mean"], r[f"{e}_std"], _digits(e))
                  + (f" (p {_pval(r[f'{e}_p'])})" if _tested(e) and finite(r[f"{e}_p"]) else "") for e in ab.extra]
        lines.append("| " + " | ".join(cells) + " |")
    if ab.columns:
        lines += ["", f"Columns of the same `{ab.runs}` runs: " + ", ".join(f"`{k}` = {v}" for k, v in ab.columns.items())
                  + "."]
    return "\n".join(lines)


def eval_sweep_markdown(plan: Plan, table: pd.DataFrame) -> str:
    lines = [f"### TTT settings: eval-only sweep of `{plan.eval_sweep_run}`'s packed model", "",
             "| evaluation | changed | val bpb | sliding bpb (no TTT) | TTT gain (bpb) | eval s |", "|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        changed = r["overrides"] if isinstance(r["overrides"], str) and r["overrides"] else "-"
        lines.append(f"| `{r['variant']}` | {changed} | {_num(r['bpb'], 4)} | {_num(r['sliding_bpb'], 4)} | "
                     f"{_num(r['ttt_gain_bpb'], 4)} | {_num(r['eval_time_s'], 1)} |")
    return "\n".join(lines)


def plan_markdown(plan: Plan | str | Path, runs_dir: str | Path = "runs") -> str:
    """Every table of the plan as Markdown, with the runs' card, steps and tokens."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    df = plan_frame(plan, runs_dir)
    tables = plan_tables(plan, runs_dir, df)
    cards = sorted({str(c) for c in df.get("card", pd.Series(dtype=object)).dropna()})
    steps = sorted({int(s) for s in pd.to_numeric(df.get("steps", pd.Series(dtype=float)), errors="coerce").dropna()})
    tokens = sorted({int(t) for t in pd.to_numeric(df.get("tokens", pd.Series(dtype=float)), errors="coerce").dropna()})
    head = (f"Study `{plan.study}`: {len(df)} runs of preset `{plan.preset}` "
            f"(overrides {' '.join(plan.overrides) or 'none'}); card {', '.join(cards) or '?'}; "
            f"steps {', '.join(map(str, steps)) or '?'}; training tokens a run "
            f"{', '.join(f'{t:,}' for t in tokens) or '?'}. "
            "p: one-sided Welch t-test (lmcore.stats.challenge_test, no margin) on the per-seed values; "
            "in the extra columns, (p x) is the p that the baseline's value is lower.")
    parts = [head]
    for name in plan.ablations:
        parts.append(ablation_markdown(plan, name, tables[name]))
    if "eval_sweep" in tables:
        parts.append(eval_sweep_markdown(plan, tables["eval_sweep"]))
    return "\n\n".join(parts) + "\n"
