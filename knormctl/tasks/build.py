"""A run's question samples from its RunConfig (the runner's entry point into tasks/).

Two steps, so that a missing Hub dataset fails before any model is loaded:
``fetch_records(cfg)`` (Hub tasks only; no tokenizer needed), then
``make_samples(cfg, tokenizer, max_positions, ...)``. Samples come in a fixed order
(length, subtask, depth, index) and each is a pure function of the config's seed, so a
resumed run rebuilds exactly the same list.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from knormctl.config import RunConfig
from knormctl.errors import UsageError
from knormctl.tasks import hub
from knormctl.tasks.prompt import PromptFormat, QuestionSample


def fetch_records(cfg: RunConfig):
    """The Hub records a run needs (None for generated tasks)."""
    if cfg.task == "longbench":
        return hub.longbench_records(cfg.subtasks, cfg.hub_dataset or hub.LONGBENCH_DATASET)
    if cfg.task == "ruler" and cfg.ruler_source == "hub":
        return hub.ruler_records(cfg.context_lengths, cfg.hub_dataset or hub.RULER_DATASET)
    return None


def make_samples(cfg: RunConfig, tokenizer, max_positions: int | None, progress: Callable[[str], None],
                 records=None) -> list[QuestionSample]:
    """Every sample of a question-task run, checked to fit the model's context."""
    fmt = PromptFormat(tokenizer, cfg.chat_template)
    if cfg.task == "passkey":
        samples = passkey_samples(cfg, tokenizer, fmt, max_positions, progress)
    elif cfg.task == "longbench":
        # a length here is the room a prompt + answer may take: longer prompts lose their middle
        lengths = cfg.context_lengths or ([max_positions] if max_positions else [])
        if not lengths:
            raise UsageError("--task longbench: the model does not say its context length; pass --context-lengths N")
        _check_lengths(lengths, max_positions)
        samples = [s for room in lengths for s in hub.longbench_samples(
            records, cfg.samples_per_task, cfg.seed, fmt, room, cfg.answer_tokens,
            cfg.hub_dataset or hub.LONGBENCH_DATASET)]
    elif cfg.task == "ruler" and cfg.ruler_source == "hub":
        samples = hub.ruler_samples(records, cfg.subtasks, cfg.samples_per_task, cfg.seed, fmt, cfg.answer_tokens,
                                    cfg.hub_dataset or hub.RULER_DATASET)
    else:
        _check_lengths(cfg.context_lengths, max_positions)
        samples = generated_samples(cfg, fmt, progress)
    for s in samples:
        total = len(s.prompt_ids) + s.max_new_tokens
        if max_positions is not None and total > max_positions:
            raise UsageError(f"{s.task} {s.subtask} sample {s.doc_id}: prompt + answer take {total} tokens, more than "
                             f"the model's context ({max_positions}); ask for shorter context lengths")
    return samples


def _check_lengths(lengths: list[int], max_positions: int | None) -> None:
    too_long = [n for n in lengths if max_positions is not None and n > max_positions]
    if too_long:
        raise UsageError(f"--context-lengths {','.join(map(str, too_long))} do not fit the model's context "
                         f"({max_positions} positions: prompt + answer must fit)")


def generated_samples(cfg: RunConfig, fmt: PromptFormat, progress: Callable[[str], None]) -> list[QuestionSample]:
    """RULER's synthetic tasks or the needle grid, from the haystack source."""
    from knormctl.tasks import niah, ruler
    from knormctl.tasks.haystack import load_haystack

    hay = load_haystack(cfg.haystack_source, progress)
    samples = []
    for length in cfg.context_lengths:
        if cfg.task == "ruler":
            for name in cfg.subtasks:
                progress(f"generating ruler {name} at {length} tokens ({cfg.samples_per_task} samples)")
                samples += [ruler.make_sample(name, fmt, hay, length, i, cfg.seed, cfg.answer_tokens)
                            for i in range(cfg.samples_per_task)]
        else:
            progress(f"generating niah at {length} tokens ({len(cfg.needle_depths)} depths)")
            samples += [niah.make_sample(fmt, hay, length, depth, i, cfg.seed, cfg.answer_tokens)
                        for depth in cfg.needle_depths for i in range(cfg.samples_per_task)]
    return samples


def passkey_samples(cfg: RunConfig, tokenizer, fmt: PromptFormat, max_positions: int | None,
                    progress: Callable[[str], None]) -> list[QuestionSample]:
    """One prompt per (filler x length x depth): filler from the haystack source, a fresh passkey each."""
    from knormctl.engine.text import make_samples as text_windows
    from knormctl.tasks.passkey import build_passkey_sample, make_passkey

    longest = max(cfg.passkey_lengths)
    new_tokens = cfg.answer_tokens or cfg.passkey_new_tokens
    if max_positions is not None and longest + new_tokens > max_positions:
        raise UsageError(f"--passkey-lengths {longest} does not fit the model's context ({max_positions})")
    fillers = text_windows(cfg.haystack_source, cfg.passkey_seeds, tokenizer, longest, 0, cfg.seed, progress=progress)
    rng = random.Random(cfg.seed)
    samples = []
    for filler in fillers:
        text = tokenizer.decode(filler.prompt_ids)
        for length in cfg.passkey_lengths:
            for depth in cfg.passkey_depths:
                samples.append(build_passkey_sample(
                    tokenizer, text, length, depth, make_passkey(rng), fmt=fmt, max_new_tokens=new_tokens,
                    dataset=f"passkey:{filler.dataset}", doc_id=filler.doc_id, doc_title=filler.doc_title,
                    char_offset=filler.char_offset))
    return samples
