"""Statistics over seeds agree with scipy.stats."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy import stats

from pipeline.stats import diverged_epochs, mean_interval, summarize, welch_difference

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
    assert diff.delta.low < diff.delta.mean < diff.delta.high and diff.significant



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
