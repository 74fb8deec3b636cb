"""Statistics over seeds, one definition for every stage. A diverged seed's non-finite losses are left
out of means and spreads (the seed counted as diverged); its accuracies are finite (about one class in
ten) and count. scipy.special gives the two t-distribution formulas; scipy.stats would add ~0.5 s of imports."""

import math
import statistics
from typing import NamedTuple

import numpy as np

CONFIDENCE = 0.95
# The bootstrap's numpy seed: the same values give the same interval, to the byte, on every run.
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 10_000


def finite(values: list[float]) -> list[float]:
    return [value for value in values if math.isfinite(value)]


def diverged(losses: list[float]) -> int:
    return len(losses) - len(finite(losses))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean of the finite values and their sample std (0 for a single value); NaN for none."""
    kept = finite(values)
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def summarize(metrics: dict[str, list[float]]) -> dict[str, float]:
    """`name` and `name_std` over seeds (`mean_std`) for each metric."""
    return {key: value for name, values in metrics.items()
            for key, value in zip((name, f"{name}_std"), mean_std(values))}


def diverged_epochs(losses: list[list[float]]) -> list[int | None]:
    """Per seed, the first epoch (1-based) whose loss in [epoch][seed] is not finite; None if none."""
    return [next((epoch for epoch, loss in enumerate(seed_losses, start=1) if not math.isfinite(loss)), None)
            for seed_losses in zip(*losses)]


class Interval(NamedTuple):
    mean: float
    low: float
    high: float


def t_quantile(dof: float) -> float:
    """The two-sided CONFIDENCE quantile of Student's t (scipy.stats.t.ppf)."""
    from scipy import special

    return float(special.stdtrit(dof, (1 + CONFIDENCE) / 2))


def mean_interval(values: list[float]) -> Interval:
    """Student-t interval of the mean of the finite values (NaN ends below two values)."""
    kept = np.asarray(finite(values))
    mean = float(kept.mean()) if len(kept) else math.nan
    if len(kept) < 2:
        return Interval(mean, math.nan, math.nan)
    half = t_quantile(len(kept) - 1) * (float(kept.std(ddof=1)) / math.sqrt(len(kept)))
    return Interval(mean, mean - half, mean + half)


class Difference(NamedTuple):
    delta: Interval
    p_value: float


def finite_groups(values: list[float], reference: list[float]) -> tuple[np.ndarray, np.ndarray, float]:
    """Each group's finite values and mean(values) - mean(reference), NaN when a group is empty."""
    a, b = np.asarray(finite(values)), np.asarray(finite(reference))
    return a, b, float(a.mean() - b.mean()) if len(a) and len(b) else math.nan


def welch_difference(values: list[float], reference: list[float]) -> Difference:
    """mean(values) - mean(reference), Welch's CI and two-sided Welch t-test (finite values)."""
    from scipy import special

    a, b, delta = finite_groups(values, reference)
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
    """Holm's step-down adjustment, in the order given: the k-th smallest of m p-values becomes
    max over j <= k of min(1, (m - j + 1) p_(j)); a NaN (untestable) stays NaN, outside the family."""
    adjusted = [math.nan] * len(p_values)
    tested = sorted((p, index) for index, p in enumerate(p_values) if not math.isnan(p))
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running
    return adjusted


def bootstrap_difference(values: list[float], reference: list[float], seed: int = BOOTSTRAP_SEED,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """mean(values) - mean(reference) with its percentile-bootstrap CONFIDENCE interval (finite
    values; NaN ends below two values in a group), resampled as scipy.stats.bootstrap(
    method="percentile", rng=np.random.default_rng(seed)) does: each group on its own, `values` first."""
    a, b, delta = finite_groups(values, reference)
    if len(a) < 2 or len(b) < 2:
        return Interval(delta, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    resampled = [group[rng.integers(0, len(group), (resamples, len(group)))].mean(axis=-1) for group in (a, b)]
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(resampled[0] - resampled[1], [alpha, 1 - alpha])
    return Interval(delta, float(low), float(high))


def superiority(values: list[float], reference: list[float]) -> float:
    """P(X > Y) + P(X = Y) / 2 for X a random finite value of `values` and Y one of `reference`:
    the common-language effect size, Mann-Whitney's U / (n m). NaN when a group is empty."""
    a, b, _ = finite_groups(values, reference)
    if not len(a) or not len(b):
        return math.nan
    wins = np.count_nonzero(a[:, None] > b[None, :]) + 0.5 * np.count_nonzero(a[:, None] == b[None, :])
    return float(wins / (len(a) * len(b)))


def ranking(scores: dict[str, float]) -> list[str]:
    """The names from the highest score to the lowest; equal scores by name, NaN scores last."""
    return sorted(scores, key=lambda name: (math.isnan(scores[name]), -np.nan_to_num(scores[name]), name))
