"""Scores in [0, 1] for one answer, by the sample's ``metric`` (pure Python).

RULER's metrics follow NVIDIA/RULER ``scripts/eval/synthetic/constants.py`` and the
clean-up ``scripts/eval/evaluate.py: postprocess_pred`` (strip, control characters to
newlines), per sample instead of averaged over a task (the report averages).
LongBench's are in ``longbench.py``.
"""

from __future__ import annotations

import re

from knormctl.tasks import catalog as c
from knormctl.tasks import longbench

_CONTROL = re.compile(r"[\x00-\x1f]")


def ruler_clean(prediction: str) -> str:
    """RULER's postprocess_pred."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of the references that occur in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference occurs in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


def passkey_found(prediction: str, passkey: str) -> bool:
    """The passkey's digits appear as a number in the answer (not inside a longer number)."""
    return re.search(rf"(?<!\d){re.escape(passkey)}(?!\d)", prediction) is not None


def score(metric: str, prediction: str, answers: list[str], *, subtask: str = "", all_classes=None) -> float:
    """The score of ``prediction`` against the reference ``answers`` under ``metric``."""
    if not answers:
        raise ValueError("no reference answer to score against")
    if metric == c.STRING_MATCH_ALL:
        return string_match_all(ruler_clean(prediction), answers)
    if metric == c.STRING_MATCH_PART:
        return string_match_part(ruler_clean(prediction), answers)
    if metric == c.PASSKEY_DIGITS:
        return float(passkey_found(prediction, answers[0]))
    if metric in longbench.METRICS:
        return longbench.score(subtask, metric, prediction, answers, all_classes)
    raise ValueError(f"unknown score metric {metric!r}")


def answer_text(token_ids: list[int], tokenizer, stop_ids: set[int]) -> str:
    """The answer as scored: the generated tokens up to the first end-of-sequence token.

    The generation loop never stops early (every configuration generates the same count,
    so timings compare); kvpress, RULER and LongBench stop at EOS, so what follows it is
    not part of the answer.
    """
    for i, t in enumerate(token_ids):
        if t in stop_ids:
            token_ids = token_ids[:i]
            break
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def stop_ids(tokenizer, model_config=None) -> set[int]:
    """EOS ids of the tokenizer and (if given) the model's generation config."""
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model_config, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids
