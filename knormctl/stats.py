"""Statistics used by the engine and the report. Torch-free.

- ``Latency``: latency statistics as a value object (optimum-benchmark style).
- ``token_match``: the one definition of "how much of the output equals the full cache's".
- Intervals: a percentile bootstrap over prompts (medians: the exact bootstrap
  distribution; means and stratified means: seeded resamples) and the Wilson score
  interval for binary accuracies.
- ``samples_needed``: how many prompts would tell a given change, from an observed interval.

Percentiles use linear interpolation between closest ranks (numpy's default), computed
in pure Python so an empty or one-element list never produces NaN or a warning. Resampled
bootstraps use numpy (imported on first use: it vectorises 2000 resamples at once); the
exact median distribution is pure Python, so a report of medians never loads numpy.
"""

from __future__ import annotations

import functools
import math
import statistics
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
Z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # 1.96: two-sided 95%
POWER = 0.80
Z_POWER = statistics.NormalDist().inv_cdf(POWER)  # 0.84: 80% power
# Percentile bootstrap: 2000 resamples put the 2.5% and 97.5% points within about
# +-0.5 percentile of their limit (Efron & Tibshirani: >= 1000 for percentile intervals).
RESAMPLES = 2000

Interval = tuple[float, float]


def percentile(values: Sequence[float], q: float) -> float | None:
    """q in [0, 100]; None for an empty sequence."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def median(values: Sequence[float | None]) -> float | None:
    """Median of the non-None values; None when there are none."""
    xs = [v for v in values if v is not None]
    return float(statistics.median(xs)) if xs else None


@dataclass(frozen=True)
class Latency:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    stdev: float | None
    total: float

    @classmethod
    def from_values(cls, values: Sequence[float]) -> Latency:
        xs = [float(v) for v in values]
        return cls(
            count=len(xs),
            mean=statistics.fmean(xs) if xs else None,
            p50=percentile(xs, 50),
            p90=percentile(xs, 90),
            p99=percentile(xs, 99),
            stdev=statistics.stdev(xs) if len(xs) > 1 else None,
            total=math.fsum(xs),
        )


# ----------------------------------------------------------------------------- token match

def token_match(ids: Sequence[int] | None, reference: Sequence[int] | None) -> float | None:
    """Fraction of positions where the output equals the full-cache output of the same prompt.

    Divided by the LONGER of the two: a token one output has and the other lacks is a
    mismatch (an output that stops early does not score 100%). None when either output is
    unknown or both are empty (nothing was generated, so there is nothing to compare).
    Used by the runner when it stores the value and by the report when it fills one in.
    """
    if ids is None or reference is None:
        return None
    n = max(len(ids), len(reference))
    if n == 0:
        return None
    return sum(a == b for a, b in zip(ids, reference)) / n


# ----------------------------------------------------------------------------- intervals

def seed_for(*parts: object) -> int:
    """A stable seed from names (crc32: the same on every machine and Python run, unlike hash())."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def aggregate(values: Sequence[float], how: str) -> float:
    """The statistic a metric aggregates with: "median", "median_low" (an observed value:
    counts stay counts) or "mean"."""
    if how == "mean":
        return statistics.fmean(values)
    if how == "median_low":
        return float(statistics.median_low(values))
    return float(statistics.median(values))


def _resampled(x, seed: int, resamples: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return x[rng.integers(0, len(x), size=(resamples, len(x)))]


def _statistic(samples, how: str):
    import numpy as np

    if how == "mean":
        return samples.mean(axis=1)
    if how == "median_low":
        return np.sort(samples, axis=1)[:, (samples.shape[1] - 1) // 2]
    return np.median(samples, axis=1)


def _percentile_interval(stats, confidence: float) -> Interval:
    import numpy as np

    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


# Up to this many values the bootstrap distribution of a median is computed exactly (O(n^2)
# pairs of order statistics in pure Python, ~1 ms at 40: no resampling noise, no numpy
# import); beyond, resampling is cheaper.
EXACT_MEDIAN_MAX_N = 40


@functools.lru_cache(maxsize=64)
def _binomial_tails(n: int) -> tuple[list[list[float]], list[list[float]]]:
    """(Cached per n: every metric of every configuration has the same prompt count.)
    pmf[i][k] = P(S_i = k) and tail[i][k] = P(S_i >= k) for S_i ~ Binomial(n, i/n): how many
    of n draws (with replacement) land among the i smallest values."""
    pmf, tail = [], []
    for i in range(n + 1):
        p = i / n
        if p in (0.0, 1.0):
            row = [0.0] * (n + 1)
            row[0 if p == 0.0 else n] = 1.0
        else:
            lp, lq = math.log(p), math.log1p(-p)
            row = [math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp + (n - k) * lq)
                   for k in range(n + 1)]
        acc, t = 0.0, [0.0] * (n + 2)
        for k in range(n, -1, -1):
            acc += row[k]
            t[k] = acc
        pmf.append(row)
        tail.append(t)
    return pmf, tail


def median_bootstrap_distribution(values: Sequence[float], how: str = "median") -> list[tuple[float, float]]:
    """The exact bootstrap distribution of the median (or lower median) of ``values``: every
    possible resampled median with its probability (the limit of infinitely many resamples).

    With x sorted and S_i the number of draws among the i smallest, the k-th smallest draw is
    at most x_i exactly when S_i >= k. A lower median (or the median of an odd count) is one
    order statistic; the median of an even count n = 2m averages the m-th and (m+1)-th, whose
    joint law follows from P(S_i >= m, S_j >= m + 1) = P(S_i >= m + 1) + P(S_i = m) * (1 - (1 -
    (j - i) / (n - i)) ** (n - m)) for i < j (given S_i = m, each of the other n - m draws lands
    in (x_i, x_j] with probability (j - i) / (n - i))."""
    x = sorted(float(v) for v in values)
    n = len(x)
    pmf, tail = _binomial_tails(n)
    if how == "median_low" or n % 2 == 1:
        k = (n + 1) // 2  # the lower median is the ceil(n/2)-th smallest
        return [(x[i - 1], tail[i][k] - tail[i - 1][k]) for i in range(1, n + 1)]
    m = n // 2
    # joint[i][j] = P(m-th smallest <= x_i and (m+1)-th smallest <= x_j), i, j in 0..n
    joint = [[0.0] * (n + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, t_i, p_i = joint[i], tail[i][m + 1], pmf[i][m]
        for j in range(1, n + 1):
            row[j] = tail[j][m + 1] if i >= j else t_i + p_i * (1.0 - (1.0 - (j - i) / (n - i)) ** (n - m))
    out = []
    for i in range(1, n + 1):
        cur, prev = joint[i], joint[i - 1]
        for j in range(i, n + 1):
            mass = cur[j] - prev[j] - cur[j - 1] + prev[j - 1]
            if mass > 0.0:
                out.append(((x[i - 1] + x[j - 1]) / 2.0, mass))
    return out


def _quantiles(distribution: list[tuple[float, float]], probs: Sequence[float]) -> list[float]:
    """Generalised inverse CDF of a discrete distribution: the smallest value whose CDF reaches p."""
    ordered = sorted(distribution)
    total = math.fsum(w for _, w in ordered)
    out = []
    for p in probs:
        acc = 0.0
        for v, w in ordered:
            acc += w / total
            if acc >= p - 1e-12:
                out.append(v)
                break
        else:
            out.append(ordered[-1][0])
    return out


def constant_interval(value: float, n: int, bounds: Interval, confidence: float = CONFIDENCE) -> Interval:
    """The interval of a mean when all ``n`` values observed were ``value``, for values known to
    lie within ``bounds`` (scores in [0, 1], their differences in [-100, 100] pp). A bootstrap
    returns the point itself, [+0, +0] from 3 prompts, read as certainty. Here: at most a share h
    of the population differs from ``value`` (h = 1 - (tail)^(1/n), the Clopper-Pearson bound
    for 0 of n, 71% at 3 prompts, 3.6% at 100), and what differs lies anywhere within bounds."""
    h = 1.0 - ((1.0 - confidence) / 2.0) ** (1.0 / n)
    return value - h * (value - bounds[0]), value + h * (bounds[1] - value)


def bootstrap_interval(values: Sequence[float], how: str = "median", *, seed: int,
                       resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                       bounds: Interval | None = None) -> Interval | None:
    """Percentile bootstrap interval of ``aggregate(values, how)`` over the values (one per
    prompt): the (2.5%, 97.5%) points of the statistic over resamples drawn with replacement.

    Medians of up to EXACT_MEDIAN_MAX_N values use the exact bootstrap distribution (no
    resampling: the same values always give the same interval); means, and medians of more
    values, draw ``resamples`` resamples from a generator seeded with ``seed`` (reproducible, and
    independent of the values' order: they are sorted first).
    None for fewer than two values (one prompt says nothing about the spread). Values all alike:
    the point itself, or given the values' ``bounds`` their ``constant_interval``."""
    if len(values) < 2:
        return None
    lo_v, hi_v = min(values), max(values)
    if lo_v == hi_v:  # every resample is the same: no need to draw
        return constant_interval(float(lo_v), len(values), bounds, confidence) if bounds else (float(lo_v),) * 2
    tail = (1 - confidence) / 2
    if how != "mean" and len(values) <= EXACT_MEDIAN_MAX_N:
        lo, hi = _quantiles(median_bootstrap_distribution(values, how), (tail, 1 - tail))
        return lo, hi
    import numpy as np

    x = np.sort(np.asarray(values, dtype=float))  # sorted: the same values in any order, the same interval
    return _percentile_interval(_statistic(_resampled(x, seed, resamples), how), confidence)


def stratified_mean_interval(groups: Sequence[Sequence[float]], *, seed: int, resamples: int = RESAMPLES,
                             confidence: float = CONFIDENCE, bounds: Interval | None = None,
                             weights: Sequence[float] | None = None) -> Interval | None:
    """Bootstrap interval of the (weighted) mean of group means (e.g. accuracy averaged over
    RULER subtasks): each group is resampled within itself, so every resample keeps the
    groups' sizes and weights (``weights``: one per group, summing to 1; None: equal). None
    when any group has fewer than two values. Every group's values all alike, given
    ``bounds``: the weighted mean of the groups' ``constant_interval``."""
    if not groups or any(len(g) < 2 for g in groups):
        return None
    w = [1.0 / len(groups)] * len(groups) if weights is None else [float(x) for x in weights]
    if bounds and all(min(g) == max(g) for g in groups):
        each = [constant_interval(float(g[0]), len(g), bounds, confidence) for g in groups]
        return math.fsum(wk * lo for wk, (lo, _) in zip(w, each)), math.fsum(wk * hi for wk, (_, hi) in zip(w, each))
    import numpy as np

    total = np.zeros(resamples)
    for k, (g, wk) in enumerate(zip(groups, w)):
        total += wk * _resampled(np.sort(np.asarray(g, dtype=float)), seed + k, resamples).mean(axis=1)
    return _percentile_interval(total, confidence)


def weighted_mean_interval(values: Sequence[float], weights: Sequence[float], *, seed: int,
                           resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                           bounds: Interval | None = None) -> Interval | None:
    """Bootstrap interval of a weighted mean, the (value, weight) pairs resampled together: what
    a stratified interval falls back to when a stratum holds one value (it cannot be resampled
    within itself). The statistic of each resample is sum(w x) / sum(w). None for fewer than
    two values; values all alike, given ``bounds``: their ``constant_interval``."""
    if len(values) < 2:
        return None
    if bounds and min(values) == max(values):
        return constant_interval(float(values[0]), len(values), bounds, confidence)
    import numpy as np

    order = np.argsort(np.asarray(values, dtype=float), kind="stable")  # the same pairs in any order
    x, w = np.asarray(values, dtype=float)[order], np.asarray(weights, dtype=float)[order]
    pick = _resampled(np.arange(len(x)), seed, resamples)  # resampled indices: each value keeps its weight
    return _percentile_interval((x[pick] * w[pick]).sum(axis=1) / w[pick].sum(axis=1), confidence)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> Interval | None:
    """Wilson score interval of a binomial proportion (never outside [0, 1], sensible at 0/n
    and n/n, where the textbook p +- z*se collapses to a point)."""
    if n <= 0:
        return None
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def samples_needed(n: int, interval: Interval | None, effect: float) -> int | None:
    """Prompts needed to detect a change of ``effect`` (same unit as the interval) with a
    two-sided 95% test and 80% power, or None when ``n`` already suffices (or nothing can be said).

    Normal approximation: the standard error implied by the observed interval is
    (high - low) / (2 * 1.96) and shrinks as 1/sqrt(n); the test needs
    effect >= (1.96 + 0.84) * SE, so n' = n * ((1.96 + 0.84) * SE / effect)^2.
    """
    if interval is None or n < 2 or effect <= 0:
        return None
    se = (interval[1] - interval[0]) / (2 * Z)
    needed = math.ceil(n * ((Z + Z_POWER) * se / effect) ** 2)
    return needed if needed > n else None
