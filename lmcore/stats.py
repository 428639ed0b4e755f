"""Statistics for seed studies: mean and standard deviation, Student's t distribution, and
the challenge's significance test, with no dependency beyond the standard library.

The challenge (SPEC section 0) accepts a new record when it beats the reference by at
least 0.005 nats (validation loss, nats per token) with p < 0.01 over seeds. `challenge_test`
is that test: a one-sided Welch t-test of

    H0: mean(reference) - mean(candidate) <= min_improvement
    H1: mean(reference) - mean(candidate) >  min_improvement

with t = (mean_ref - mean_cand - min_improvement) / sqrt(s_c^2/n_c + s_r^2/n_r) and the
Welch-Satterthwaite degrees of freedom. A reference given as a single published number
(no per-seed values) is taken as exact: the test becomes a one-sample t-test with
n_c - 1 degrees of freedom (the Welch formula's limit for a zero-variance reference).

The t distribution's CDF comes from the regularized incomplete beta function
I_x(a, b), evaluated with its continued fraction (modified Lentz), accurate to ~1e-13.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = [
    "CHALLENGE_ALPHA",
    "CHALLENGE_MIN_IMPROVEMENT_NATS",
    "PRACTICE_ALPHA",
    "PRACTICE_MIN_IMPROVEMENT",
    "WelchResult",
    "betainc",
    "bpb_to_nats",
    "challenge_bars",
    "challenge_test",
    "mean_std",
    "t_cdf",
    "t_ppf",
    "t_sf",
    "welch_t",
]

CHALLENGE_MIN_IMPROVEMENT_NATS = 0.005
CHALLENGE_ALPHA = 0.01
# The maintainers' practice since April 2026 (openai/parameter-golf #1902, #2146): a new
# frontier row needs a one-sided Welch test at p < 0.25 against the previous frontier row
# (seeds pooled with reproductions), with no minimum margin.
PRACTICE_ALPHA = 0.25
PRACTICE_MIN_IMPROVEMENT = 0.0

_EPS = 1e-15
_TINY = 1e-300


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
    var = math.fsum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = _TINY if abs(d) < _TINY else d
    d = 1.0 / d
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = _TINY if abs(d) < _TINY else d
        c = 1.0 + aa / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = _TINY if abs(d) < _TINY else d
        c = 1.0 + aa / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0 (got a={a}, b={b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1 (got {x})")
    if x == 0.0 or x == 1.0:
        return x
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln_front)
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); else use symmetry
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` > 0 degrees of freedom (df may be fractional)."""
    if df <= 0 or math.isnan(df):
        raise ValueError(f"t distribution needs df > 0 (got {df})")
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if math.isinf(df) and math.isfinite(t):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    if math.isfinite(t) and t < 0:
        return t_sf(-t, df)
    return 1.0 - t_sf(t, df)


def t_ppf(q: float, df: float) -> float:
    """The quantile t_{q, df}: the t with P(T <= t) = q (bisection on the CDF)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile q must be in (0, 1) (got {q})")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
        if hi > 1e300:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def welch_t(a: Sequence[float], b: Sequence[float], delta: float = 0.0) -> tuple[float, float]:
    """Welch's t statistic of mean(a) - mean(b) - delta, and its Welch-Satterthwaite df.

    Both samples need at least 2 values. With both variances zero, t is +-inf (or nan
    when the difference is exactly delta) and df is nan.
    """
    xa, xb = _floats(a), _floats(b)
    if len(xa) < 2 or len(xb) < 2:
        raise ValueError(f"welch_t needs at least 2 values per sample (got {len(xa)} and {len(xb)})")
    ma, sa = mean_std(xa)
    mb, sb = mean_std(xb)
    va, vb = sa * sa / len(xa), sb * sb / len(xb)
    se2 = va + vb
    diff = ma - mb - delta
    if se2 == 0.0:
        return (math.copysign(math.inf, diff) if diff else math.nan), math.nan
    df = se2 * se2 / (va * va / (len(xa) - 1) + vb * vb / (len(xb) - 1))
    return diff / math.sqrt(se2), df


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
    if isinstance(reference, (int, float)):
        ref = [float(reference)]
    else:
        ref = _floats(reference)
    if not cand or not ref:
        raise ValueError("challenge_test needs at least one candidate and one reference value")
    m, s = mean_std(cand)
    rm, rs = mean_std(ref)
    n, rn = len(cand), len(ref)
    improvement = rm - m
    t = df = p = math.nan
    why = ""
    if n < 2:
        why = f"cannot test: {n} candidate value (need at least 2 seeds)"
    elif rn == 1:
        se = s / math.sqrt(n)
        diff = improvement - min_improvement
        df = float(n - 1)
        if se == 0.0:
            t = math.copysign(math.inf, diff) if diff else math.nan
        else:
            t = diff / se
    else:
        t, df = welch_t(ref, cand, delta=min_improvement)
    if not why:
        if math.isnan(t):
            p = 0.5  # the improvement equals the bar exactly, with no spread
        elif math.isinf(t):
            p = 0.0 if t > 0 else 1.0
        else:
            p = t_sf(t, df)
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
