"""Rows: one per configuration (optionally per dataset), aggregated over its prompts, with
every metric's ``Stat`` (render.paired), and the run's timing-noise estimate that the
verdicts of timings use."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from knormctl.press_spec import PRESS_NAMES, QUIET_IN_FORWARD
from knormctl.render.metrics import METRIC, METRICS
from knormctl.render.paired import (
    Interval, PerPrompt, Stat, add_change, metric_seed, ok, paired_values, per_prompt, prompt_key, repeat_spread,
    value_stat, verdict)

REFERENCE_KEY = "none"  # PressConfig.key of the full-cache reference
CHANGE_BOUNDS = (-100.0, 100.0)  # what a change of a fraction can be, in percentage points
# Without a configuration that does the full cache's work under another name (keep_ratio
# 1.0), the run cannot measure its own timing noise: on a shared
# 2-core machine medians of identical configurations move by several percent, so this is
# assumed instead (and the header says so).
ASSUMED_NOISE_PCT = 5.0


@dataclass
class ConfigRow:
    """One configuration (optionally within one dataset), aggregated over its prompts."""

    config_key: str
    label: str  # short, for tables and tick labels: "knorm 0.9", "full cache"
    press: str
    keep_ratio: float
    prune_after: int
    skip_layers: str
    compress_mode: str
    keep_recent: int
    dataset: str | None  # None = all datasets together
    is_reference: bool
    n_samples: int  # stored sample rows (repeats included, failed included)
    n_failed: int
    n_prompts: int  # distinct prompts with at least one successful sample
    n_repeats: int  # most measurement rounds of one prompt (1 = no repeats)
    values: dict[str, float | None]  # metric -> median over prompts (mean for fractions, lower median for counts)
    intervals: dict[str, Interval | None]  # metric -> 95% interval of the value (fractions only)
    changes: dict[str, float | None]  # vs the reference, paired: % (pp for fractions)
    change_intervals: dict[str, Interval | None]  # 95% bootstrap interval of the change
    verdicts: dict[str, str | None]  # better | worse | noise | same | artifact (TTFT) | None
    n_pairs: dict[str, int]  # prompts paired with the reference, per metric
    n_needed: dict[str, int | None]  # prompts that would tell a 5% change (only where this run cannot)
    stdev: dict[str, float | None]  # over prompts
    repeat_spread_pct: dict[str, float | None]  # timing metrics: how far repeated rounds disagree (%)
    peak_mem_kind: str | None
    peak_mem_reason: str | None  # why peak memory is N/A (set only when it is)
    na_reasons: dict[str, str]  # metric -> why its value is N/A (only the metrics that are)
    max_context_tokens: int | None  # largest prompt + new tokens over the samples
    max_prompt_tokens: int | None  # largest part a prefill-mode cut sees: the prompt (a question's context)
    compressed_samples: int | None  # successful samples with compress_events > 0 (None: not recorded)
    paired: bool | None  # same successful prompts as the reference (None: this is the reference / none exists)

    def stat(self, name: str) -> Stat:
        return Stat(value=self.values[name], interval=self.intervals[name], change=self.changes[name],
                    change_interval=self.change_intervals[name], n_pairs=self.n_pairs[name],
                    n_needed=self.n_needed[name], verdict=self.verdicts[name])

    @property
    def evicts_nothing(self) -> bool:
        """keep_ratio 1.0: the press returns before any work (compress.py), the full cache's code path."""
        return not self.is_reference and self.keep_ratio >= 1.0


def fmt_keep_ratio(kr: float) -> str:
    return f"{kr:.1f}" if float(kr).is_integer() else f"{kr:g}"  # "1.0", "0.9", "0.75"


def labels_for(protos: dict[str, Any]) -> dict[str, str]:
    """Short labels ("knorm 0.9"); dimensions that vary between configurations are appended."""
    others = [p for k, p in protos.items() if k != REFERENCE_KEY]
    varying = [dim for dim in ("prune_after", "skip_layers", "compress_mode", "keep_recent")
               if len({getattr(p, dim) for p in others}) > 1]
    short = {"prune_after": "pa={}", "skip_layers": "skip={}", "compress_mode": "{}", "keep_recent": "recent={}"}
    labels = {}
    for key, p in protos.items():
        if key == REFERENCE_KEY:
            labels[key] = "full cache"
            continue
        parts = [p.press, fmt_keep_ratio(p.keep_ratio)] + [short[d].format(getattr(p, d) or "-") for d in varying]
        labels[key] = " ".join(parts)
    counts: dict[str, int] = defaultdict(int)
    for v in labels.values():
        counts[v] += 1
    return {k: (v if counts[v] == 1 else k) for k, v in labels.items()}


def sort_key(p: Any) -> tuple:
    family = p.press.split("(", 1)[0]  # 'snapkv(window_size=32)' sorts with snapkv
    press_rank = PRESS_NAMES.index(family) if family in PRESS_NAMES else len(PRESS_NAMES)
    return (p.config_key != REFERENCE_KEY, press_rank, p.press, -p.keep_ratio, p.prune_after,
            p.skip_layers or "", p.compress_mode, p.keep_recent or 0, p.config_key)


def by_config(samples: Iterable[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for s in samples:
        groups[s.config_key].append(s)
    return groups


def _stdev(xs: Sequence[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def _stats(key: str, mine: PerPrompt, ref: PerPrompt | None, evicts: bool) -> dict[str, Stat]:
    """Every metric's value, interval, change and change interval (verdicts come later).
    Token match of a configuration that evicts (``evicts``): 0 or 1 on every prompt on both
    sides, all alike, gets the binomial bound (as right/wrong task scores do) instead of [+0, +0]."""
    out = {}
    for m in METRICS:
        stat = value_stat(m, mine.values[m.name], metric_seed(key, m.name, "value"))
        if ref is not None and key != REFERENCE_KEY:
            pair = paired_values(m, mine, ref)
            bounded = m.name == "token_match" and evicts and all(x in (0.0, 1.0) for v in pair for x in v.values())
            # the full cache's own token match is 1 by definition: a change lies in [-100, 0] pp
            add_change(stat, m, *pair, metric_seed(key, m.name, "change"), bounds=(-100.0, 0.0) if bounded else None)
        out[m.name] = stat
    return out


def noise_estimate(rows: Sequence[ConfigRow]) -> tuple[float, str, bool]:
    """How much timings move between configurations doing the same work: the largest timing
    change of a keep_ratio-1.0 configuration against the full cache (the same code path, so
    any gap is the machine's drift between configurations). (pct, source, measured)."""
    estimates = []
    for r in rows:
        for m in METRICS:
            c = r.changes[m.name]
            if m.timing and r.evicts_nothing and c is not None:
                estimates.append((abs(c), f"{r.label} vs the full cache, {m.label}: the same code path"))
    if not estimates:
        # none in the run, or none measured yet on a prompt the full cache has measured too
        return ASSUMED_NOISE_PCT, "assumed: no keep_ratio 1.0 cells measured", False
    pct, source = max(estimates, key=lambda e: e[0])
    return pct, source, True


def press_works_before_first_token(s: Any, prefill_chunk: int = 0) -> bool:
    """Whether the press does work of its own before this sample's first token, inside TTFT: a
    cut before what is fed after it (the context and query-aware protocols: the question or
    the answer prefix), a chunked prefill's cuts between chunks, or a press that works inside
    the forward (hooks that observe attention, kvpress's cut; only ``QUIET_IN_FORWARD``'s do
    not). Otherwise the prefill is the full cache's own work (engine/loop.py)."""
    if s.press == "none" or s.keep_ratio >= 1.0:
        return False
    return (s.press.split("(", 1)[0] not in QUIET_IN_FORWARD
            or getattr(s, "protocol", None) in ("context", "query-aware")
            or bool(prefill_chunk and s.prompt_tokens and s.prompt_tokens > prefill_chunk))


def build_rows(samples: Sequence[Any], labels: dict[str, str], by_dataset: bool,
               prefill_chunks: dict[Any, int] | None = None) -> tuple[list[ConfigRow], float, str, bool]:
    """Rows for every configuration (per dataset when asked), their verdicts, and the noise
    estimate. ``prefill_chunks``: run id -> its --prefill-chunk (cuts before the first token)."""
    from knormctl.render.tasks import accuracy_stats  # tasks reads this module's sort order
    blocks = ([(d, [s for s in samples if s.dataset == d]) for d in sorted({s.dataset for s in samples})]
              if by_dataset else [(None, list(samples))])
    rows: list[ConfigRow] = []
    stats: list[dict[str, Stat]] = []
    for dataset, block in blocks:
        groups = by_config(block)
        prompts = {k: per_prompt(v) for k, v in groups.items()}
        ref = prompts.get(REFERENCE_KEY)
        ref_cells = {prompt_key(s) for s in ok(groups.get(REFERENCE_KEY, []))}
        accuracy = accuracy_stats(block)  # one definition with the task tables (render.tasks)
        for key in sorted(groups, key=lambda k: sort_key(groups[k][0])):
            st = _stats(key, prompts[key], ref, evicts=groups[key][0].keep_ratio < 1.0)
            if any(getattr(x, "score", None) is not None for x in ok(groups[key])):  # scored: the common cells' number, or none
                st["accuracy"] = accuracy.get(key, Stat())
            rows.append(_row(key, groups[key], prompts[key], st, dataset, labels, ref_cells if ref else None))
            stats.append((st, any(press_works_before_first_token(x, (prefill_chunks or {}).get(getattr(x, "run_id", None), 0))
                                  for x in ok(groups[key]))))
    noise_pct, noise_source, measured = noise_estimate(rows)
    for row, (st, in_ttft) in zip(rows, stats):
        for m in METRICS:
            row.verdicts[m.name] = verdict(m, st[m.name], noise_pct, cuts_in_ttft=in_ttft)
    return rows, noise_pct, noise_source, measured


def _cut_part(s: Any) -> int:
    """Tokens of a sample's prompt that a prefill-mode cut sees: all of them, but for the context
    protocol only the context (the question is fed after the cut)."""
    return s.prompt_tokens - ((s.question_tokens or 0) if getattr(s, "protocol", None) == "context" else 0)


def why_none(name: str, good: Sequence[Any], group: Sequence[Any]) -> str:
    """Why a configuration has no value of metric ``name`` (its samples say which case)."""
    if not good:
        return f"every cell failed ({len(group)})" if group else "no cell stored"
    if name == "peak_mem_bytes":
        return "; ".join(sorted({s.peak_mem_reason for s in good if getattr(s, "peak_mem_reason", None)})) or "not measured"
    if name in ("tpot_s", "itl_p90_s") and all((getattr(s, "new_tokens", None) or 0) <= 1 for s in good):
        return "one new token per answer: no decode step to time"
    if name in ("ppl_context", "ppl_compressed"):
        if all(getattr(s, "task", None) not in ("lm", None) for s in good):
            return "a question task: no perplexity"
        if all(not getattr(s, "eval_tokens", None) for s in good):
            return "no text after the prompt was scored (--eval-tokens 0)"
    if name == "token_match":
        return "no full-cache output of the same prompt to compare with"
    if name == "accuracy":
        if all(getattr(s, "score", None) is None for s in good):
            return "no scored answer (not a question task)"
        return "no subtask and length that every configuration measured"
    return f"not stored in these samples ({METRIC[name].source} is empty: an older knormctl, or not measured)"


def _row(key: str, group: list[Any], prompts: PerPrompt, st: dict[str, Stat], dataset: str | None,
         labels: dict[str, str], ref_cells: set | None) -> ConfigRow:
    p = group[0]
    good = ok(group)
    mem_kinds = {s.peak_mem_kind for s in good if s.peak_mem_kind}
    na = {n: why_none(n, good, group) for n, stat in st.items() if stat.value is None}
    events = [s.compress_events for s in good if s.compress_events is not None]
    contexts = [s.prompt_tokens + s.new_tokens for s in good if s.prompt_tokens is not None and s.new_tokens is not None]
    cells = {prompt_key(s) for s in good}
    return ConfigRow(
        config_key=key, label=labels[key], press=p.press, keep_ratio=p.keep_ratio, prune_after=p.prune_after,
        skip_layers=p.skip_layers or "", compress_mode=p.compress_mode, keep_recent=p.keep_recent or 0,
        dataset=dataset,
        is_reference=key == REFERENCE_KEY, n_samples=len(group), n_failed=len(group) - len(good),
        n_prompts=len(cells), n_repeats=max(1, prompts.n_repeats),
        values={n: s.value for n, s in st.items()}, intervals={n: s.interval for n, s in st.items()},
        changes={n: s.change for n, s in st.items()}, change_intervals={n: s.change_interval for n, s in st.items()},
        verdicts={n: None for n in st}, n_pairs={n: s.n_pairs for n, s in st.items()},
        n_needed={n: s.n_needed for n, s in st.items()},
        stdev={m.name: _stdev(list(prompts.values[m.name].values())) for m in METRICS},
        repeat_spread_pct={m.name: repeat_spread(m, prompts.rounds[m.name], metric_seed(key, m.name, "rounds"))
                           if m.timing and prompts.n_repeats > 1 else None for m in METRICS},
        peak_mem_kind=", ".join(sorted(mem_kinds)) or None,
        peak_mem_reason=na.get("peak_mem_bytes"), na_reasons=na,
        max_context_tokens=max(contexts) if contexts else None,
        max_prompt_tokens=max((_cut_part(s) for s in good if s.prompt_tokens is not None), default=None),
        compressed_samples=sum(1 for e in events if e > 0) if events else None,
        paired=None if ref_cells is None or key == REFERENCE_KEY else cells == ref_cells,
    )

