"""The Pareto frontier and the best configuration per budget, on hand-made points."""

from __future__ import annotations

from knormctl.render.pareto import Point, best_at_budgets, dominates, frontier


def P(key, cost, quality, group=""):
    return Point(key=key, label=key, cost=cost, quality=quality, group=group)


# ppl ratio: lower is better; cost: KV fraction held
PPL = [P("full", 1.00, 1.00), P("knorm 0.5", 0.50, 1.19), P("snapkv 0.5", 0.50, 1.04),
       P("streaming 0.5", 0.50, 1.02), P("random 0.5", 0.50, 1.90), P("knorm 0.9", 0.90, 1.01),
       P("snapkv 0.25", 0.25, 1.20), P("random 0.25", 0.25, 2.50), P("knorm 0.7", 0.70, 1.30)]


def test_frontier_keeps_exactly_the_non_dominated_points_by_cost():
    front = frontier(PPL, higher_quality=False)
    assert [p.key for p in front] == ["snapkv 0.25", "streaming 0.5", "knorm 0.9", "full"]
    # every other point is dominated by one on the frontier
    for p in PPL:
        if p not in front:
            assert any(dominates(q, p, False) for q in front), p


def test_direction_of_quality_matters():
    acc = [P("a", 1.0, 0.9), P("b", 0.5, 0.8), P("c", 0.5, 0.6), P("d", 0.25, 0.95)]
    assert [p.key for p in frontier(acc, higher_quality=True)] == ["d"]
    assert [p.key for p in frontier(acc, higher_quality=False)] == ["d", "c"]


def test_ties_are_not_dominance_and_every_tied_point_is_on_the_frontier():
    """Settings that measure exactly the same (prune_after 32, 64, 128 on short prompts) were
    starred once, as if the others were worse."""
    pts = [P("x", 0.5, 1.0), P("y", 0.5, 1.0), P("z", 0.4, 1.1)]
    assert not dominates(pts[0], pts[1], False) and not dominates(pts[1], pts[0], False)
    assert [p.key for p in frontier(pts, higher_quality=False)] == ["z", "x", "y"]


def test_best_at_each_budget():
    choices = best_at_budgets(PPL, [0.2, 0.25, 0.5, 0.75, 1.0], higher_quality=False)
    assert [c.best.key if c.best else None for c in choices] == [
        None, "snapkv 0.25", "streaming 0.5", "streaming 0.5", "full"]


def test_best_at_budget_breaks_quality_ties_toward_the_cheaper_point():
    pts = [P("dear", 0.9, 1.0), P("cheap", 0.5, 1.0)]
    assert best_at_budgets(pts, [1.0], higher_quality=False)[0].best.key == "cheap"


def test_empty_input():
    assert frontier([], higher_quality=True) == []
    assert best_at_budgets([], [1.0], higher_quality=True)[0].best is None
