"""Statistics over seeds: mean and spread, confidence intervals, Welch's test, divergence.

Every stage that summarises seeds calls these, so a number means the same everywhere.
A seed that diverged has non-finite losses: they are left out of means and spreads (and the
seed is counted as diverged); its accuracies are finite (about one class in ten) and count.
scipy.special gives the two t-distribution formulas; scipy.stats would add ~0.5 s of imports.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def finite(values: list[float]) -> list[float]:
    return [value for value in values if math.isfinite(value)]


def diverged(losses: list[float]) -> int:
    """How many seeds' losses are not finite: the seeds that diverged."""
    return len(losses) - len(finite(losses))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean of the finite values and their sample std (0 for a single value); NaN for none."""
    kept = finite(values)
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def summarize(metrics: dict[str, list[float]]) -> dict[str, float]:
    """`name` and `name_std` over seeds (`mean_std`) for each metric."""
    summary = {}
    for name, values in metrics.items():
        summary[name], summary[f"{name}_std"] = mean_std(values)
    return summary


def diverged_epochs(losses: list[list[float]]) -> list[int | None]:
    """Per seed, the first epoch (1-based) whose loss is not finite, from [epoch][seed] losses;
    None for a seed that never diverged."""
    seeds = len(losses[0]) if losses else 0
    return [next((epoch for epoch, values in enumerate(losses, start=1) if not math.isfinite(values[seed])), None)
            for seed in range(seeds)]


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
    """Student-t confidence interval of the mean of the finite values (a point when there is one)."""
    values = finite(values)
    if not values:
        return Interval(math.nan, math.nan, math.nan)
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
    """mean(values) - mean(reference), Welch's CI and two-sided Welch t-test (finite values)."""
    from scipy import special

    a, b = np.asarray(finite(values)), np.asarray(finite(reference))
    if len(a) == 0 or len(b) == 0:
        return Difference(Interval(math.nan, math.nan, math.nan), math.nan)
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
