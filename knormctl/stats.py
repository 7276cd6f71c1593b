"""Latency statistics as a value object (optimum-benchmark style). Torch-free.

Percentiles use linear interpolation between closest ranks (numpy's default), computed
in pure Python so an empty or one-element list never produces NaN or a warning.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


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
