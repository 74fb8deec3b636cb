"""Statistics over seeds: mean and spread, confidence intervals, Welch's test.

Every stage that summarises seeds calls these, so a number means the same everywhere.
scipy.special gives the two t-distribution formulas; scipy.stats would add ~0.5 s of imports.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def summarize(metrics: dict[str, list[float]]) -> dict[str, float]:
    """Mean over seeds of each metric, and its sample std (0 for a single seed)."""
    summary = {}
    for name, values in metrics.items():
        summary[name] = statistics.fmean(values)
        summary[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def t_quantile(dof: float) -> float:
    """The two-sided CONFIDENCE quantile of Student's t (scipy.stats.t.ppf)."""
    from scipy import special

    return float(special.stdtrit(dof, (1 + CONFIDENCE) / 2))


def mean_interval(values: list[float]) -> Interval:
    """Student-t confidence interval of the mean (a point when there is one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan)
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    half = t_quantile(len(values) - 1) * sem
    return Interval(mean, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    delta: Interval
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - CONFIDENCE


def welch_difference(values: list[float], reference: list[float]) -> Difference:
    """mean(values) - mean(reference), Welch's CI and two-sided Welch t-test."""
    from scipy import special

    a, b = np.asarray(values), np.asarray(reference)
    delta = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Difference(Interval(delta, math.nan, math.nan), math.nan)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(Interval(delta, delta, delta), 0.0 if delta else 1.0)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(dof) * se
    p_value = float(2 * special.stdtr(dof, -abs(delta) / se))  # scipy.stats.ttest_ind(equal_var=False)
    return Difference(Interval(delta, delta - half, delta + half), p_value)
