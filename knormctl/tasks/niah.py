"""The classic needle-in-a-haystack grid: one needle per prompt, at each depth x length.

The grid is Kamradt's (needle depth as a fraction of the context x context length, one
heat-map cell each); the prompt and scoring are RULER's single-needle task
(``niah_single_2``: a real-text haystack, a word-pair key, a 7-digit value,
``string_match_all``) rather than Kamradt's San Francisco sentence judged by an LLM, so
scoring needs no second model. Depth counts haystack words (0 = the needle opens the
haystack, 1 = it closes it); the needle goes to the nearest sentence boundary. A length
counts prompt + answer tokens, as in RULER.
"""

from __future__ import annotations

import random

from knormctl.tasks import catalog as c
from knormctl.tasks.haystack import Haystack, insert_at_depths
from knormctl.tasks.prompt import PromptFormat, QuestionSample, fit
from knormctl.tasks.ruler import NEEDLE

HEAD = ("A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n")


def make_sample(fmt: PromptFormat, hay: Haystack, length: int, depth: float, index: int, seed: int,
                max_new_tokens: int | None = None) -> QuestionSample:
    """Sample ``index`` of the (depth, length) cell."""
    spec = c.subtask("niah")
    new = max_new_tokens or spec.max_new_tokens
    rng = random.Random(f"niah|{seed}|{length}|{depth!r}|{index}")
    a, b = hay.pool_sample(rng, 2, "a needle key")
    key, value = f"{a}-{b}", str(rng.randint(10**6, 10**7 - 1))
    needle = NEEDLE.format(type_v="numbers", key=key, value=value)
    start = hay.sentence_start(rng)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    prefix = f"The special magic number for {key} mentioned in the provided text is"

    def build(n: int):
        return HEAD + insert_at_depths(hay.take(start, n), [(depth, needle)]) + "\n", question, prefix

    n, (context, question, prefix) = fit(build, fmt, length - new, 200, f"niah at {length} tokens")
    ctx, q, suffix = fmt.pieces(context, question, prefix)
    return QuestionSample(task="niah", subtask="niah", dataset=f"niah:{hay.source}", doc_id=f"{length}/{depth:g}/{index}",
                          doc_title=None, char_offset=None, context_ids=ctx, question_ids=q, suffix_ids=suffix,
                          answers=[value], metric=spec.metric, max_new_tokens=new, context_length=length,
                          needle_depth=depth, extra={"needle": needle, "haystack_units": n})
