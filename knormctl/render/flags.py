"""Honesty flags: plain sentences printed under the tables when a number must not be taken
at face value. Every rule that decides one lives here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from knormctl.render.header import DIFFER_LABELS, RunHeader
from knormctl.render.metrics import DETECTABLE_EFFECT, METRIC, METRICS
from knormctl.render.rows import ASSUMED_NOISE_PCT, ConfigRow
from knormctl.render.tasks import TaskRow, subtask_coverage

# Below this many prompts a 95% interval over prompts is optimistic: even the full range of
# n prompts covers their median only 1 - 2 * 0.5**n of the time (75% at 3, 97% at 6).
MIN_PROMPTS = 6
# Two configurations doing the same work (keep_ratio 1.0 evicts nothing) should time alike;
# beyond this the run's speed numbers are flagged as disturbed.
NOISY_SAME_WORK_PCT = 10.0


@dataclass
class Flag:
    """A plain sentence printed under the table when a number must not be taken at face value."""

    kind: str  # see the functions below: each names the kinds it raises
    message: str
    config_key: str | None = None


def first_line(text: str | None) -> str | None:
    """The first non-blank line of an error or message (tracebacks stay in the database)."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[0] if lines else None


def run_flags(runs: Sequence[Any], samples: Sequence[Any]) -> list[Flag]:
    """interrupted | run_failed | running. The store marks a run whose process is gone
    (dead pid, stale heartbeat) as interrupted and says why in ``error``."""
    stored: dict[int, int] = defaultdict(int)
    for s in samples:
        stored[s.run_id] += 1
    flags = []
    for r in runs:
        done, planned = stored[r.id], r.samples_planned
        cells = (f"{done} of {planned} planned cells finished" if planned is not None
                 else f"{done} cells finished (planned count unknown)")
        why = f" \u2014 {first_line(r.error)}" if first_line(r.error) else ""
        if r.status == "interrupted":
            flags.append(Flag("interrupted", f"run {r.id} was interrupted: {cells}{why}."))
        elif r.status == "failed":
            flags.append(Flag("run_failed", f"run {r.id} failed: {cells}{why}."))
        elif r.status == "running":
            flags.append(Flag("running", f"run {r.id} is still running: {cells} so far."))
    return flags


def machine_flags(header: RunHeader) -> list[Flag]:
    """mixed_machines: the runs of a group ran in different environments."""
    if not header.differs:
        return []
    what = ", ".join(DIFFER_LABELS[f] for f in header.differs)
    hosts_only = set(header.differs) <= {"hostname"}
    consequence = ("each prompt's configurations ran together on one machine, so paired changes hold, but "
                   "values pool machines" if hosts_only else
                   "values pool different set-ups, and a prompt's changes are only comparable to those of "
                   "prompts run in the same set-up")
    return [Flag("mixed_machines", f"the {len(header.machines)} environments of this group differ in {what} "
                                   f"(see the header): {consequence}.")]


def _no_compression(r: ConfigRow, where: str) -> str:
    """Why a configuration's generations never cut the cache, and whether its perplexity, from an
    evaluation pass of its own (another length, another method), was cut all the same: told
    by the numbers, not assumed (an uncut pass gives the full cache's value on every prompt)."""
    pa = r.prune_after
    if r.compress_mode == "prefill" and r.max_prompt_tokens is not None and r.max_prompt_tokens <= pa:
        why = (f"prefill mode cuts once, after the prompt or a question task's context, and none exceeded "
               f"prune_after={pa}: the longest was {r.max_prompt_tokens} tokens")
    elif r.max_context_tokens is None or r.max_context_tokens <= pa:
        longest = f"; the longest was {r.max_context_tokens} tokens" if r.max_context_tokens else ""
        why = f"prompt + new tokens never exceeded prune_after={pa}{longest}"
    else:  # e.g. --max-new-tokens 1: the prompt's forward is the last, and no token reads a cut after it
        why = (f"the cache exceeded prune_after={pa} only after each sample's last forward, and no token reads "
               "a cut made there, so none is made")
    change, interval = r.changes.get("ppl_compressed"), r.change_intervals.get("ppl_compressed")
    if change is not None and (change != 0.0 or (interval is not None and interval != (0.0, 0.0))):
        return (f"{where}: generation never cut the cache ({why}), so its speed and KV numbers are the full "
                f"cache's; its perplexity, from an evaluation pass of its own, differs from the full cache's on "
                f"the same prompts ({change:+.2f}%), so that pass did cut.")
    return f"{where}: no sample triggered a compression ({why}), so its numbers say nothing about compression."


def row_flags(rows: Sequence[ConfigRow], noise_pct: float, noise_source: str) -> list[Flag]:
    """no_reference | full_cache_path | no_compression | partly_compressed | unpaired | noisy_timing |
    ttft_artifact | repeats_disagree."""
    flags = []
    refs = {r.dataset: r for r in rows if r.is_reference}
    if rows and not refs:
        flags.append(Flag("no_reference", "no full-cache reference (press none) in these samples: "
                                          "changes against it cannot be computed."))
    for r in rows:
        where = f"{r.label}" + (f" on {r.dataset}" if r.dataset else "")
        if r.n_repeats > 1:
            # One keep_ratio-1.0 configuration is a rough noise estimate; rounds are called out
            # only beyond it AND beyond the floor a shared machine shows anyway.
            limit = max(noise_pct, ASSUMED_NOISE_PCT)
            spread = {m: s for m, s in r.repeat_spread_pct.items() if s is not None and s > limit}
            if spread:
                worst = max(spread, key=spread.get)
                flags.append(Flag("repeats_disagree", f"{where}: its {r.n_repeats} repeated rounds disagree by up to "
                                                      f"{spread[worst]:.1f}% in {METRIC[worst].label} (paired by "
                                                      f"prompt, beyond their scatter and beyond "
                                                      f"\u00b1{limit:.1f}%): the machine's speed changed during "
                                                      f"the run; its timings mix those speeds.", r.config_key))
        if r.is_reference:
            continue
        ref = refs.get(r.dataset)
        if r.evicts_nothing:
            flags.append(Flag("full_cache_path", f"{where}: keep_ratio 1.0 takes the full cache's code path (the "
                                                 f"press returns before any work), so any gap to the full cache is "
                                                 f"noise; it measures this run's noise, not the press.", r.config_key))
        elif r.compressed_samples == 0:
            flags.append(Flag("no_compression", _no_compression(r, where), r.config_key))
        elif r.compressed_samples is not None and r.compressed_samples < r.n_samples - r.n_failed:
            what = "prompt" if r.compress_mode == "prefill" else "prompt + new tokens"
            flags.append(Flag("partly_compressed", f"{where}: only {r.compressed_samples} of "
                                                   f"{r.n_samples - r.n_failed} samples were cut (in the others the "
                                                   f"{what} never exceeded prune_after={r.prune_after}): its values "
                                                   f"and changes mix cut and uncut samples, so they understate what "
                                                   f"the press does.", r.config_key))
        if r.paired is False and ref is not None and r.n_prompts:  # none succeeded: failed_sample says why
            flags.append(Flag("unpaired", f"{where}: its successful prompts are not the full cache's "
                                          f"({r.n_prompts} vs {ref.n_prompts}); its changes use the {_pairs(r)} prompts both have, "
                                          f"but its medians cover different prompts.", r.config_key))
        tpot_change = r.changes.get("tpot_s")
        if r.evicts_nothing and tpot_change is not None and abs(tpot_change) > NOISY_SAME_WORK_PCT:
            flags.append(Flag("noisy_timing", f"{where} evicts nothing, yet its TPOT differs from the full cache by "
                                              f"{tpot_change:+.1f}%: this run's timings were disturbed (other load "
                                              f"on the machine?). Speed changes of that size are not evidence; rerun "
                                              f"on a quiet machine with --threads pinned.", r.config_key))
        change = r.changes.get("ttft_s")
        if r.verdicts["ttft_s"] == "artifact":
            what = "not a gain" if change < 0 else "not a slower prefill"
            flags.append(Flag("ttft_artifact", f"{where}: TTFT {abs(change):.1f}% {'lower' if change < 0 else 'higher'} "
                                               f"than the full cache, beyond this run's noise (\u00b1{noise_pct:.1f}%, "
                                               f"{noise_source}). The press does nothing before the first token (no "
                                               f"hook in the prefill forward, its first cut after the first token), "
                                               f"so this is a timing artifact, {what}.", r.config_key))
    return flags


def _pairs(r: ConfigRow) -> int:
    return max(r.n_pairs.values(), default=0)


def power_flags(rows: Sequence[ConfigRow], tasks: Sequence[TaskRow]) -> list[Flag]:
    """underpowered: changes whose interval spans zero and is too wide to tell a 5% (5 pp) change."""
    needed: dict[str, int] = {}
    have: dict[str, int] = {}
    for r in rows:
        for m in METRICS:
            n = r.n_needed.get(m.name)
            if n is not None and n > needed.get(m.label, 0):
                needed[m.label], have[m.label] = n, r.n_pairs[m.name]
    for t in tasks:
        if t.n_needed is not None and not t.near_chance:
            what = f"{t.task} accuracy" + (f" ({t.subtask})" if t.subtask and t.subtask != t.task else "")
            if t.n_needed > needed.get(what, 0):
                needed[what], have[what] = t.n_needed, t.n
    if not needed:
        return []
    parts = ", ".join(f"{what} ~{n} (has {have[what]})" for what, n in needed.items())
    return [Flag("underpowered", f"too few prompts to tell a {DETECTABLE_EFFECT:g}% change ({DETECTABLE_EFFECT:g} pp "
                                 f"for fractions) where the 95% interval spans zero; prompts needed for 80% power: "
                                 f"{parts}. A 'no detectable difference' there is not evidence of no difference.")]


def few_prompts_flags(rows: Sequence[ConfigRow]) -> list[Flag]:
    """one_prompt: changes from a single prompt (no interval, no verdict: said, not left blank);
    few_prompts: intervals from fewer than MIN_PROMPTS prompts."""
    flags = []
    single = []
    for r in rows:
        if r.is_reference:
            continue
        where = r.label + (f" on {r.dataset}" if r.dataset else "")
        if _pairs(r) == 1:
            single.append(where)
        elif one := [METRIC[n].label for n, k in r.n_pairs.items() if k == 1 and r.changes.get(n) is not None]:
            single.append(f"{where} ({', '.join(one)})")  # e.g. perplexity scored on one prompt only
    single = list(dict.fromkeys(single))
    if single:
        flags.append(Flag("one_prompt", f"{', '.join(single)}: paired with the full cache on one prompt only, so "
                                        f"each change is that prompt's own, with no 95% interval and no verdict "
                                        f"(an interval over prompts needs at least 2)."))
    small = sorted({_pairs(r) for r in rows if not r.is_reference and 1 < _pairs(r) < MIN_PROMPTS})
    if small:
        flags.append(Flag("few_prompts", f"intervals here come from {', '.join(map(str, small))} prompts: with fewer "
                                         f"than {MIN_PROMPTS} a 95% interval over prompts is optimistic (even the whole "
                                         f"range of {small[0]} prompts covers their median only "
                                         f"{1 - 2 * 0.5 ** small[0]:.0%} of the time). Treat better/worse there as a "
                                         f"hint, not a finding."))
    return flags


def task_flags(tasks: Sequence[TaskRow]) -> list[Flag]:
    """near_chance: subtasks the model cannot do even with the full cache (tasks.near_chance).
    mean_left_out: a mean over subtasks that leaves out some not every configuration measured."""
    by_subtask: dict[tuple, list[TaskRow]] = defaultdict(list)
    for t in tasks:
        if t.is_reference and t.near_chance and t.subtask is not None:
            by_subtask[(t.task, t.subtask)].append(t)
    flags = []
    for (task, sub), refs in by_subtask.items():
        refs.sort(key=lambda t: t.context_length or 0)
        at = ", ".join(f"{t.accuracy:.0%}" + (f" at {t.context_length}" if t.context_length else "") for t in refs)
        lengths = [str(t.context_length) for t in refs if t.context_length is not None]
        where = f" at {', '.join(lengths)} tokens" if lengths else ""
        flags.append(Flag("near_chance", f"{task} {sub}{where}: the full cache itself is near chance (accuracy {at}), "
                                         f"so the model cannot do this task and compression results there mean "
                                         f"nothing.", refs[0].config_key))
    # from the subtask rows, not the mean rows: where fewer than 2 subtasks are common there is
    # no mean row to carry the news, and the full cache's mean is gone all the same
    left: dict[tuple, list[int | None]] = defaultdict(list)
    for (task, length), (union, common) in subtask_coverage(tasks).items():
        if len(union) > 1 and common != union:
            left[(task, tuple(sorted(union - common)), len(common) > 1)].append(length)
    for (task, subs, mean), lengths in left.items():
        at = [str(n) for n in sorted(n for n in lengths if n is not None)]
        where = f" at {', '.join(at)} tokens" if at else ""
        them = "it" if len(subs) == 1 else "them"
        why = "not every configuration measured (an interrupted run or failed cells)"
        text = (f"the mean over subtasks leaves out {', '.join(subs)}, which {why}; read {them} per subtask" if mean
                else f"no mean over subtasks: {', '.join(subs)}, which {why}, would leave fewer than 2 to average; "
                     f"read the subtasks one by one")
        flags.append(Flag("mean_left_out", f"{task}{where}: {text}."))
    return flags


def truncated_flags(samples: Sequence[Any]) -> list[Flag]:
    """truncated: LongBench prompts longer than the room (the model's context, or the asked
    length) lost the middle of their context, as LongBench's own harness does; scores there are
    of shortened documents. Per subtask: how many of its prompts, and by how many tokens at most."""
    cut: dict[str, dict[tuple, int]] = defaultdict(dict)
    for s in samples:
        if s.task in (None, "lm"):
            continue
        over = int((getattr(s, "extra_json", None) or {}).get("truncated") or 0)
        cut[s.subtask or s.task][(s.run_id, s.sample_index)] = over
    parts = []
    for sub, by_prompt in sorted(cut.items()):
        lost = [n for n in by_prompt.values() if n > 0]
        if lost:
            parts.append(f"{sub} {len(lost)} of {len(by_prompt)} (up to {max(lost)} tokens)")
    if not parts:
        return []
    tasks = ", ".join(sorted({s.task for s in samples if s.task not in (None, "lm")}))
    return [Flag("truncated", f"{tasks}: prompts longer than the context they were given lost the middle of their "
                              f"document to fit (LongBench's truncation): {'; '.join(parts)}. Their scores are of shortened "
                              f"documents, the same for every configuration.")]


def failed_flags(samples: Sequence[Any], labels: dict[str, str]) -> list[Flag]:
    """failed_sample: one per sample that stored an error."""
    flags = []
    for s in sorted((s for s in samples if s.error), key=lambda s: (s.run_id, s.sample_index, s.config_key)):
        flags.append(Flag("failed_sample", f"sample {s.sample_index} ({s.dataset}, {labels.get(s.config_key, s.config_key)}, "
                                           f"run {s.run_id}) failed: {first_line(s.error) or '(empty error)'}",
                          s.config_key))
    return flags
