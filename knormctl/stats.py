"""Statistics used by the engine and the report. Torch-free.

- ``Latency``: latency statistics as a value object (optimum-benchmark style).
- ``token_match``: the one definition of "how much of the output equals the full cache's".
- Intervals: a seeded percentile bootstrap over prompts (medians, means, stratified means)
  and the Wilson score interval for binary accuracies.
- ``samples_needed``: how many prompts would tell a given change, from an observed interval.

Percentiles use linear interpolation between closest ranks (numpy's default), computed
in pure Python so an empty or one-element list never produces NaN or a warning. The
bootstrap uses numpy (imported on first use: it vectorises 2000 resamples at once).
"""

from __future__ import annotations

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


def bootstrap_interval(values: Sequence[float], how: str = "median", *, seed: int,
                       resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> Interval | None:
    """Percentile bootstrap interval of ``aggregate(values, how)``: resample the values (one
    per prompt) with replacement ``resamples`` times, take the statistic of each resample,
    and return its (2.5%, 97.5%) percentiles. Seeded: the same values give the same interval.

    None for fewer than two values (one prompt says nothing about the spread)."""
    if len(values) < 2:
        return None
    import numpy as np

    x = np.asarray(values, dtype=float)
    if float(x.min()) == float(x.max()):
        return float(x[0]), float(x[0])  # every resample is the same: no need to draw
    return _percentile_interval(_statistic(_resampled(x, seed, resamples), how), confidence)


def stratified_mean_interval(groups: Sequence[Sequence[float]], *, seed: int, resamples: int = RESAMPLES,
                             confidence: float = CONFIDENCE) -> Interval | None:
    """Bootstrap interval of the mean of group means (e.g. accuracy averaged over RULER
    subtasks): each group is resampled within itself, so every resample keeps the groups'
    sizes and weights. None when any group has fewer than two values."""
    if not groups or any(len(g) < 2 for g in groups):
        return None
    import numpy as np

    total = np.zeros(resamples)
    for k, g in enumerate(groups):
        total += _resampled(np.asarray(g, dtype=float), seed + k, resamples).mean(axis=1)
    return _percentile_interval(total / len(groups), confidence)


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
