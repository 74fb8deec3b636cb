"""Statistics over seeds: mean and spread, confidence intervals, Welch's test, divergence, and
what survives comparing many variants with one reference: Holm-adjusted p-values, a seeded
bootstrap interval, the probability that one variant's seed beats the other's, a ranking.

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
# The percentile bootstrap draws from numpy's PCG64 seeded with this constant: the same values
# give the same interval, to the byte, on every run (and the summary says which seed it was).
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 10_000


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


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in the order given.

    The k-th smallest of m p-values becomes max over j <= k of min(1, (m - j + 1) p_(j)); a NaN
    (an untestable comparison) stays NaN and is not counted in the family.
    """
    adjusted = [math.nan] * len(p_values)
    tested = sorted((p, index) for index, p in enumerate(p_values) if not math.isnan(p))
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running
    return adjusted


def bootstrap_difference(values: list[float], reference: list[float], seed: int = BOOTSTRAP_SEED,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """mean(values) - mean(reference) with its percentile-bootstrap CONFIDENCE interval (finite values).

    Each group is resampled with replacement on its own, `values` first, as
    scipy.stats.bootstrap(method="percentile", rng=np.random.default_rng(seed)) resamples; the
    interval's ends are the linear-interpolation quantiles of the resampled differences. NaN ends
    when a group has fewer than two values.
    """
    a, b = np.asarray(finite(values)), np.asarray(finite(reference))
    if len(a) == 0 or len(b) == 0:
        return Interval(math.nan, math.nan, math.nan)
    delta = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Interval(delta, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    resampled_a = a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=-1)
    resampled_b = b[rng.integers(0, len(b), (resamples, len(b)))].mean(axis=-1)
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(resampled_a - resampled_b, [alpha, 1 - alpha])
    return Interval(delta, float(low), float(high))


def superiority(values: list[float], reference: list[float]) -> float:
    """P(X > Y) + P(X = Y) / 2 for X a random finite value of `values` and Y one of `reference`:
    the common-language effect size, Mann-Whitney's U / (n m). NaN when a group is empty."""
    a, b = np.asarray(finite(values)), np.asarray(finite(reference))
    if len(a) == 0 or len(b) == 0:
        return math.nan
    wins = np.count_nonzero(a[:, None] > b[None, :]) + 0.5 * np.count_nonzero(a[:, None] == b[None, :])
    return float(wins / (len(a) * len(b)))


def ranking(scores: dict[str, float]) -> list[str]:
    """The names from the highest score to the lowest; equal scores by name, NaN scores last."""
    def key(name: str) -> tuple[bool, float, str]:
        score = scores[name]
        return (True, 0.0, name) if math.isnan(score) else (False, -score, name)

    return sorted(scores, key=key)
