"""Seed batches and the challenge's significance bars.

`seed_runs` / `reference_runs`: the run folders of a configuration over seeds, either given
(paths or globs) or run here as a sweep named "seeds" (runs_dir/seeds/<variant>-s<seed>),
spread over the node's GPUs like any sweep. `seeds_table`: one row per run (seed, val_bpb,
val_loss, context); `seeds_summary`: mean, std, n. `seeds_bars`: both bars of SPEC section
0, each a one-sided Welch test on the val loss (nats per token) from
`lmcore.stats.challenge_bars`: the README's (an improvement of at least 0.005 nats with
p < 0.01) and the maintainers' practice (any improvement with p < 0.25 against the previous
frontier row); `seeds_test` one of them (the README's by default); `welch_table` a test's
numbers as a table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore.errors import InputError
from lmcore.stats import (
    CHALLENGE_ALPHA,
    CHALLENGE_MIN_IMPROVEMENT_NATS,
    WelchResult,
    bpb_to_nats,
    challenge_bars,
    challenge_test,
    mean_std,
)
from lmcore.study.results import expand_runs, load_runs
from lmcore.study.sweeps import sweep

__all__ = [
    "SEEDS_COLUMNS",
    "reference_runs",
    "seed_runs",
    "seeds_bars",
    "seeds_summary",
    "seeds_table",
    "seeds_test",
    "welch_table",
]


def seed_runs(
    run_dirs: Sequence[str | Path] = (),
    *,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (1, 2),
    variant: str = "candidate",
    runs_dir: str | Path = "runs",
    root: str | Path | None = None,
    **sweep_kw: Any,
) -> list[Path]:
    """The run folders of a seed batch: `run_dirs` (paths or globs) when given, else one
    run per seed of preset + overrides, in runs_dir/seeds/<variant>-s<seed> (a `sweep`;
    `sweep_kw` go to it: num_gpus, devices, log, ...)."""
    if run_dirs:
        return expand_runs(list(run_dirs), root)
    df = sweep("seeds", {variant: []}, preset=preset, overrides=overrides, seeds=seeds, runs_dir=runs_dir,
               root=root, **sweep_kw)
    return [Path(p) for p in df["path"]]


def reference_runs(
    reference_runs: Sequence[str | Path] = (),
    *,
    reference_overrides: Sequence[str] | None = None,
    reference_loss: float | Sequence[float] | None = None,
    reference_bpb: float | Sequence[float] | None = None,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    seeds: Sequence[int] = (1, 2),
    runs_dir: str | Path = "runs",
    root: str | Path | None = None,
    **sweep_kw: Any,
) -> list[Path]:
    """The reference configuration's run folders: `reference_runs` (paths or globs) when
    given; [] when the reference is a number (`reference_loss` / `reference_bpb`); else,
    with `reference_overrides` (not None), one run per seed of preset + overrides +
    reference_overrides in runs_dir/seeds/reference-s<seed>; else []."""
    if reference_runs:
        return expand_runs(list(reference_runs), root)
    if reference_loss is not None or reference_bpb is not None or reference_overrides is None:
        return []
    df = sweep("seeds", {"reference": list(reference_overrides)}, preset=preset, overrides=overrides, seeds=seeds,
               runs_dir=runs_dir, root=root, **sweep_kw)
    return [Path(p) for p in df["path"]]


SEEDS_COLUMNS = ["run", "seed", "status", "val_bpb", "val_loss", "score_source", "prequant_val_bpb",
                 "ttt_gain_bpb", "train_time_s", "total_bytes", "eval_tokens", "eval_bytes"]


def seeds_table(runs: Iterable[str | Path], root: str | Path | None = None) -> pd.DataFrame:
    """One row per run folder (paths or globs): seed, score (val_bpb / val_loss) and context."""
    dirs = expand_runs(list(runs), root)
    df = load_runs(dirs[0].parent if dirs else ".", runs=dirs)
    for c in SEEDS_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[SEEDS_COLUMNS].reset_index(drop=True)


def _scores(df: pd.DataFrame, metric: str) -> list[float]:
    return [float(v) for v in df[metric] if v is not None and not (isinstance(v, float) and math.isnan(v))]


def seeds_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and n of val_bpb and val_loss over the runs that have a score."""
    rows = []
    for metric in ("val_bpb", "val_loss"):
        vals = _scores(df, metric)
        if vals:
            m, s = mean_std(vals)
            rows.append({"metric": metric, "n": len(vals), "mean": m, "std": s, "min": min(vals), "max": max(vals)})
    return pd.DataFrame(rows, columns=["metric", "n", "mean", "std", "min", "max"])


def _bytes_per_token(df: pd.DataFrame) -> float | None:
    ok = df[df["eval_tokens"].notna() & df["eval_bytes"].notna()]
    if ok.empty:
        return None
    return float(ok["eval_bytes"].astype(float).sum() / ok["eval_tokens"].astype(float).sum())


def _samples(
    df: pd.DataFrame,
    reference_runs: Iterable[str | Path] | None,
    reference_loss: float | Sequence[float] | None,
    reference_bpb: float | Sequence[float] | None,
    root: str | Path | None,
) -> tuple[list[float], float | list[float]]:
    """The candidate's val losses and the reference's (see `seeds_test`), in nats."""
    cand = _scores(df, "val_loss")
    if not cand:
        raise InputError(f"the runs {', '.join(map(str, df['run']))} have no val_loss (not trained / evaluated?)")
    if reference_runs:
        ref_df = seeds_table(reference_runs, root)
        ref: float | list[float] = _scores(ref_df, "val_loss")
        if not ref:
            raise InputError(f"the reference runs {', '.join(map(str, ref_df['run']))} have no val_loss "
                             "(not trained / evaluated?)")
    elif reference_loss is not None:
        ref = float(reference_loss) if isinstance(reference_loss, (int, float)) else [float(x) for x in reference_loss]
    elif reference_bpb is not None:
        bpt = _bytes_per_token(df)
        if bpt is None:
            raise InputError("reference_bpb needs eval.json (tokens, bytes) in the candidate runs to convert "
                             "bits per byte to nats per token; give reference_loss instead")
        ref = (bpb_to_nats(float(reference_bpb), 1.0, bpt) if isinstance(reference_bpb, (int, float))
               else [bpb_to_nats(float(b), 1.0, bpt) for b in reference_bpb])
    else:
        raise InputError("give a reference: reference_runs, reference_loss (nats) or reference_bpb")
    vals = [ref] if isinstance(ref, float) else ref
    if not vals or not all(math.isfinite(v) for v in vals):
        raise InputError(f"the reference needs finite values, got {ref!r}")
    return cand, ref


def seeds_test(
    df: pd.DataFrame,
    *,
    reference_runs: Iterable[str | Path] | None = None,
    reference_loss: float | Sequence[float] | None = None,
    reference_bpb: float | Sequence[float] | None = None,
    min_improvement: float = CHALLENGE_MIN_IMPROVEMENT_NATS,
    alpha: float = CHALLENGE_ALPHA,
    root: str | Path | None = None,
) -> WelchResult:
    """One Welch test of the runs in `df` (a `seeds_table`) against a reference, by
    default the README's bar; `seeds_bars` gives both bars the challenge applies.

    The reference is, in order of preference: run folders of the reference
    configuration (`reference_runs`), val losses in nats (`reference_loss`), or val bpb
    (`reference_bpb`, converted to nats with the candidate runs' own bytes per token on
    the same validation split). One number is a published result, taken as exact.
    """
    cand, ref = _samples(df, reference_runs, reference_loss, reference_bpb, root)
    return challenge_test(cand, ref, min_improvement=min_improvement, alpha=alpha, metric="val_loss (nats/token)")


def seeds_bars(
    df: pd.DataFrame,
    *,
    reference_runs: Iterable[str | Path] | None = None,
    reference_loss: float | Sequence[float] | None = None,
    reference_bpb: float | Sequence[float] | None = None,
    root: str | Path | None = None,
) -> dict[str, WelchResult]:
    """Both bars of SPEC section 0 for the runs in `df` against a reference (as in
    `seeds_test`): {"readme": 0.005 nats at p < 0.01, "practice": p < 0.25 against the
    previous frontier row, its seeds pooled with reproductions}, each one-sided Welch
    (`lmcore.stats.challenge_bars`); each result's statement names its bar."""
    cand, ref = _samples(df, reference_runs, reference_loss, reference_bpb, root)
    return challenge_bars(cand, ref, metric="val_loss (nats/token)")


def welch_table(result: WelchResult | dict[str, WelchResult]) -> pd.DataFrame:
    """A test's numbers as a table (what, value); for `seeds_bars`' dict one column per bar."""
    bars = result if isinstance(result, dict) else {"value": result}
    keys = ["metric", "n", "mean", "std", "reference_n", "reference_mean", "reference_std", "improvement",
            "min_improvement", "alpha", "t", "df", "p_value", "passed"]
    cols = {name: r.to_dict() for name, r in bars.items()}
    return pd.DataFrame([(k, *(d[k] for d in cols.values())) for k in keys], columns=["what", *cols])
