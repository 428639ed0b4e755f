"""lmcore.stats against known values: a textbook Welch example, p-values of the challenge's
one-sided tests computed once with scipy.stats, the cases without spread, and both bars."""

from __future__ import annotations

import math

import pytest

from lmcore.stats import bpb_to_nats, challenge_test, mean_std


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
    # A1 beats A2 (lower is better) with no margin: t = 2.46, df = 25.0, one-sided p = 0.021 / 2
    r = challenge_test(A1, A2, min_improvement=0.0, alpha=0.05)
    assert r.t == pytest.approx(2.455356398286006, rel=1e-12)
    assert r.df == pytest.approx(24.98852929023142, rel=1e-12)
    assert 2 * r.p_value == pytest.approx(0.021378001462866992, rel=1e-9)
    assert round(r.t, 2) == 2.46 and round(r.df, 1) == 25.0 and r.passed
    # the other direction: the same t with its sign flipped, p the complement
    r = challenge_test(A2, A1, min_improvement=0.0)
    assert r.t == pytest.approx(-2.455356398286006, rel=1e-12)
    assert r.p_value == pytest.approx(1 - 0.021378001462866992 / 2, rel=1e-9) and not r.passed


def test_p_values_match_the_t_distribution_tables():
    # one sample against an exact reference: t is the table's quantile, so p is the tail it names
    # (t_{0.99, 2} = 6.965, t_{0.975, 4} = 2.776, t_{0.95, 9} = 1.833)
    for n, t_table, tail in ((3, 6.965, 0.01), (5, 2.776, 0.025), (10, 1.833, 0.05)):
        cand = [float(i) for i in range(n)]  # mean (n - 1) / 2, std sqrt(n (n + 1) / 12)
        m, s = mean_std(cand)
        ref = m + t_table * s / math.sqrt(n)  # improvement over the margin 0 is t_table standard errors
        r = challenge_test(cand, ref, min_improvement=0.0)
        assert r.t == pytest.approx(t_table, rel=1e-12) and r.df == n - 1
        assert r.p_value == pytest.approx(tail, abs=2e-4)


def test_samples_without_spread_are_decided_directly():
    r = challenge_test([1.0, 1.0], [1.1, 1.1])
    assert math.isinf(r.t) and r.t > 0 and r.p_value == 0.0 and r.passed and math.isnan(r.df)
    r = challenge_test([1.0, 1.0], 0.9)
    assert math.isinf(r.t) and r.t < 0 and r.p_value == 1.0 and not r.passed and r.df == 1.0
    r = challenge_test([1.0, 1.0], 1.005)  # the improvement is the margin exactly
    assert math.isnan(r.t) and r.p_value == 0.5 and not r.passed


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
