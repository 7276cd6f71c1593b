"""A study's view: the runs of one group that differ in model or settings, read side by side.

Every run keeps its own full-cache reference (a run is one model at one setting: dtype,
budget, mode ... change what the reference measures), so each configuration's numbers
are its run's paired changes (``render.summary``), put on common scales:

- quality: perplexity of the following text as a ratio to the run's full cache (the
  paired median change + 1; lower is better), or, for question tasks, accuracy (mean over
  subtasks; higher is better);
- KV held: the cache's bytes at the end as a ratio to the full cache's (paired);
- TPOT ratio: decode time per token against the full cache (paired).

Each comes with its 95% interval. On top: one table per model (the settings that vary as
columns), a leaderboard (for each press, the quality kept at each keep ratio, per model),
the Pareto frontier (quality vs KV held) and the best configuration that fits each memory
budget -- the sentence a deployer reads -- per SCALE: a model and the settings that change
its full cache (dtype, context, task ...). Runs that differ in those have different full
caches, so their ratios do not share a scale: a bfloat16 run's 100% is a float32 run's 50%,
and a frontier across the two would compare percentages of different things. Settings that
change only what the presses do (``PRESS_ONLY``) leave the full cache as it is, so their
runs share one scale and one frontier. Pure Python.
"""

from __future__ import annotations

import math
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from knormctl.config import task_reads
from knormctl.render.pareto import Point, best_at_budgets, frontier
from knormctl.render.summary import Summary, build_summary

BUDGETS = (0.25, 0.5, 0.75, 1.0)  # fractions of the full cache's KV bytes
# settings that identify a run but are not settings of the measurement
NOT_SETTINGS = ("group", "shard", "threads", "study", "presses", "keep_ratios", "command")
# settings the full cache ignores: runs that differ only in them share a scale (see above)
PRESS_ONLY = ("prune_after", "skip_layers", "compress_mode", "keep_recent", "n_sink")

Interval = tuple[float, float]


@dataclass
class StudyPoint:
    """One configuration of one run."""

    model: str
    scale: str  # the model and the settings that change its full cache: "m (dtype=bfloat16)"
    run_id: int
    settings: dict[str, str]  # the run settings that vary across the study, as text
    order: tuple  # the same settings' raw values, for sorting (256 before 1024)
    config_key: str
    label: str  # e.g. "snapkv 0.5"
    press: str
    keep_ratio: float
    is_reference: bool
    n_prompts: int
    quality: float | None
    quality_interval: Interval | None
    kv_held: float | None  # ratio to the run's full cache
    kv_interval: Interval | None
    tpot_ratio: float | None
    tpot_interval: Interval | None
    on_frontier: bool = False
    scale_axes: tuple[str, ...] = ()  # the settings its scale names
    values: dict[str, Any] = field(default_factory=dict)  # ``settings`` as stored (the JSON's typed values)

    @property
    def key(self) -> str:
        return f"{self.run_id}|{self.config_key}"

    @property
    def name(self) -> str:
        """The label with the settings that tell it apart, e.g. 'snapkv 0.5 (prune_after=512)'."""
        extra = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.label} ({extra})" if extra else self.label

    @property
    def name_on_scale(self) -> str:
        """The name without the settings its scale already says: 'streaming 0.5' on 'm (dtype=bfloat16)'
        (and the full cache without the press-only ones: they do not act on it)."""
        extra = ", ".join(f"{k}={v}" for k, v in self.settings.items()
                          if k not in self.scale_axes and not (self.is_reference and k in PRESS_ONLY))
        return f"{self.label} ({extra})" if extra else self.label


@dataclass
class BudgetLine:
    model: str
    scale: str
    budget: float
    best: StudyPoint | None  # None: nothing fits the budget, or (``na``) nothing has a quality
    na: str | None = None  # why no configuration of the scale has a quality


@dataclass
class StudyView:
    name: str
    quality_kind: str  # "ppl ratio" | "accuracy"
    higher_quality: bool
    axes: list[str]  # run settings that vary
    models: list[str]
    scales: list[str]  # one frontier and one set of budgets each (models when no axis changes the full cache)
    scale_axes: list[str]  # the axes that make a scale (those not in PRESS_ONLY)
    points: list[StudyPoint]
    best: list[BudgetLine]
    # press -> scale -> keep ratio -> best point; per scale, as the frontier: a ratio to a float32 full
    # cache and one to a bfloat16 full cache do not compare
    leaderboard: dict[str, dict[str, dict[float, StudyPoint]]]
    summaries: dict[int, Summary] = field(default_factory=dict)  # run id -> its own summary
    planned_runs: int | None = None  # runs the study file planned (stored with each run); None: not a study file
    missing_runs: list[int] = field(default_factory=list)  # plan positions (1-based) with no stored run
    db_arg: str = ""  # ' --db PATH' for the commands its lines suggest, when the user named a database

    @property
    def runs_line(self) -> str:
        """'2 runs', or '2 of 3 planned runs (run 3 of the plan not stored yet: ...)'."""
        return runs_line(self.name, len(self.summaries), self.planned_runs, self.missing_runs, self.db_arg)

    def points_of(self, model: str) -> list[StudyPoint]:
        return [p for p in self.points if p.model == model]

    def points_on(self, scale: str) -> list[StudyPoint]:
        return [p for p in self.points if p.scale == scale]

    def to_dict(self) -> dict[str, Any]:
        def pt(p: StudyPoint | None):
            if p is None:
                return None
            out = {k: getattr(p, k) for k in p.__dataclass_fields__ if k not in ("order", "values")}
            return {**out, "settings": p.values, "name": p.name}  # settings typed, as the dry run gives them

        return {
            "study": self.name, "quality": self.quality_kind, "quality_higher_is_better": self.higher_quality,
            "axes": self.axes, "models": self.models, "scales": self.scales, "budgets": list(BUDGETS),
            "planned_runs": self.planned_runs, "missing_runs": self.missing_runs,
            "points": [pt(p) for p in self.points],
            "best_at_budget": [{"model": b.model, "scale": b.scale, "budget": b.budget, "best": pt(b.best),
                                "na": b.na} for b in self.best],
            "leaderboard": {press: {model: {str(kr): pt(p) for kr, p in by_kr.items()}
                                    for model, by_kr in by_model.items()}
                            for press, by_model in self.leaderboard.items()},
            "runs": {rid: {"flags": [f.message for f in s.flags], "status": s.header.status}
                     for rid, s in self.summaries.items()},
        }


def run_settings(run: Any) -> dict[str, Any]:
    return config_settings(run.config_json or {})


def config_settings(config: dict) -> dict[str, Any]:
    """A run configuration's settings: what tells a study's runs apart (not its group, shard,
    threads, presses or keep ratios: every shard of one sweep shares them)."""
    return {k: v for k, v in config.items() if k not in NOT_SETTINGS}


def is_study(runs: Sequence[Any]) -> bool:
    """A group is a study (read run by run) when its runs differ in model or settings, or were
    planned from a study file of several runs (one of them stored so far reads as the study it
    is part of: the json keeps the study's form, the plan names the runs still missing); runs
    of one sweep split into shards share them and are merged instead."""
    keys = {(r.model_requested, repr(sorted(run_settings(r).items()))) for r in runs}
    planned = (((getattr(r, "config_json", None) or {}).get("study") or {}).get("runs") for r in runs)
    return len(keys) > 1 or any(isinstance(n, int) and n > 1 for n in planned)


def _axes(runs: Sequence[Any]) -> list[str]:
    """Settings that differ between the runs that read them (a passkey run's needle_depths is
    its default, read by no one: runs of two tasks do not vary in it)."""
    settings = [(r.task, run_settings(r)) for r in runs]
    keys = dict.fromkeys(k for _, s in settings for k in s)
    return [k for k in keys if k != "model"
            and len({repr(s.get(k)) for task, s in settings if task_reads(task, k)}) > 1]


def _ratio(change: float | None, interval: Interval | None) -> tuple[float | None, Interval | None]:
    if change is None:
        return None, None
    return 1 + change / 100.0, (None if interval is None else (1 + interval[0] / 100.0, 1 + interval[1] / 100.0))


def _order(v: Any) -> tuple:
    """A setting's place among its values: numbers and lists of numbers by value (context
    lengths [16384], [4096], [8192] were ordered as text), anything else by its text."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if v is None:
        return (0,)
    if number(v):
        return (1, v)
    if isinstance(v, (list, tuple)) and all(number(x) for x in v):
        return (2, tuple(v))
    return (3, repr(v))


def _text(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or "none"
    return str(v)


def build_study(runs: Sequence[Any], samples_by_run: dict[int, Sequence[Any]], name: str) -> StudyView:
    """The study view of ``runs`` (each with its stored samples)."""
    axes = _axes(runs)
    scale_axes = [k for k in axes if k not in PRESS_ONLY]
    question_task = any(r.task not in ("lm", None) for r in runs)
    points: list[StudyPoint] = []
    summaries = {}
    placed = []  # (model, settings' order, scale, run id) of every run, cells stored or not
    for run in runs:
        s = build_summary([run], samples_by_run.get(run.id, []))
        summaries[run.id] = s
        raw = run_settings(run)
        reads = {k: task_reads(run.task, k) for k in axes}  # "-": a setting this run's task does not read
        settings = {k: _text(raw.get(k)) if reads[k] else "-" for k in axes}
        order = tuple(_order(raw.get(k)) for k in axes)
        own = ", ".join(f"{k}={settings[k]}" for k in scale_axes if reads[k])
        scale = f"{run.model_requested} ({own})" if own else run.model_requested
        placed.append((run.model_requested, order, scale, run.id))
        for r in s.rows:
            if r.dataset is not None:
                continue
            if question_task:
                # the configuration table's accuracy (render.tasks.accuracy_stats): one definition
                quality, qi = r.values.get("accuracy"), r.intervals.get("accuracy")
            elif r.is_reference:
                quality, qi = (1.0, (1.0, 1.0)) if r.values.get("ppl_compressed") is not None else (None, None)
            else:
                quality, qi = _ratio(r.changes.get("ppl_compressed"), r.change_intervals.get("ppl_compressed"))
            # the prompts the point's quality rests on: a ratio, the prompts paired with the full cache
            # (an interrupted run's configuration may hold prompts its full cache has not measured)
            n = r.n_prompts if question_task or r.is_reference else r.n_pairs.get("ppl_compressed", 0)
            # the reference is 100% of itself only where it finished a cell (all failed: nothing measured)
            whole = (1.0, (1.0, 1.0)) if r.n_prompts else (None, None)
            kv, kvi = (whole if r.is_reference else
                       _ratio(r.changes.get("kv_bytes_final"), r.change_intervals.get("kv_bytes_final")))
            tp, tpi = (whole if r.is_reference else
                       _ratio(r.changes.get("tpot_s"), r.change_intervals.get("tpot_s")))
            points.append(StudyPoint(model=run.model_requested, scale=scale, run_id=run.id, settings=settings,
                                     order=order, values={k: raw.get(k) if reads[k] else None for k in axes},
                                     config_key=r.config_key, label=r.label, press=r.press,
                                     keep_ratio=r.keep_ratio, is_reference=r.is_reference, n_prompts=n,
                                     quality=quality, quality_interval=qi, kv_held=kv, kv_interval=kvi,
                                     tpot_ratio=tp, tpot_interval=tpi, scale_axes=tuple(scale_axes)))
    higher = question_task
    # every run's model and scale, a run that stored no cell too (it is named, not dropped)
    models = sorted({model for model, *_ in placed})
    first = {}  # each scale in the order of its model, then of its settings
    for model, _, scale, _ in sorted(placed, key=lambda x: x[:2]):
        first.setdefault(scale, model)
    best: list[BudgetLine] = []
    most = _on_most_prompts(points)
    for scale, model in first.items():
        mine = [p for p in points if p.scale == scale and p.key in most]
        pts = [Point(key=p.key, label=p.name, cost=p.kv_held, quality=p.quality, group=p.press, meta=p)
               for p in mine]
        on = {q.key for q in frontier(pts, higher_quality=higher)}
        for p in mine:
            p.on_frontier = p.key in on
        if not mine:  # no budget has a best: say why, not "no configuration fits"
            ids = {rid for _, _, s, rid in placed if s == scale}
            why = _no_quality([r for r in runs if r.id in ids], question_task,
                              stored=any(summaries[rid].rows for rid in ids),
                              referenced=any(p.is_reference and p.n_prompts for p in points if p.scale == scale))
            best.extend(BudgetLine(model, scale, budget, None, na=why) for budget in BUDGETS)
            continue
        for choice in best_at_budgets(pts, BUDGETS, higher_quality=higher):
            best.append(BudgetLine(model, scale, choice.budget, None if choice.best is None else choice.best.meta))
    leaderboard = _leaderboard([p for p in points if p.key in most], higher)
    planned, missing = missing_runs(runs)
    return StudyView(name=name, quality_kind="accuracy" if higher else "ppl ratio", higher_quality=higher,
                     axes=axes, models=models, scales=list(first), scale_axes=scale_axes, points=points, best=best,
                     leaderboard=leaderboard,
                     summaries=summaries, planned_runs=planned, missing_runs=missing)


def _on_most_prompts(points: Sequence[StudyPoint]) -> set[str]:
    """The keys of the points that can be placed (a quality and a KV held) and were measured on
    the most prompts among the placeable points of their press and keep ratio on their scale
    (the rivals the study measured under other press-only settings): a setting an interrupted
    run measured on fewer prompts does not win on its luck, on the leaderboard, the frontier
    or a budget line alike; and a point that cannot be placed (an accuracy whose run's full
    cache failed: no KV ratio) does not push out one that can."""
    rivals: dict[tuple[str, str, float], list[StudyPoint]] = defaultdict(list)
    for p in points:
        if p.quality is not None and p.kv_held is not None:
            rivals[(p.press, p.scale, p.keep_ratio)].append(p)
    return {p.key for ps in rivals.values() for p in ps if p.n_prompts == max(q.n_prompts for q in ps)}


def _leaderboard(points: Sequence[StudyPoint], higher: bool) -> dict[str, dict[str, dict[float, StudyPoint]]]:
    """Per press, scale and keep ratio the best of ``points`` (those on the most prompts) over
    the settings that change only the press (``PRESS_ONLY``)."""
    board: dict[str, dict[str, dict[float, StudyPoint]]] = defaultdict(dict)
    for p in sorted(points, key=lambda p: -p.quality if higher else p.quality):
        board[p.press].setdefault(p.scale, {}).setdefault(p.keep_ratio, p)
    return {press: {scale: dict(sorted(by.items(), reverse=True)) for scale, by in bs.items()}
            for press, bs in board.items()}


def leaderboard_setting(view: StudyView, best: StudyPoint) -> str:
    """The press-only settings that made ``best`` the leaderboard's point ('prune_after=512'),
    where the study measured its press and keep ratio under more than one; '' otherwise, and
    for the full cache (those settings do not act on it: its quality is 1 by definition)."""
    if best.is_reference:
        return ""
    rivals = [p for p in view.points_on(best.scale) if p.press == best.press and p.keep_ratio == best.keep_ratio
              and p.quality is not None]
    differ = [k for k in best.settings if k not in best.scale_axes
              and len({p.settings.get(k) for p in rivals}) > 1]
    return ", ".join(f"{k}={best.settings[k]}" for k in differ)


def runs_line(name: str, n: int, planned: int | None, missing: Sequence[int], db_arg: str = "") -> str:
    """'2 runs', or '2 of 3 planned runs (run 3 of the plan not stored yet: ...)'; ``db_arg``
    names the database in the command it suggests."""
    if not missing:
        return f"{n} runs"
    return (f"{n} of {planned} planned runs (run {', '.join(map(str, missing))} of the plan not stored yet: "
            f"knormctl sweep --resume-group {shlex.quote(name)}{db_arg})")


def missing_runs(runs: Sequence[Any]) -> tuple[int | None, list[int]]:
    """(runs the newest stored plan holds, its positions with no stored run). (None, []) where
    the runs were not planned from a study file, or by plans that cannot be told apart."""
    from knormctl.study import key_id, normalized_key

    plans = [(r.id, (r.config_json or {}).get("study") or {}) for r in runs]
    plans = [(rid, p) for rid, p in plans if isinstance(p.get("runs"), int)]
    if not plans:
        return None, []
    newest = max(plans)[1]
    if newest.get("key_ids"):
        # a plan names its runs by their keys as planned then; stored runs match in either form
        stored = {key_id(k) for _, p in plans if p.get("key") for k in (p["key"], normalized_key(p["key"]))}
        return len(newest["key_ids"]), [i + 1 for i, k in enumerate(newest["key_ids"]) if k not in stored]
    same = {k: v for k, v in newest.items() if k not in ("index", "key")}
    if any({k: v for k, v in p.items() if k not in ("index", "key")} != same for _, p in plans):
        return None, []  # runs of several plans, stored before plans named their runs: no claim
    stored = {p["index"] for _, p in plans if isinstance(p.get("index"), int)}
    return newest["runs"], [i + 1 for i in range(newest["runs"]) if i not in stored]


def _no_quality(runs: Sequence[Any], question_task: bool, *, stored: bool, referenced: bool) -> str:
    """Why a scale's configurations have no quality (budget lines say it instead of 'no fit');
    ``stored``: its runs stored a cell; ``referenced``: its full cache finished one (every
    ratio is to it)."""
    if not stored:
        ids = ", ".join(str(r.id) for r in sorted(runs, key=lambda r: r.id))
        return (f"N/A: no cell stored (run{'s' if len(runs) > 1 else ''} {ids}: "
                f"{', '.join(sorted({r.status for r in runs}))})")
    if not referenced:
        return "N/A: the full cache finished no cell (every ratio is to it: see the runs' errors)"
    if question_task:
        return "N/A: no accuracy stored (every question failed or was not scored)"
    if runs and all((r.config_json or {}).get("eval_tokens") == 0 for r in runs):
        return "N/A: no perplexity measured (eval_tokens = 0)"
    return "N/A: no perplexity stored (every evaluation failed)"


def _same(interval: Interval | None, value: float, tol: float) -> bool:
    return interval is None or (abs(interval[0] - value) < tol and abs(interval[1] - value) < tol)


def fmt_quality(view: StudyView, value: float | None, interval: Interval | None, sep: str = " ") -> str:
    """'1.154 [1.14,1.17]' (ppl ratio) or '62% [48,75]' (accuracy); no interval where it is a point.
    ``sep``: between the value and its interval (a newline in narrow tables)."""
    if value is None:
        return "N/A"
    # Interval ends are rounded outward, so the printed value is never outside its printed
    # interval (1.149 [1.15,1.16] read as a value outside it; it is 1.14856 in [1.14744, 1.15916]).
    if view.higher_quality:
        text = f"{value * 100:.0f}%"
        if _same(interval, value, 5e-3):
            return text
        return text + f"{sep}[{math.floor(interval[0] * 100 + 1e-9):.0f},{math.ceil(interval[1] * 100 - 1e-9):.0f}]"
    text = f"{value:.3f}"
    if _same(interval, value, 5e-4):
        return text
    return text + f"{sep}[{math.floor(interval[0] * 100 + 1e-9) / 100:.2f},{math.ceil(interval[1] * 100 - 1e-9) / 100:.2f}]"


def fmt_ratio(value: float | None, interval: Interval | None, sep: str = " ") -> str:
    """'51%' or '93% [88,97]' (percent of the full cache)."""
    if value is None:
        return "N/A"
    text = f"{value * 100:.0f}%"
    return text + ("" if _same(interval, value, 5e-3) else f"{sep}[{interval[0] * 100:.0f},{interval[1] * 100:.0f}]")


def study_flags(view: StudyView) -> list[str]:
    """The runs' flags, one line per kind: identical messages list their runs once; differing ones
    (numbers per run) give the first with the run it belongs to, count the others and point to
    each run's own report."""
    by_kind: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for rid, summary in view.summaries.items():
        for f in summary.flags:
            by_kind[f.kind].append((rid, f.message))
    out = []
    for kind, items in by_kind.items():
        runs = ", ".join(str(r) for r in dict.fromkeys(r for r, _ in items))
        label = "run" if "," not in runs else "runs"
        messages = list(dict.fromkeys(m for _, m in items))
        if len(messages) == 1:
            out.append(f"{label} {runs}: {messages[0]}")
        else:
            first_run, first = items[0]
            first = first.split(": ", 1)[-1] if kind in ("failed_sample",) else first
            more = len(messages) - 1  # the other messages (one several runs share counts once)
            out.append(f"{label} {runs} ({kind.replace('_', ' ')}): in run {first_run}, {first} ({more} more "
                       f"differ; each run's own: knormctl report --run-id N{view.db_arg})")
    return out


def budget_sentences(view: StudyView) -> list[str]:
    """'smollm2-135m, KV held <= 50% of the full cache: streaming 0.5 (ppl ratio 1.021 [1.01,1.03], KV held
    51%)' per scale and budget ('m (dtype=bfloat16), ... of its full cache' where settings make the scale)."""
    out = []
    for b in view.best:
        whose = "the" if b.scale == b.model else "its"
        lead = f"{b.scale}, KV held \u2264 {b.budget * 100:.0f}% of {whose} full cache: "
        if b.na is not None:  # one line for the scale, not one per budget
            line = f"{b.scale}: {b.na}"
            if line not in out:
                out.append(line)
            continue
        if b.best is None:
            out.append(lead + "no configuration fits")
            continue
        p = b.best
        q = fmt_quality(view, p.quality, p.quality_interval)
        out.append(lead + f"{p.name_on_scale} ({view.quality_kind} {q}, KV held {fmt_ratio(p.kv_held, p.kv_interval)})")
    return out
