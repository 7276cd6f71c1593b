"""Passkey retrieval (the KnormPress paper's headline task).

A long filler context from a real text source, a random 5-digit passkey sentence
inserted at a given depth, and a question at the end. The answer is greedy; it is
correct when the passkey's digits appear in it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from knormctl.errors import UsageError

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class PasskeySample:
    """Same shape as a text sample (the runner stores both alike) plus the task's fields."""

    dataset: str
    doc_id: str
    doc_title: str | None
    char_offset: int
    text_hash: str
    prompt_ids: list[int]
    passkey: str
    depth: float
    length: int
    needle_token_index: int
    eval_ids: list[int] = field(default_factory=list)


def make_passkey(rng: random.Random) -> str:
    return f"{rng.randrange(10000, 100000)}"


def build_passkey_sample(tokenizer, filler: str, length: int, depth: float, passkey: str, *,
                         dataset: str = "passkey", doc_id: str = "", doc_title: str | None = None,
                         char_offset: int = 0) -> PasskeySample:
    """Prompt of exactly ``length`` tokens with the needle at ``depth`` (0 = start, 1 = end) of the filler."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, needle, tail = enc(INTRO), enc(NEEDLE.format(key=passkey)), enc(QUESTION)
    n_filler = length - len(head) - len(needle) - len(tail)
    if n_filler < 1:
        raise UsageError(f"passkey length {length} is too short: the question and the needle alone take "
                         f"{len(head) + len(needle) + len(tail)} tokens")
    filler_ids = enc(filler)
    if len(filler_ids) < n_filler:
        raise UsageError(f"filler text has {len(filler_ids)} tokens, {n_filler} needed")
    filler_ids = filler_ids[:n_filler]
    cut = round(depth * n_filler)
    ids = head + filler_ids[:cut] + needle + filler_ids[cut:] + tail
    text_hash = hashlib.sha256(str(ids).encode()).hexdigest()[:16]
    return PasskeySample(dataset=dataset, doc_id=doc_id, doc_title=doc_title, char_offset=char_offset,
                         text_hash=text_hash, prompt_ids=ids, passkey=passkey, depth=depth, length=length,
                         needle_token_index=len(head) + cut)


def is_correct(answer: str, passkey: str) -> bool:
    """The passkey's digits appear as a number in the answer (not inside a longer number)."""
    return re.search(rf"(?<!\d){re.escape(passkey)}(?!\d)", answer) is not None
