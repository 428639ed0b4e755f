"""lmcore.stats against known values: t quantiles from tables, closed forms for df = 1 and 2,
a textbook Welch example, and the challenge's one-sided test."""

from __future__ import annotations

import math

import pytest

from lmcore.stats import (
    betainc,
    bpb_to_nats,
    challenge_test,
    mean_std,
    t_cdf,
    t_ppf,
    t_sf,
    welch_t,
)


@pytest.mark.parametrize(
    "q, df, expected",
    [
        (0.99, 10, 2.764),  # the classic table values (3 decimals)
        (0.975, 10, 2.228),
        (0.95, 1, 6.314),
        (0.995, 5, 4.032),
        (0.999, 3, 10.215),
        (0.9, 30, 1.310),
        (0.975, 1e9, 1.960),
    ],
)
def test_t_quantiles_match_tables(q, df, expected):
    assert t_ppf(q, df) == pytest.approx(expected, abs=6e-4)
    assert t_cdf(expected, df) == pytest.approx(q, abs=2e-4)


def test_t_quantiles_match_reference_to_many_digits():
    # values from scipy.stats.t.ppf (computed once; scipy is not a dependency)
    assert t_ppf(0.99, 10) == pytest.approx(2.7637694581126957, rel=1e-11)
    assert t_ppf(0.99, 2.5) == pytest.approx(5.353111173030872, rel=1e-11)
    assert t_cdf(-1.5, 3.3) == pytest.approx(0.11125159835964593, rel=1e-12)
    assert t_cdf(0.3, 100) == pytest.approx(0.6176000598498482, rel=1e-12)


@pytest.mark.parametrize("t", [-30.0, -2.0, -0.5, 0.0, 0.1, 1.0, 3.0, 50.0])
def test_t_cdf_closed_forms(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    assert t_cdf(t, 7) + t_sf(t, 7) == pytest.approx(1.0, abs=1e-14)
    assert t_cdf(-t, 7) == pytest.approx(t_sf(t, 7), abs=1e-14)


def test_t_limits_and_errors():
    assert t_cdf(math.inf, 3) == 1.0 and t_cdf(-math.inf, 3) == 0.0
    assert t_cdf(1.0, math.inf) == pytest.approx(0.8413447460685429, abs=1e-14)
    with pytest.raises(ValueError):
        t_cdf(1.0, 0)
    with pytest.raises(ValueError):
        t_ppf(1.0, 5)


def test_betainc_known_values():
    assert betainc(0.5, 0.5, 0.3) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)), abs=1e-13)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-13)  # 1 - sum of binomial terms
    assert betainc(1, 1, 0.37) == pytest.approx(0.37, abs=1e-14)
    assert betainc(50, 60, 0.45) == pytest.approx(0.4642352914306031, rel=1e-10)
    assert betainc(3, 4, 0.0) == 0.0 and betainc(3, 4, 1.0) == 1.0


def test_mean_std():
    m, s = mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert m == 5.0 and s == pytest.approx(math.sqrt(32 / 7))
    m, s = mean_std([1.5])
    assert m == 1.5 and math.isnan(s)
    with pytest.raises(ValueError):
        mean_std([])


# Welch's t-test, Wikipedia "Welch's t-test", example 1: t = -2.46, df = 25.0, p = 0.021 (two-sided)
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_welch_textbook_example():
    t, df = welch_t(A1, A2)
    assert t == pytest.approx(-2.455356398286006, rel=1e-12)
    assert df == pytest.approx(24.98852929023142, rel=1e-12)
    assert 2 * t_cdf(t, df) == pytest.approx(0.021378001462866992, rel=1e-9)
    assert round(t, 2) == -2.46 and round(df, 1) == 25.0


def test_challenge_test_two_samples():
    cand, ref = [1.100, 1.102, 1.099], [1.112, 1.1135, 1.111]
    r = challenge_test(cand, ref)
    # scipy.stats.ttest_ind(ref, cand + 0.005, equal_var=False, alternative="greater")
    assert r.t == pytest.approx(5.980464651413748, rel=1e-9)
    assert r.df == pytest.approx(3.8585152838427113, rel=1e-9)
    assert r.p_value == pytest.approx(0.002202014747320866, rel=1e-8)
    assert r.passed and "PASSES" in r.statement and "p = 0.0022" in r.statement
    assert r.improvement == pytest.approx(0.0118333333, abs=1e-9)


def test_challenge_test_single_reference_number_is_one_sample():
    cand = [1.100, 1.102, 1.099]
    r = challenge_test(cand, 1.1124)
    # scipy.stats.ttest_1samp(cand + 0.005, 1.1124, alternative="less")
    assert r.t == pytest.approx(8.01284682779548, rel=1e-9)
    assert r.df == 2.0
    assert r.p_value == pytest.approx(0.007610132308119859, rel=1e-8)
    assert r.passed and r.reference_n == 1


def test_challenge_test_fails_small_or_noisy_improvements():
    # better, but by less than the bar: never passes whatever the noise
    r = challenge_test([1.108, 1.109, 1.1085], [1.111, 1.112, 1.1115])
    assert r.improvement > 0 and r.improvement < 0.005 and not r.passed and r.p_value > 0.5
    # above the bar on average but too noisy for p < 0.01
    r = challenge_test([1.09, 1.11, 1.10], [1.112, 1.1135, 1.111])
    assert r.improvement > 0.005 and not r.passed and "does NOT pass" in r.statement
    # a single seed cannot be tested
    r = challenge_test([1.0], [1.1, 1.2])
    assert not r.passed and math.isnan(r.p_value) and "at least 2 seeds" in r.statement


def test_bpb_to_nats():
    # 1 bit per byte at 2 bytes per token = 2 bits per token = 2 ln 2 nats per token
    assert bpb_to_nats(1.0, tokens=100, nbytes=200) == pytest.approx(2 * math.log(2))


def test_challenge_bars_name_both_rules():
    from lmcore.stats import challenge_bars

    cand, ref = [2.500, 2.510, 2.505], [2.520, 2.525, 2.518]
    bars = challenge_bars(cand, ref)
    assert set(bars) == {"readme", "practice"}
    # improvement 0.016 nats: clears the practice bar (p ~ 0.007 < 0.25) but not the
    # README's 0.005-nat margin at p < 0.01 (p ~ 0.021)
    assert bars["practice"].passed and bars["practice"].min_improvement == 0.0 and bars["practice"].alpha == 0.25
    assert not bars["readme"].passed and bars["readme"].min_improvement == 0.005 and bars["readme"].alpha == 0.01
    assert 0.01 < bars["readme"].p_value < 0.05 and bars["practice"].p_value < bars["readme"].p_value
    assert bars["readme"].statement.startswith("README bar") and "#1902" in bars["practice"].statement
