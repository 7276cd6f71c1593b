"""The same tasks from the Hugging Face Hub, through ``datasets``.

RULER: kvpress's ``simonjegou/ruler`` (config = context length, e.g. "4096"; split
"test"), made with RULER's own scripts and Llama-3.1's tokenizer, with the prompts
already split into ``context`` / ``question`` / ``answer_prefix``, ``answer`` (a list)
and ``task`` (niah_single_1 ... qa_2). A config's length was counted with Llama-3.1's
tokenizer, so in another tokenizer a prompt may be longer or shorter than the config.

LongBench: ``Xnhyacinth/LongBench`` by default -- kvpress's and lm-evaluation-harness's
Parquet copy of THUDM's set (config = dataset name, e.g. "qasper"), with the same split
fields. ``THUDM/LongBench`` itself is a loading-script dataset, which ``datasets`` >= 4
no longer runs; records in its original shape (``context``/``input``) are accepted too,
e.g. from a local copy (``--hub-dataset PATH``). Prompts longer than the room the model
has are cut in the middle of the context (LongBench's pred.py keeps the start and the
end, where the instructions are).

Offline (no Hub, nothing in the datasets cache) every load fails at once with one line
naming the offline alternatives. ``LOAD`` is the one call that reaches ``datasets``:
tests replace it with tiny in-memory records and go through the same code.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable

from knormctl.errors import UsageError
from knormctl.tasks import catalog as c
from knormctl.tasks import longbench
from knormctl.tasks.prompt import PromptFormat, QuestionSample
from knormctl.tasks.ruler import copy_chance, listed_words

RULER_DATASET = "simonjegou/ruler"
LONGBENCH_DATASET = "Xnhyacinth/LongBench"
OFFLINE_HINT = ("offline, use --task ruler (generated here: --haystack wiki-lite-long or text:PATH), "
                "--task niah or --task passkey")


def _load_dataset(name: str, config: str):
    import datasets

    return datasets.load_dataset(name, config, split="test")


LOAD: Callable[[str, str], object] = _load_dataset


def records(name: str, config: str) -> list[dict]:
    """All records of one config of a Hub dataset; no Hub and no cache: one clear AssetError."""
    from knormctl.engine.text.hub import hub_iter as _hub_iter  # the Hub probe and one-line failure, shared

    return list(_hub_iter(f"{name} ({config})", OFFLINE_HINT, lambda: LOAD(name, config)))


def _pick(rows: list[dict], n: int, seed: int, what: str) -> list[tuple[int, dict]]:
    """``n`` records chosen from ``seed`` (all of them when there are fewer), in index order."""
    chosen = sorted(random.Random(f"{seed}|{what}").sample(range(len(rows)), min(n, len(rows))))
    return [(i, rows[i]) for i in chosen]


def ruler_records(lengths: list[int], name: str = RULER_DATASET) -> dict[int, list[dict]]:
    """kvpress's RULER records per context length (fetched before the model is loaded)."""
    return {length: records(name, str(length)) for length in lengths}


def ruler_samples(rows_by_length: dict[int, list[dict]], subtasks: list[str], per_task: int, seed: int,
                  fmt: PromptFormat, answer_tokens: int | None, dataset: str = RULER_DATASET) -> list[QuestionSample]:
    samples = []
    for length, rows in rows_by_length.items():
        by_task: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_task[r["task"]].append(r)
        missing = [s for s in subtasks if s not in by_task]
        if missing:
            raise UsageError(f"{dataset} ({length}) has no {', '.join(missing)} (it has {', '.join(sorted(by_task))})")
        for name in subtasks:
            spec = c.subtask(name)
            for i, r in _pick(by_task[name], per_task, seed, f"{dataset}|{length}|{name}"):
                ctx, q, suffix = fmt.pieces(r["context"], r["question"].strip(), r["answer_prefix"].strip())
                samples.append(QuestionSample(
                    task="ruler", subtask=name, dataset=f"{dataset}:{length}", doc_id=f"{name}/{i}", doc_title=None,
                    char_offset=None, context_ids=ctx, question_ids=q, suffix_ids=suffix, answers=list(r["answer"]),
                    metric=spec.metric, max_new_tokens=answer_tokens or spec.max_new_tokens, context_length=length,
                    extra=_copy_chance(name, r)))
    return samples


def _copy_chance(name: str, record: dict) -> dict:
    """cwe/fwe: the chance level read from the record's list (``{}`` for the other subtasks:
    their catalog level holds). A record whose list cannot be read gets None: no verdict,
    rather than the 0 that would make any score look far above chance."""
    if name not in ("cwe", "fwe"):
        return {}
    listed = listed_words(name, record["context"])
    return {"chance": copy_chance(name, listed, list(record["answer"])) if listed else None}


def longbench_records(subtasks: list[str], name: str = LONGBENCH_DATASET) -> dict[str, list[dict]]:
    return {s: records(name, s) for s in subtasks}


def longbench_samples(rows_by_task: dict[str, list[dict]], per_task: int, seed: int, fmt: PromptFormat,
                      room: int, answer_tokens: int | None, dataset: str = LONGBENCH_DATASET) -> list[QuestionSample]:
    """``room``: the most tokens prompt + answer may take (the model's context, or the asked
    length); longer prompts lose the middle of their context."""
    samples = []
    for name, rows in rows_by_task.items():
        spec = c.subtask(name)
        new = answer_tokens or spec.max_new_tokens
        for i, r in _pick(rows, per_task, seed, f"{dataset}|{name}"):
            ctx, q, suffix = fmt.pieces(*longbench.prompt_texts(name, r))
            over = len(ctx) + len(q) + len(suffix) + new - room
            if over > 0:
                keep = len(ctx) - over
                if keep < 2:
                    raise UsageError(f"longbench {name}: record {i}'s question alone does not fit {room} tokens")
                ctx = ctx[:keep // 2] + ctx[len(ctx) - (keep - keep // 2):]
            answers = r.get("answers") or r.get("answer")
            samples.append(QuestionSample(
                task="longbench", subtask=name, dataset=f"{dataset}:{name}", doc_id=str(r.get("_id", i)),
                doc_title=None, char_offset=None, context_ids=ctx, question_ids=q, suffix_ids=suffix,
                answers=list(answers), metric=spec.metric, max_new_tokens=new, context_length=room,
                extra={"all_classes": list(r.get("all_classes") or []), "length": r.get("length"),
                       "truncated": max(0, over), "chance": spec.chance}))
    return samples
