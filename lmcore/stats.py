"""Statistics for seed studies: mean and standard deviation, and the challenge's
significance test (Welch's t-test from scipy.stats).

The challenge (SPEC section 0) accepts a new record when it beats the reference by at
least 0.005 nats (validation loss, nats per token) with p < 0.01 over seeds. `challenge_test`
is that test: a one-sided Welch t-test of

    H0: mean(reference) - mean(candidate) <= min_improvement
    H1: mean(reference) - mean(candidate) >  min_improvement

with t = (mean_ref - mean_cand - min_improvement) / sqrt(s_c^2/n_c + s_r^2/n_r) and the
Welch-Satterthwaite degrees of freedom: `scipy.stats.ttest_ind(reference, candidate +
min_improvement, equal_var=False, alternative="greater")`. A reference given as a single
published number (no per-seed values) is taken as exact: the test becomes the one-sample
t-test `scipy.stats.ttest_1samp(candidate + min_improvement, reference,
alternative="less")` with n_c - 1 degrees of freedom (the Welch formula's limit for a
zero-variance reference). Samples without any spread (t = +-inf or 0/0) are decided
directly: p = 0 or 1, and 0.5 when the improvement equals the margin exactly.
`challenge_bars` applies both bars the challenge is judged by (SPEC section 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = [
    "CHALLENGE_ALPHA",
    "CHALLENGE_MIN_IMPROVEMENT_NATS",
    "PRACTICE_ALPHA",
    "PRACTICE_MIN_IMPROVEMENT",
    "WelchResult",
    "bpb_to_nats",
    "challenge_bars",
    "challenge_test",
    "mean_std",
]

CHALLENGE_MIN_IMPROVEMENT_NATS = 0.005
CHALLENGE_ALPHA = 0.01
# The maintainers' practice since April 2026 (openai/parameter-golf #1902, #2146): a new
# frontier row needs a one-sided Welch test at p < 0.25 against the previous frontier row
# (seeds pooled with reproductions), with no minimum margin.
PRACTICE_ALPHA = 0.25
PRACTICE_MIN_IMPROVEMENT = 0.0


def _floats(values: Iterable[float]) -> list[float]:
    out = [float(v) for v in values]
    for v in out:
        if not math.isfinite(v):
            raise ValueError(f"non-finite value {v!r} in a sample")
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for a single value)."""
    xs = _floats(values)
    if not xs:
        raise ValueError("mean_std of an empty sample")
    n = len(xs)
    m = math.fsum(xs) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))


@dataclass(frozen=True)
class WelchResult:
    """The outcome of `challenge_test`; `statement` says it in one plain sentence."""

    metric: str
    n: int
    mean: float
    std: float
    reference_n: int  # 1 for a single published number (taken as exact)
    reference_mean: float
    reference_std: float  # nan when the reference is a single number
    improvement: float  # reference_mean - mean (positive = the candidate is better)
    min_improvement: float
    alpha: float
    t: float
    df: float
    p_value: float
    passed: bool
    statement: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_sided(cand: list[float], ref: list[float], margin: float) -> tuple[float, float, float]:
    """(t, df, p) of H1: mean(ref) - mean(cand) > margin (see the module docstring)."""
    from scipy import stats as st  # here: every `lmcore` command imports this module, few run a test

    shifted = [c + margin for c in cand]
    exact_ref = len(ref) == 1
    if not (mean_std(cand)[1] > 0 or (not exact_ref and mean_std(ref)[1] > 0)):
        # no spread at all: the sign of the difference decides
        diff = mean_std(ref)[0] - mean_std(shifted)[0]
        t = math.copysign(math.inf, diff) if diff else math.nan
        p = 0.5 if math.isnan(t) else (0.0 if t > 0 else 1.0)
        return t, (float(len(cand) - 1) if exact_ref else math.nan), p
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical values: scipy warns, the result stands
        if exact_ref:
            res = st.ttest_1samp(shifted, ref[0], alternative="less")
            return -float(res.statistic), float(len(cand) - 1), float(res.pvalue)
        res = st.ttest_ind(ref, shifted, equal_var=False, alternative="greater")
        return float(res.statistic), float(res.df), float(res.pvalue)


def challenge_test(
    candidate: Iterable[float],
    reference: float | Iterable[float],
    min_improvement: float = CHALLENGE_MIN_IMPROVEMENT_NATS,
    alpha: float = CHALLENGE_ALPHA,
    metric: str = "val_loss (nats)",
) -> WelchResult:
    """One-sided Welch test that `candidate` beats `reference` by more than `min_improvement`.

    Lower is better (losses). `reference` is per-seed values of the reference
    configuration, or one number (a published result, treated as exact). The candidate
    needs at least 2 values; with fewer the result has p = nan and passed = False.
    """
    cand = _floats(candidate)
    ref = [float(reference)] if isinstance(reference, (int, float)) else _floats(reference)
    if not cand or not ref:
        raise ValueError("challenge_test needs at least one candidate and one reference value")
    m, s = mean_std(cand)
    rm, rs = mean_std(ref)
    n, rn = len(cand), len(ref)
    improvement = rm - m
    t = df = p = math.nan
    why = f"cannot test: {n} candidate value (need at least 2 seeds)" if n < 2 else ""
    if not why:
        t, df, p = _one_sided(cand, ref, min_improvement)
    passed = bool(not why and p < alpha)
    ref_txt = (
        f"the reference {rm:.5f} (one number, taken as exact)"
        if rn == 1
        else f"the reference mean {rm:.5f} (std {rs:.5f}, {rn} seeds)"
    )
    head = f"{metric}: candidate mean {m:.5f}" + (f" (std {s:.5f}, {n} seeds)" if n > 1 else f" ({n} seed)")
    if why:
        statement = f"{head} vs {ref_txt}; {why}."
    else:
        verdict = "PASSES" if passed else "does NOT pass"
        test = "one-sided Welch t-test" if rn > 1 else "one-sided t-test (Welch with an exact reference)"
        statement = (
            f"{head} vs {ref_txt}: improvement {improvement:+.5f}; {test} of "
            f"improvement > {min_improvement:g}: t = {t:.3f}, df = {df:.1f}, p = {p:.3g}. "
            f"The candidate {verdict} the bar (improvement >= {min_improvement:g} with p < {alpha:g})."
        )
    return WelchResult(
        metric=metric, n=n, mean=m, std=s, reference_n=rn, reference_mean=rm, reference_std=rs,
        improvement=improvement, min_improvement=min_improvement, alpha=alpha, t=t, df=df,
        p_value=p, passed=passed, statement=statement,
    )


def challenge_bars(
    candidate: Iterable[float],
    reference: float | Iterable[float],
    metric: str = "val_loss (nats)",
) -> dict[str, WelchResult]:
    """Both bars a result is judged by (SPEC section 0), as {"readme": ..., "practice": ...}.

    "readme": the challenge README's written rule, an improvement of at least 0.005 nats
    with p < 0.01 (`metric` must then be in nats per token). "practice": the maintainers'
    frontier rule, any improvement with p < 0.25 (one-sided Welch; pool reproductions'
    seeds into `reference`). Each statement names its bar.
    """
    cand = _floats(candidate)
    ref = float(reference) if isinstance(reference, (int, float)) else _floats(reference)
    out = {}
    for key, margin, alpha, name in (
        ("readme", CHALLENGE_MIN_IMPROVEMENT_NATS, CHALLENGE_ALPHA, "README bar (0.005 nats, p < 0.01)"),
        ("practice", PRACTICE_MIN_IMPROVEMENT, PRACTICE_ALPHA, "maintainers' frontier bar (p < 0.25, #1902)"),
    ):
        r = challenge_test(cand, ref, min_improvement=margin, alpha=alpha, metric=metric)
        out[key] = replace(r, statement=f"{name}: {r.statement}")
    return out


def bpb_to_nats(bpb: float, tokens: float, nbytes: float) -> float:
    """Bits per byte -> nats per token on a split of `tokens` tokens holding `nbytes` bytes."""
    if tokens <= 0:
        raise ValueError("bpb_to_nats needs a positive token count")
    return float(bpb) * math.log(2.0) * float(nbytes) / float(tokens)
