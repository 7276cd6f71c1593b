"""The numbers of one metric for one configuration: its value with a 95% interval, its
paired change against the full cache with a 95% interval, how many prompts would tell a
5% change, and the verdict. Every table, export and figure reads these (``Stat``).

Prompts, not samples, are the unit: the repeats of one prompt (``samples.repeat``,
measurement rounds of the same cell) are first reduced to one value per prompt with the
metric's own statistic (median; mean for fractions; lower median for counts), then:

- value: that statistic over prompts; interval (fractions only): Wilson when every score of a
  right/wrong metric (accuracy) is 0 or 1, else a seeded percentile bootstrap over prompts.
  Accuracy is the exception: its numbers are render.tasks' ``accuracy_stats`` (the mean over
  subtasks and context lengths, as the task tables), not a mean over pooled questions.
  Medians of timings, memory and perplexity get none: over different prompts it would show
  the prompt mix, not the press;
- change (relative metrics): each prompt's change against the full cache on the same
  prompt, in %, then the median over prompts; fractions: the mean of per-prompt
  differences, in percentage points. Interval: bootstrap over prompts of that statistic.
- verdict: "same" when every prompt's change is exactly 0 (keep ratio 1.0's token match and
  perplexity; a configuration that evicts gets the binomial bound for a token match of 0 or
  1 on every prompt instead: identical outputs on 3 prompts say little of the 4th); "no detectable difference" ("noise") when the change's interval contains 0,
  or, for timings, when the change is within the run's same-work noise; otherwise better
  or worse by the metric's direction (a TTFT change is an "artifact" where the press does
  nothing before the first token: see flags).
- rounds: a change pairs each prompt's rounds (``--repeats``; two runs of a group that
  measured the same prompt count as two rounds) that both sides measured.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from knormctl.render.metrics import DETECTABLE_EFFECT, LOWER, METRICS, Metric
from knormctl.stats import aggregate, bootstrap_interval, samples_needed, seed_for, wilson_interval

PromptKey = tuple  # (dataset, sample_index, text_hash): the same prompt in every configuration and shard
Interval = tuple[float, float]


def prompt_key(s: Any) -> PromptKey:
    """The same prompt in another configuration (and in another run of a group). No run id:
    the runs of a group may split the prompts between them."""
    return (s.dataset, s.sample_index, s.text_hash)


def ok(samples: Iterable[Any]) -> list[Any]:
    return [s for s in samples if not s.error]


RoundKey = tuple  # (run id, repeat): a measurement round; two runs of a group measuring one prompt are two rounds


@dataclass
class PerPrompt:
    """One configuration's successful samples reduced to one value per prompt and metric."""

    values: dict[str, dict[PromptKey, float]]  # metric -> prompt -> value (rounds aggregated)
    rounds: dict[str, dict[RoundKey, dict[PromptKey, float]]]  # metric -> round -> prompt -> value
    n_repeats: int  # the most rounds any prompt has


def per_prompt(samples: Sequence[Any], metrics: Sequence[Metric] = METRICS) -> PerPrompt:
    """Rounds are (run, repeat): a prompt measured by two runs of a group (a requeued shard, the
    same sweep run twice) counts both, as rounds, rather than the later one overwriting the other."""
    raw: dict[str, dict[PromptKey, dict[RoundKey, float]]] = {m.name: defaultdict(dict) for m in metrics}
    for s in ok(samples):
        key, rnd = prompt_key(s), (getattr(s, "run_id", None) or 0, getattr(s, "repeat", 0) or 0)
        for m in metrics:
            v = getattr(s, m.source)
            if v is not None:
                raw[m.name][key][rnd] = float(v)
    values = {m.name: {k: aggregate(list(reps.values()), m.aggregate) for k, reps in raw[m.name].items()}
              for m in metrics}
    rounds: dict[str, dict[RoundKey, dict[PromptKey, float]]] = {}
    for m in metrics:
        by_round: dict[RoundKey, dict[PromptKey, float]] = defaultdict(dict)
        for k, reps in raw[m.name].items():
            for rnd, v in reps.items():
                by_round[rnd][k] = v
        rounds[m.name] = dict(by_round)
    n_repeats = max((len(reps) for by in raw.values() for reps in by.values()), default=0)
    return PerPrompt(values=values, rounds=rounds, n_repeats=n_repeats)


def paired_values(m: Metric, mine: PerPrompt, ref: PerPrompt) -> tuple[dict[PromptKey, float],
                                                                        dict[PromptKey, float]]:
    """Each shared prompt's value on both sides over the rounds BOTH measured: a round one side
    lacks (its cell failed) is left out of the other too, so a slow round is never set against
    the other side's median of two (a false 'worse'). Where no round is shared (cells of one
    prompt stored by different runs) each side's own value."""
    a, b = mine.rounds.get(m.name, {}), ref.rounds.get(m.name, {})
    mine_v, ref_v = {}, {}
    for k, own in mine.values[m.name].items():
        if k not in ref.values[m.name]:
            continue
        common = [r for r in a if k in a[r] and k in b.get(r, {})]
        if common:
            mine_v[k] = aggregate([a[r][k] for r in common], m.aggregate)
            ref_v[k] = aggregate([b[r][k] for r in common], m.aggregate)
        else:
            mine_v[k], ref_v[k] = own, ref.values[m.name][k]
    return mine_v, ref_v


@dataclass
class Stat:
    """One metric of one configuration, computed once."""

    value: float | None = None
    interval: Interval | None = None  # 95% interval of the value
    change: float | None = None  # vs the full cache: % (relative) or pp (fractions)
    change_interval: Interval | None = None  # 95% bootstrap interval of the change
    n: int = 0  # prompts with a value
    n_pairs: int = 0  # prompts paired with the full cache
    n_needed: int | None = None  # prompts that would tell a 5% (5 pp) change; only when this run cannot
    verdict: str | None = None  # better | worse | noise | same | artifact | None (no direction / no interval)


def _is_binary(xs: Iterable[float]) -> bool:
    return all(x in (0.0, 1.0) for x in xs)


def value_stat(m: Metric, values: dict[PromptKey, float], seed: int) -> Stat:
    xs = list(values.values())
    if not xs:
        return Stat()
    value = aggregate(xs, m.aggregate)
    if not m.points:
        # A median over different prompts (1024 and 2048 tokens, different texts) spreads with
        # the prompt mix, not with the press: no interval; the paired change carries the uncertainty.
        interval = None
    elif m.pass_fail and _is_binary(xs):
        interval = wilson_interval(sum(xs), len(xs))
    else:
        interval = bootstrap_interval(xs, m.aggregate, seed=seed)
    return Stat(value=value, interval=interval, n=len(xs))


def per_prompt_changes(m: Metric, mine: dict[PromptKey, float], ref: dict[PromptKey, float]) -> list[float]:
    """Each shared prompt's change against the reference: % for relative metrics, pp for fractions."""
    out = []
    for k, v in mine.items():
        r = ref.get(k)
        if r is None:
            continue
        if m.points:
            out.append((v - r) * 100.0)
        elif r != 0:
            out.append((v - r) / r * 100.0)
    return out


def change_statistic(m: Metric) -> str:
    """Fractions: the mean of per-prompt differences (= the difference of the means on
    shared prompts); everything else: the median of per-prompt relative changes."""
    return "mean" if m.points else "median"


def add_change(stat: Stat, m: Metric, mine: dict[PromptKey, float], ref: dict[PromptKey, float] | None,
               seed: int, bounds: Interval | None = None) -> None:
    """Fill ``stat``'s change, its interval and ``n_needed`` (no verdict yet: that needs the run's
    noise). ``bounds``: what a change can be, for the interval of changes that all agree
    (stats.constant_interval) instead of the bootstrap's zero width."""
    if m.better is None or ref is None:
        return
    changes = per_prompt_changes(m, mine, ref)
    stat.n_pairs = len(changes)
    if not changes:
        return
    how = change_statistic(m)
    stat.change = aggregate(changes, how)
    stat.change_interval = bootstrap_interval(changes, how, seed=seed, bounds=bounds)
    if spans_zero(stat.change_interval):
        stat.n_needed = samples_needed(len(changes), stat.change_interval, DETECTABLE_EFFECT)


def spans_zero(interval: Interval | None) -> bool:
    return interval is not None and interval[0] <= 0.0 <= interval[1]


def verdict(m: Metric, stat: Stat, noise_pct: float, cuts_in_ttft: bool = False) -> str | None:
    """The verdict rule (module docstring). None: no direction, no change, or a single prompt
    (no interval, so nothing can be called). ``cuts_in_ttft``: the press works before the first
    token (rows.press_works_before_first_token), so its TTFT change is the press's doing."""
    change, interval = stat.change, stat.change_interval
    if m.better is None or change is None or interval is None:
        return None
    if change == 0.0 and interval == (0.0, 0.0):  # every prompt unchanged (keep 1.0's token match)
        return "same"
    if spans_zero(interval) or (m.timing and abs(change) <= noise_pct):
        return "noise"
    if m.name == "ttft_s" and not cuts_in_ttft:
        # The press does nothing before the first token: a TTFT change beyond noise is not its doing.
        return "artifact"
    return "better" if (change < 0) == (m.better == LOWER) else "worse"


def metric_seed(config_key: str, name: str, what: str) -> int:
    """Each interval has its own seed, from names only: reproducible. Not from the dataset: a
    one-dataset run gives the same intervals with and without --by-dataset (bootstrap_interval
    sorts its values, so neither row nor shard order matters either)."""
    return seed_for(config_key, name, what)


def repeat_spread(m: Metric, rounds: dict[RoundKey, dict[PromptKey, float]], seed: int) -> float | None:
    """How far repeated rounds of the same configuration disagree beyond their scatter: for each
    later round of a run, the median over prompts of its change against that run's first round
    (%), and for each other run's first round the same against the first run's (where they share
    prompts: a group's shards do not); kept only when its 95% bootstrap interval excludes 0; the
    largest |change| kept (None: the rounds agree)."""
    if len(rounds) < 2:
        return None
    by_run: dict[Any, list[RoundKey]] = defaultdict(list)
    for rnd in sorted(rounds):
        by_run[rnd[0]].append(rnd)
    firsts = [run_rounds[0] for run_rounds in by_run.values()]
    pairs = [(r, run_rounds[0]) for run_rounds in by_run.values() for r in run_rounds[1:]]
    pairs += [(f, firsts[0]) for f in firsts[1:]]
    spreads = []
    for i, (r, base) in enumerate(pairs, start=1):
        changes = per_prompt_changes(m, rounds[r], rounds[base])
        if changes and not spans_zero(bootstrap_interval(changes, "median", seed=seed + i) or (0.0, 0.0)):
            spreads.append(abs(aggregate(changes, "median")))
    return max(spreads) if spreads else None
