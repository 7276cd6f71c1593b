"""The plan of a run: which cells (sample x configuration x round) it measures, in what
order, which of them run together as a batch, and the untimed warm-up before them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from knormctl.config import PressConfig
from knormctl.errors import UsageError
from knormctl.launch import parse_shard

# Warm-up (untimed, before the first timed cell), on the longest prompt: the full cache for
# the run's whole token count -- the largest cache sizes the run will allocate, so the
# device's memory pool holds them -- then every other planned configuration for
# WARMUP_TOKENS tokens (its own kernels: the cut, its decode shapes). Measured in
# docs/engine.md.
WARMUP_TOKENS = 16


def warm_up_plan(configs: list[PressConfig], new_tokens: int) -> list[tuple[PressConfig, int]]:
    """(configuration, tokens) of the warm-up generations, in order."""
    plan = [(pc, new_tokens if pc.is_baseline else min(WARMUP_TOKENS, new_tokens)) for pc in configs]
    return sorted(plan, key=lambda p: not p[0].is_baseline)  # the full cache first: it sizes the pool


@dataclass
class Cell:
    sample_index: int
    config: PressConfig
    repeat: int = 0  # measurement round of the same (sample, configuration); 0 = the first


def plan_cells(n_samples: int, configs: list[PressConfig], shard: str | None = None,
               repeats: int = 1) -> list[Cell]:
    """This shard's cells: every configuration of each of its samples, round after round.

    A shard holds whole samples (shard I of N: samples I-1, I-1+N, ...), so a prompt's
    compressed runs and its full-cache reference are measured on the same machine, in the
    same process, and pair. Rounds (``repeats``) are outermost, so two rounds of a cell are
    far apart in time: a drift or a cold start shows up as rounds that disagree. The order of
    configurations rotates with the sample and the round, so no configuration keeps a slot.
    """
    k, total = parse_shard(shard) if shard else (1, 1)
    n = len(configs)
    cells = []
    for r in range(repeats):
        for i in range(k - 1, n_samples, total):
            cells.extend(Cell(i, configs[(i + r + j) % n], r) for j in range(n))
    return cells


def check_shard_has_samples(n_samples: int, shard: str | None) -> None:
    """A shard with no sample of its own is refused (one line) before it runs or is planned."""
    k, total = parse_shard(shard) if shard else (1, 1)
    if k > n_samples:
        raise UsageError(f"--shard {shard} gets no samples: the run has {n_samples} sample(s), "
                         f"so use at most {n_samples} shard(s)")


def plan_batches(cells: list[Cell], batch_size: int, shape_of: Callable[[int], tuple]) -> list[list[Cell]]:
    """The cells grouped into the batches that run together (``--batch-size``; 1: one cell each).

    A batch is up to ``batch_size`` samples of the same shape (``shape_of(sample_index)``: prompt
    and question lengths and new tokens -- no padding, so only equal lengths batch), under one
    configuration and round. Samples are grouped by shape in their order and cut into runs of
    ``batch_size``; a group's last batch may be smaller (lm samples of one dataset share their
    length; question tasks group by length, so odd lengths run in smaller batches). The order
    of configurations still rotates, now from batch to batch.
    """
    if batch_size == 1:
        return [[c] for c in cells]
    order = list(dict.fromkeys(c.sample_index for c in cells))  # this shard's samples, in order
    groups: dict[tuple, list[int]] = {}
    for i in order:
        groups.setdefault(shape_of(i), []).append(i)
    runs = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    configs = list(dict.fromkeys(c.config.key for c in cells))
    by_key = {c.config.key: c.config for c in cells}
    repeats = sorted({c.repeat for c in cells})
    n = len(configs)
    return [[Cell(i, by_key[configs[(k + r + j) % n]], r) for i in rows]
            for r in repeats for k, rows in enumerate(runs) for j in range(n)]


def refuse_keep_recent_over_budget(recent: int, configs: list[PressConfig], shortest: int, longest: int,
                                   exact: bool = True) -> None:
    """--keep-recent N marks the newest N entries as kept; where N reaches a cut's whole budget
    every press keeps the same newest entries, and a table of 'different' presses would compare
    one recency window with itself. Refused with the budget it would need to stay under.
    ``shortest``: the shortest prompt a prefill cut compresses; ``longest``: the longest prompt
    with its new tokens. ``exact``: False when ``shortest`` is only an upper bound (planned
    lengths of a question task): the budget then is at most the one named."""
    if not recent:
        return
    from knormctl.engine.compress import n_keep_for

    for pc in configs:
        if pc.is_baseline or pc.keep_ratio >= 1.0 or longest <= pc.prune_after:  # (never cut: flagged apart)
            continue
        # prefill: one cut of the prompt; decode: every cut once the cache passes prune_after
        at = shortest if pc.mode == "prefill" else max(pc.prune_after + 1, 2)
        budget = n_keep_for(at, pc.keep_ratio)
        if recent >= budget:
            most = "" if exact or pc.mode != "prefill" else "at most "
            raise UsageError(f"--keep-recent {recent} covers the whole budget of {pc.spec} keep {pc.keep_ratio:g} "
                             f"({most}{budget} of {at} entries kept per cut): every press would keep the same "
                             f"newest entries; use --keep-recent below {budget} (or the streaming press)")


def planned_lengths(cfg) -> tuple[int, int, bool] | None:
    """(shortest prompt, longest prompt + new tokens, exact) as planned, before any text is
    read, for ``refuse_keep_recent_over_budget``, which must refuse only what the run would:
    exact for the lm task (its windows hold exactly the tokens asked for). A generated question
    task's prompt fits in each length asked for, which bounds the shortest from above; how
    long the longest is nobody knows before it is built, so it is taken as 1 (a run there is
    refused only where it cuts whatever the length: prune_after 0). None where the data sets
    the lengths (Hub records, LongBench)."""
    if cfg.task == "lm":
        lengths = ([cfg.wikitext_prompt_tokens] if cfg.num_wikitext_samples else []) + (
            [cfg.max_prompt_tokens] if cfg.num_pg19_samples else [])
        return (min(lengths), max(lengths) + cfg.max_new_tokens, True) if lengths else None
    if cfg.task == "passkey":
        lengths = cfg.passkey_lengths
    elif cfg.task in ("niah", "ruler") and not (cfg.task == "ruler" and cfg.ruler_source == "hub"):
        lengths = cfg.context_lengths
    else:
        return None
    return (min(lengths), 1, False) if lengths else None

