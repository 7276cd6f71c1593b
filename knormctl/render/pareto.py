"""The Pareto view: which configurations are worth deploying at which cost.

A point is one configuration (press x setting) with a COST (KV memory held, or decode
TPOT: lower is better) and a QUALITY (ppl ratio to the full cache: lower is better; or
task accuracy: higher is better). A point is on the frontier when no other point is at
least as good on both and strictly better on one. ``best_at_budgets`` names, for each
budget, the best configuration that fits it -- the sentence a deployer reads.

Pure Python: the report and the figure read the same computed frontier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Point:
    key: str  # configuration identity (config_key, possibly with the model)
    label: str
    cost: float
    quality: float
    group: str = ""  # e.g. the press (one colour per press)
    meta: Any = None


def _better_or_equal(a: Point, b: Point, higher_quality: bool) -> bool:
    """a is at least as good as b on both axes."""
    q = a.quality >= b.quality if higher_quality else a.quality <= b.quality
    return a.cost <= b.cost and q


def dominates(a: Point, b: Point, higher_quality: bool) -> bool:
    """a dominates b: at least as good on both axes, strictly better on one."""
    strictly = (a.cost < b.cost or (a.quality > b.quality if higher_quality else a.quality < b.quality))
    return _better_or_equal(a, b, higher_quality) and strictly


def frontier(points: Sequence[Point], *, higher_quality: bool) -> list[Point]:
    """The non-dominated points, by increasing cost. Points tied on both axes are all on it
    (neither dominates the other): settings that measure the same are equally worth deploying,
    and marking only the first would say the others are worse."""
    front = [p for p in points if not any(dominates(q, p, higher_quality) for q in points)]
    return sorted(front, key=lambda p: (p.cost, -p.quality if higher_quality else p.quality))


@dataclass(frozen=True)
class BudgetChoice:
    budget: float  # the largest cost allowed
    best: Point | None  # the best-quality point with cost <= budget (None: nothing fits)


def best_at_budgets(points: Sequence[Point], budgets: Sequence[float], *, higher_quality: bool) -> list[BudgetChoice]:
    """For each budget, the point of best quality among those that cost at most that much
    (ties broken toward the cheaper point, then the earlier given)."""
    out = []
    for budget in budgets:
        fits = [p for p in points if p.cost <= budget]
        if not fits:
            out.append(BudgetChoice(budget, None))
            continue
        sign = -1.0 if higher_quality else 1.0
        best = min(fits, key=lambda p: (sign * p.quality, p.cost, points.index(p)))
        out.append(BudgetChoice(budget, best))
    return out
