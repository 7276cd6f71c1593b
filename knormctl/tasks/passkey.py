"""Passkey retrieval (the KnormPress paper's headline task).

A long filler context from a real text source, a random 5-digit passkey sentence
inserted at a given depth, and a question at the end (the wording of the paper's
``eval_passkey.py``, alessiodevoto/l2compress). Correct when the passkey's digits appear
in the answer as a number -- the paper compares the first answer tokens with the key's
tokens instead, which fails an answer that starts with a space or a word.

Which part is compressed is the run's protocol (protocol.py); the paper's own code
corresponds to ``paper``.
"""

from __future__ import annotations

import random

from knormctl.errors import UsageError
from knormctl.tasks import catalog as c
from knormctl.tasks.prompt import PromptFormat, QuestionSample
from knormctl.tasks.scoring import passkey_found as is_correct  # noqa: F401  (the scorer, by its old name)

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"


def make_passkey(rng: random.Random) -> str:
    return f"{rng.randrange(10000, 100000)}"


def build_passkey_sample(tokenizer, filler: str, length: int, depth: float, passkey: str, *,
                         fmt: PromptFormat | None = None, max_new_tokens: int | None = None,
                         dataset: str = "passkey", doc_id: str = "", doc_title: str | None = None,
                         char_offset: int = 0) -> QuestionSample:
    """Prompt of exactly ``length`` tokens with the needle at ``depth`` (0 = start, 1 = end) of the filler.

    ``fmt``: the prompt format (default: plain text, no chat template).
    """
    fmt = fmt or PromptFormat(tokenizer, "off")
    head = fmt.encode(fmt.head + INTRO, first=True)
    needle = fmt.encode(NEEDLE.format(key=passkey))
    question = fmt.encode(QUESTION)
    suffix = fmt.encode(fmt.separator + ANSWER_PREFIX)
    fixed = len(head) + len(needle) + len(question) + len(suffix)
    n_filler = length - fixed
    if n_filler < 1:
        raise UsageError(f"passkey length {length} is too short: the question and the needle alone take {fixed} tokens")
    filler_ids = fmt.encode(filler)
    if len(filler_ids) < n_filler:
        raise UsageError(f"filler text has {len(filler_ids)} tokens, {n_filler} needed")
    filler_ids = filler_ids[:n_filler]
    cut = round(depth * n_filler)
    spec = c.subtask("passkey")
    return QuestionSample(
        task="passkey", subtask="passkey", dataset=dataset, doc_id=doc_id, doc_title=doc_title,
        char_offset=char_offset, context_ids=head + filler_ids[:cut] + needle + filler_ids[cut:],
        question_ids=question, suffix_ids=suffix, answers=[passkey], metric=spec.metric,
        max_new_tokens=max_new_tokens or spec.max_new_tokens, context_length=length, needle_depth=depth,
        extra={"needle_token_index": len(head) + cut})
