"""Statistics over seeds agree with scipy.stats (Holm with its definition: scipy has no Holm)."""

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from pipeline.stats import (
    BOOTSTRAP_SEED,
    bootstrap_difference,
    diverged_epochs,
    holm,
    mean_interval,
    ranking,
    summarize,
    superiority,
    welch_difference,
)

BATCHNORM = [0.9703, 0.9712, 0.9690, 0.9715, 0.9695]
NO_NORM = [0.9530, 0.9600, 0.9450, 0.9580, 0.9510]


def test_summarize_gives_mean_and_sample_std():
    summary = summarize({"test_acc": BATCHNORM, "one": [0.5]})
    assert summary["test_acc"] == pytest.approx(statistics.fmean(BATCHNORM), rel=1e-15)
    assert summary["test_acc_std"] == pytest.approx(stats.tstd(BATCHNORM), rel=1e-12)
    assert summary["one_std"] == 0.0


def test_mean_interval_is_students_t_interval():
    interval = mean_interval(BATCHNORM)
    low, high = stats.t.interval(0.95, len(BATCHNORM) - 1, loc=sum(BATCHNORM) / 5, scale=stats.sem(BATCHNORM))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)


def test_welch_difference_matches_scipy_ttest():
    diff = welch_difference(BATCHNORM, NO_NORM)
    assert diff.p_value == pytest.approx(stats.ttest_ind(BATCHNORM, NO_NORM, equal_var=False).pvalue, rel=1e-9)
    assert diff.delta.low < diff.delta.mean < diff.delta.high and diff.p_value < 0.05


def test_non_finite_values_are_left_out_and_none_left_is_nan():
    summary = summarize({"loss": [0.2, float("nan"), 0.4], "gone": [float("inf"), float("nan")]})
    assert summary["loss"] == pytest.approx(0.3) and summary["loss_std"] == pytest.approx(stats.tstd([0.2, 0.4]))
    assert math.isnan(summary["gone"]) and math.isnan(summary["gone_std"])
    diff = welch_difference([0.9, float("nan"), 0.92, 0.91], NO_NORM)
    assert diff.p_value == pytest.approx(stats.ttest_ind([0.9, 0.92, 0.91], NO_NORM, equal_var=False).pvalue)


def test_a_seed_diverges_at_its_first_non_finite_loss():
    nan = float("nan")
    assert diverged_epochs([[0.5, 0.4, 0.3], [0.2, nan, 0.1], [nan, nan, 0.05]]) == [3, 2, None]
    assert diverged_epochs([]) == []


LAYER_NORM = [0.9650, 0.9580, 0.9610, 0.9660, 0.9640]


def test_holm_matches_a_hand_computed_family():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-15)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02]  # a family of one is the raw p-value
    adjusted = holm([0.01, math.nan, 0.03])  # an untestable comparison is outside the family
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.03)
    assert holm([]) == []


def test_holm_of_welch_p_values_is_bonferroni_step_down():
    """Against the definition: reject the k-th smallest while p_(k) <= alpha / (m - k + 1)."""
    groups = [BATCHNORM, LAYER_NORM, [0.9540, 0.9610, 0.9440, 0.9570, 0.9520]]
    raw = [stats.ttest_ind(group, NO_NORM, equal_var=False).pvalue for group in groups]
    adjusted = holm(raw)
    for alpha in (0.001, 0.01, 0.05, 0.5):
        rejected, stepping = set(), True
        for k, index in enumerate(sorted(range(len(raw)), key=raw.__getitem__)):
            stepping = stepping and raw[index] <= alpha / (len(raw) - k)
            if stepping:
                rejected.add(index)
        assert {i for i, p in enumerate(adjusted) if p <= alpha} == rejected, alpha
    assert all(a >= r for a, r in zip(adjusted, raw))


def test_bootstrap_interval_is_scipys_percentile_bootstrap_with_the_same_seed():
    interval = bootstrap_difference(BATCHNORM, NO_NORM, seed=7, resamples=2_000)
    reference = stats.bootstrap((BATCHNORM, NO_NORM), lambda a, b, axis: a.mean(axis) - b.mean(axis),
                                vectorized=True, n_resamples=2_000, method="percentile",
                                rng=np.random.default_rng(7)).confidence_interval
    assert interval.mean == pytest.approx(np.mean(BATCHNORM) - np.mean(NO_NORM), rel=1e-12)
    # The same resamples; only the quantile's interpolation may round the last bit differently.
    assert (interval.low, interval.high) == pytest.approx((reference.low, reference.high), rel=1e-13, abs=0)
    assert interval.low < interval.mean < interval.high


def test_bootstrap_is_deterministic_and_skips_non_finite_values():
    first = bootstrap_difference(LAYER_NORM, NO_NORM)
    assert first == bootstrap_difference(LAYER_NORM, NO_NORM)  # default seed: same inputs, same interval
    assert bootstrap_difference(LAYER_NORM, NO_NORM, seed=BOOTSTRAP_SEED + 1) != first
    assert bootstrap_difference([*LAYER_NORM, math.nan], NO_NORM) == first
    one = bootstrap_difference([0.9], NO_NORM)
    assert one.mean == pytest.approx(0.9 - np.mean(NO_NORM)) and math.isnan(one.low) and math.isnan(one.high)
    assert math.isnan(bootstrap_difference([math.nan], NO_NORM).mean)


def test_bootstrap_interval_covers_the_true_difference_about_as_often_as_it_claims():
    """Percentile intervals from 5 seeds are too narrow (~85% here), from 30 close to 95%."""
    rng = np.random.default_rng(0)
    for seeds, at_least in ((5, 0.75), (30, 0.90)):
        covered = 0
        for trial in range(200):
            a, b = rng.normal(0.97, 0.002, seeds), rng.normal(0.95, 0.005, seeds)
            interval = bootstrap_difference(list(a), list(b), seed=trial, resamples=1_000)
            covered += interval.low <= 0.02 <= interval.high
        assert at_least <= covered / 200 <= 0.99, (seeds, covered)


def test_superiority_is_mann_whitney_u_over_the_pairs():
    for a, b in ((BATCHNORM, NO_NORM), (LAYER_NORM, NO_NORM), (NO_NORM, LAYER_NORM),
                 ([0.95, 0.96, 0.96, 0.97], [0.96, 0.96, 0.94])):  # ties count half
        u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
        assert superiority(a, b) == pytest.approx(u / (len(a) * len(b)), rel=1e-15)
    assert superiority(BATCHNORM, NO_NORM) == 1.0 and superiority(NO_NORM, BATCHNORM) == 0.0
    assert superiority([0.9, math.nan], [0.8]) == 1.0 and math.isnan(superiority([math.nan], [0.8]))


def test_welch_interval_matches_scipy():
    diff = welch_difference(LAYER_NORM, NO_NORM)
    ci = stats.ttest_ind(LAYER_NORM, NO_NORM, equal_var=False).confidence_interval(0.95)
    assert (diff.delta.low, diff.delta.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_ranking_is_by_score_then_name_with_nan_last():
    scores = {"b": 0.95, "a": 0.95, "gone": math.nan, "c": 0.97, "aa": math.nan, "d": 0.5}
    assert ranking(scores) == ["c", "a", "b", "d", "aa", "gone"]
    assert ranking(dict(reversed(scores.items()))) == ranking(scores)  # params order does not matter
