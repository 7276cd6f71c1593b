"""Question-task accuracy (passkey, ruler, niah, longbench): per configuration x subtask x
context length, with 95% intervals, the mean over a task's subtasks, the full cache's
accuracy beside every compressed one, and whether the full cache itself is near chance.

Accuracy is the mean ``score`` (0..1) over questions; a question's repeats are averaged
first. Intervals: Wilson when every score is 0 or 1 (exact-match tasks), else a seeded
bootstrap over questions (partial matches, F1, ROUGE). The mean over subtasks weighs
subtasks equally (RULER's convention) and its interval is a stratified bootstrap
(questions resampled within each subtask). Changes are paired by question: the mean of
per-question differences against the full cache, in percentage points.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from knormctl.render.metrics import DETECTABLE_EFFECT
from knormctl.render.paired import Interval, Stat, ok, prompt_key, spans_zero
from knormctl.render.rows import CHANGE_BOUNDS, REFERENCE_KEY, sort_key
from knormctl.stats import (bootstrap_interval, samples_needed, seed_for, stratified_mean_interval, weighted_mean_interval,
                            wilson_interval)
from knormctl.tasks.catalog import chance_of, near_chance


# What a right/wrong score and a paired change of two can be: where every question scored
# alike the bootstrap returns the point itself ([+0, +0] from 3 questions, read as certainty);
# these give it the exact binomial bound instead (stats.constant_interval). Partial scores keep
# the bootstrap's: 8 questions all 20 pp worse are as sure as 8 that are 19 to 21 pp worse.
SCORE_BOUNDS = (0.0, 1.0)


@dataclass
class TaskRow:
    """Accuracy of one configuration on one subtask (or the mean over subtasks) at one length."""

    task: str
    subtask: str | None  # None: the mean over the task's subtasks
    context_length: int | None  # the asked context length (None: not a grid axis, e.g. LongBench)
    config_key: str
    label: str
    press: str
    keep_ratio: float
    is_reference: bool
    score_metric: str | None
    n: int  # questions (prompts; repeats averaged)
    n_subtasks: int  # subtasks averaged (1 for a subtask row)
    correct: int | None  # questions answered right, when every score is 0 or 1
    accuracy: float | None
    interval: Interval | None
    interval_method: str | None  # wilson | bootstrap | stratified bootstrap
    reference_accuracy: float | None  # the full cache's, on the same subtask and length
    change_pp: float | None  # paired, vs the full cache, in percentage points
    change_interval: Interval | None
    verdict: str | None  # better | worse | noise | same | None
    n_needed: int | None  # questions that would tell a 5 pp change (only where this run cannot)
    near_chance: bool  # the full cache itself is near chance here: compression results mean nothing
    left_out: list[str] = field(default_factory=list)  # a mean row: subtasks not every configuration measured


@dataclass
class NeedleCell:
    """Accuracy at one needle depth x context length for one configuration (the heat-map)."""

    config_key: str
    label: str
    needle_depth: float
    context_length: int | None
    n: int
    accuracy: float | None
    interval: Interval | None
    subtasks: list[str]  # the subtasks pooled in this cell


def _scores(samples: Sequence[Any]) -> dict[tuple, float]:
    """One score per question: its repeats averaged."""
    raw: dict[tuple, list[float]] = defaultdict(list)
    for s in samples:
        raw[prompt_key(s)].append(float(s.score))
    return {k: statistics.fmean(v) for k, v in raw.items()}


def _binary(xs) -> bool:
    return all(x in (0.0, 1.0) for x in xs)


def accuracy_interval(xs: Sequence[float], seed: int) -> tuple[Interval | None, str | None]:
    if not xs:
        return None, None
    if _binary(xs):
        return wilson_interval(sum(xs), len(xs)), "wilson"
    return bootstrap_interval(xs, "mean", seed=seed), "bootstrap"


def _diffs(mine: dict[tuple, float], ref: dict[tuple, float]) -> list[float]:
    return [(v - ref[k]) * 100.0 for k, v in mine.items() if k in ref]


def _verdict(change: float | None, interval: Interval | None) -> str | None:
    if change is None or interval is None:
        return None
    if change == 0.0 and interval == (0.0, 0.0):
        return "same"
    if spans_zero(interval):
        return "noise"
    return "better" if change > 0 else "worse"


@dataclass
class Combined:
    """Accuracy over one or more (task, subtask, length) cells, each weighted, with its
    interval and its paired change against the full cache (the numbers of a TaskRow and of
    the configuration rows' accuracy: one computation)."""

    accuracy: float
    interval: Interval | None
    interval_method: str | None
    n: int
    change: float | None = None
    change_interval: Interval | None = None
    n_pairs: int = 0
    n_needed: int | None = None


def combined(key: str, cells: Sequence[tuple], weights: Sequence[float], scores: dict[tuple, dict[tuple, float]],
             seed: tuple) -> Combined:
    """One cell: Wilson (right/wrong) or a bootstrap over its questions, the change a bootstrap
    of per-question differences; several: the weighted mean of the cells' means, with a
    stratified bootstrap (questions resampled within each cell). Right/wrong scores that all
    agree get the binomial bound (SCORE_BOUNDS, CHANGE_BOUNDS) instead of a zero-width interval.
    ``seed``: names the interval's seed (with ``key``)."""
    mine = [list(scores[(*c, key)].values()) for c in cells]
    acc = math.fsum(w * statistics.fmean(xs) for w, xs in zip(weights, mine))
    binary = _binary(x for xs in mine for x in xs)
    if len(cells) == 1:
        interval, method = accuracy_interval(mine[0], seed_for(key, *seed, "accuracy"))
    else:
        interval = _weighted_interval(mine, weights, seed_for(key, *seed, "accuracy"), SCORE_BOUNDS if binary else None)
        method = ("stratified bootstrap" if min(map(len, mine)) > 1 else "weighted bootstrap") if interval else None
    out = Combined(accuracy=acc, interval=interval, interval_method=method, n=sum(map(len, mine)))
    refs = [scores.get((*c, REFERENCE_KEY)) for c in cells]
    if key == REFERENCE_KEY or not all(refs):
        return out
    diffs = [_diffs(scores[(*c, key)], ref) for c, ref in zip(cells, refs)]
    if not all(diffs):
        return out
    out.change = math.fsum(w * statistics.fmean(d) for w, d in zip(weights, diffs))
    out.n_pairs = sum(map(len, diffs))
    bounds = CHANGE_BOUNDS if binary and _binary(x for ref in refs for x in ref.values()) else None
    if len(cells) == 1:
        out.change_interval = bootstrap_interval(diffs[0], "mean", seed=seed_for(key, *seed, "change"), bounds=bounds)
    else:
        out.change_interval = _weighted_interval(diffs, weights, seed_for(key, *seed, "change"), bounds)
    if spans_zero(out.change_interval):
        out.n_needed = samples_needed(min(map(len, diffs)) * len(diffs), out.change_interval, DETECTABLE_EFFECT)
    return out


def _weighted_interval(groups: list[list[float]], weights: Sequence[float], seed: int,
                       bounds: Interval | None) -> Interval | None:
    """The stratified bootstrap of the weighted mean of group means; where a group holds one
    value (one question per subtask and length) it cannot be resampled within itself, and every
    question is resampled with its group's weight shared among the group's questions instead."""
    if min(map(len, groups)) > 1:
        return stratified_mean_interval(groups, seed=seed, bounds=bounds, weights=weights)
    return weighted_mean_interval([x for g in groups for x in g], [w / len(g) for g, w in zip(groups, weights) for _ in g],
                                  seed=seed, bounds=bounds)


def _scored(samples: Sequence[Any]) -> tuple[list[Any], dict[tuple, list[Any]], dict[tuple, dict[tuple, float]]]:
    """The scored samples, grouped by (task, subtask, length, configuration), and their scores."""
    scored = [s for s in ok(samples) if s.score is not None]
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for s in scored:
        groups[(s.task, s.subtask or s.task, s.context_length, s.config_key)].append(s)
    return scored, groups, {k: _scores(v) for k, v in groups.items()}


def task_tables(samples: Sequence[Any], labels: dict[str, str]) -> tuple[list[TaskRow], list[NeedleCell]]:
    """Every (task, subtask, length, configuration) row, the per-task mean rows, and the needle cells."""
    scored, groups, scores = _scored(samples)
    proto = {k[3]: v[0] for k, v in groups.items()}

    rows: list[TaskRow] = []
    for (task, sub, length, key), group in groups.items():
        c = combined(key, [(task, sub, length)], [1.0], scores, (task, sub, length))
        ref = scores.get((task, sub, length, REFERENCE_KEY))
        ref_acc = statistics.fmean(ref.values()) if ref else None
        ref_interval = accuracy_interval(list(ref.values()), seed_for(REFERENCE_KEY, task, sub, length, "accuracy"))[0] \
            if ref else None
        xs = list(scores[(task, sub, length, key)].values())
        rows.append(TaskRow(
            task=task, subtask=sub, context_length=length, config_key=key, label=labels.get(key, key),
            press=group[0].press, keep_ratio=group[0].keep_ratio, is_reference=key == REFERENCE_KEY,
            score_metric=group[0].score_metric, n=c.n, n_subtasks=1, correct=round(sum(xs)) if _binary(xs) else None,
            accuracy=c.accuracy, interval=c.interval, interval_method=c.interval_method, reference_accuracy=ref_acc,
            change_pp=c.change, change_interval=c.change_interval, verdict=_verdict(c.change, c.change_interval),
            n_needed=c.n_needed, near_chance=near_chance(
                ref_acc, chance_of(groups.get((task, sub, length, REFERENCE_KEY), [])), ref_interval)))
    rows += _means(rows, scores)
    rows.sort(key=lambda r: (r.task, r.subtask is not None, r.subtask or "", r.context_length or 0,
                             sort_key(proto[r.config_key])))
    return rows, _needles(scored, labels)


def _measured(keys: Iterable[tuple]) -> dict[tuple, dict[str, set[str]]]:
    """(task, length) -> configuration -> the subtasks it has scores in, from (task, subtask,
    length, configuration) keys."""
    have: dict[tuple, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for task, sub, length, key in keys:
        have[(task, length)][key].add(sub)
    return have


def common_cells(keys: Iterable[tuple]) -> dict[tuple, set[str]]:
    """Per (task, length), from (task, subtask, length, configuration) keys: the subtasks every
    configuration with a score there measured (what a mean over subtasks may average)."""
    return {k: set.intersection(*by.values()) for k, by in _measured(keys).items()}


def subtask_coverage(rows: Sequence[TaskRow]) -> dict[tuple, tuple[set[str], set[str]]]:
    """Per (task, length), from the subtask rows: the subtasks some configuration measured, and
    those every configuration measured (what a mean over subtasks may average)."""
    keys = [(r.task, r.subtask, r.context_length, r.config_key) for r in rows if r.subtask is not None]
    some: dict[tuple, set[str]] = defaultdict(set)
    for task, sub, length, _ in keys:
        some[(task, length)].add(sub)
    return {k: (some[k], common) for k, common in common_cells(keys).items()}


def _means(rows: list[TaskRow], scores: dict[tuple, dict[tuple, float]]) -> list[TaskRow]:
    """The mean over subtasks, per task x length x configuration (only where a task has several),
    over the subtasks every configuration measured at that length: an interrupted or failed run's
    configuration may lack one, and a mean over other subtasks than the full cache's is not its
    rival (the subtasks left out are named in ``left_out``)."""
    by: dict[tuple, list[TaskRow]] = defaultdict(list)
    for r in rows:
        by[(r.task, r.context_length, r.config_key)].append(r)
    coverage = subtask_coverage(rows)
    out = []
    for (task, length, key), subs in by.items():
        some, common = coverage[(task, length)]
        subs = sorted((r for r in subs if r.subtask in common), key=lambda r: r.subtask)
        if len(subs) < 2:
            continue
        cells = [(task, r.subtask, length) for r in subs]
        c = combined(key, cells, [1.0 / len(cells)] * len(cells), scores, (task, "mean", length))
        refs = [scores.get((*cell, REFERENCE_KEY)) for cell in cells]
        ref_acc = statistics.fmean(statistics.fmean(r.values()) for r in refs) if all(refs) else None
        first = subs[0]
        out.append(TaskRow(
            task=task, subtask=None, context_length=length, config_key=key, label=first.label, press=first.press,
            keep_ratio=first.keep_ratio, is_reference=first.is_reference,
            score_metric=",".join(sorted({r.score_metric or "?" for r in subs})), n=c.n,
            n_subtasks=len(subs), correct=None, accuracy=c.accuracy, interval=c.interval,
            interval_method=c.interval_method, reference_accuracy=ref_acc,
            change_pp=c.change, change_interval=c.change_interval, verdict=_verdict(c.change, c.change_interval),
            n_needed=c.n_needed, near_chance=all(r.near_chance for r in subs), left_out=sorted(some - common)))
    return out


def accuracy_stats(samples: Sequence[Any]) -> dict[str, Stat]:
    """Each configuration's accuracy in one number (its row in the configuration table, the
    study's): the mean over (task, context length) of the mean over subtasks, on the cells
    every configuration measured -- the same cells for all, so the numbers compare; subtasks
    weigh equally (RULER's convention), lengths weigh equally. With one cell it is that subtask
    row's numbers, with one length that mean row's (the same seeds). Empty when no cell is
    common to all; configurations without a scored sample are not in it."""
    _, _, scores = _scored(samples)
    keys = {k[3] for k in scores}
    # one set of cells for every configuration: the (task, length) groups every one has scores in
    # (a length the full cache failed would leave the others nothing to pair with), and in each
    # the subtasks every one measured
    have = _measured(scores)
    groups = [(task, length, sorted(set.intersection(*by.values())))
              for (task, length), by in sorted(have.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
              if set(by) == keys]
    groups = [g for g in groups if g[2]]
    if not groups:
        return {}
    cells = [(t, sub, length) for t, length, subs in groups for sub in subs]
    weights = [1.0 / (len(groups) * len(subs)) for _, _, subs in groups for _ in subs]
    seed = cells[0] if len(cells) == 1 else ((groups[0][0], "mean", groups[0][1]) if len(groups) == 1
                                             else ("all cells",))
    out = {}
    for key in keys:
        c = combined(key, cells, weights, scores, seed)
        out[key] = Stat(value=c.accuracy, interval=c.interval, change=c.change, change_interval=c.change_interval,
                        n=c.n, n_pairs=c.n_pairs, n_needed=c.n_needed)
    return out


def _needles(scored: Sequence[Any], labels: dict[str, str]) -> list[NeedleCell]:
    """Depth x length cells, every subtask with a needle pooled (passkey, the niah variants)."""
    by: dict[tuple, list[Any]] = defaultdict(list)
    for s in scored:
        if s.needle_depth is not None:
            by[(s.config_key, float(s.needle_depth), s.context_length)].append(s)
    cells = []
    for (key, depth, length), group in by.items():
        xs = list(_scores(group).values())
        cells.append(NeedleCell(config_key=key, label=labels.get(key, key), needle_depth=depth, context_length=length,
                                n=len(xs), accuracy=statistics.fmean(xs),
                                interval=accuracy_interval(xs, seed_for(key, depth, length, "needle"))[0],
                                subtasks=sorted({s.subtask or s.task for s in group})))
    cells.sort(key=lambda c: (c.config_key != REFERENCE_KEY, c.config_key, c.needle_depth, c.context_length or 0))
    return cells
