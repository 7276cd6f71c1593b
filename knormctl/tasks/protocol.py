"""What a question task compresses: the protocol, stored with every run and sample.

The prompt is ``context | question | suffix`` (suffix = separator + answer prefix; see
``prompt.py``). The generation loop prefills the first part, applies the press (the
post-prefill cut), then feeds the second part uncompressed in one forward and takes the
first answer token from it, so every answer token sees the compressed cache
(``engine/loop.run_generation(..., question_ids=...)``).

``context`` (the default) -- kvpress's pipeline (``kvpress/pipeline.py``: the press is
    active while ``context_ids`` are prefilled; ``generate_answer`` then feeds the
    question + answer prefix with the press off). Compressed: the context. Never
    compressed: question, separator, answer prefix. This is the question-agnostic
    setting (the question may come later, as in a multi-turn chat).
``query-aware`` -- kvpress's ``evaluation/evaluate.py`` with ``query_aware: true``
    (older releases: ``compress_questions``): ``context = context + question`` and the
    question becomes empty, so the question is prefilled and compressed with the
    context; only the separator (chat template's assistant header) and answer prefix are
    fed after the cut. Query-aware presses (SnapKV & co.) see the question here.
``paper`` -- the KnormPress paper's own passkey code (alessiodevoto/l2compress,
    ``gen_utils.generate_with_context`` as called by ``eval_passkey.py``): the whole
    prompt, question included, is prefilled; the first answer token is taken from that
    prefill's logits, BEFORE the cut; the cache is then compressed once and the rest of
    the answer decoded from it. So the first token never sees compression -- for a
    5-digit passkey that is often the first digits of the answer.

The token sequence is identical under the three protocols; only the split differs.
"""

from __future__ import annotations

from knormctl.errors import UsageError
from knormctl.tasks.catalog import PROTOCOLS


def split(sample, protocol: str) -> tuple[list[int], list[int] | None]:
    """(ids prefilled and then compressed, ids fed after the cut) for ``run_generation``
    (``input_ids``, ``question_ids``). ``paper`` feeds nothing after the cut (None): the
    loop then takes the first token from the prefill, before the cut."""
    if protocol == "context":
        return sample.context_ids, sample.question_ids + sample.suffix_ids
    if protocol == "query-aware":
        if not sample.suffix_ids:  # the loop would fall back to the paper's first token
            raise UsageError(f"query-aware: sample {sample.subtask!r} has nothing to feed after the cut")
        return sample.context_ids + sample.question_ids, sample.suffix_ids
    if protocol == "paper":
        return sample.prompt_ids, None
    raise UsageError(f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
