"""The passkey builder puts the key at the asked depth; the scorer accepts exactly the key."""

from __future__ import annotations

import pytest

from knormctl.engine.passkey import INTRO, NEEDLE, QUESTION, build_passkey_sample, is_correct
from knormctl.errors import UsageError


@pytest.fixture(scope="module")
def filler(books_dir):
    return (books_dir / "emma.txt").read_text(encoding="utf-8")[:60_000]


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_sits_at_the_asked_depth_in_a_prompt_of_the_asked_length(tiny_tokenizer, filler, depth):
    s = build_passkey_sample(tiny_tokenizer, filler, 512, depth, "48213")
    assert len(s.prompt_ids) == 512 and s.passkey == "48213" and s.depth == depth
    needle = tiny_tokenizer(NEEDLE.format(key="48213"), add_special_tokens=False)["input_ids"]
    at = s.needle_token_index
    assert s.prompt_ids[at:at + len(needle)] == needle
    assert tiny_tokenizer.decode(s.prompt_ids).endswith(QUESTION)
    # the needle's position among the filler tokens is depth x the filler's length (to one token)
    intro, tail = _n_tokens(tiny_tokenizer, INTRO), _n_tokens(tiny_tokenizer, QUESTION)
    filler_tokens = 512 - intro - len(needle) - tail
    assert abs((at - intro) - depth * filler_tokens) <= 1


def test_different_keys_give_different_prompts(tiny_tokenizer, filler):
    a = build_passkey_sample(tiny_tokenizer, filler, 256, 0.5, "11111")
    b = build_passkey_sample(tiny_tokenizer, filler, 256, 0.5, "22222")
    assert a.text_hash != b.text_hash and a.prompt_ids != b.prompt_ids


def test_too_short_or_not_enough_filler_is_a_clear_error(tiny_tokenizer, filler):
    with pytest.raises(UsageError, match="too short"):
        build_passkey_sample(tiny_tokenizer, filler, 20, 0.5, "12345")
    with pytest.raises(UsageError, match="filler text has"):
        build_passkey_sample(tiny_tokenizer, "a few words only", 256, 0.5, "12345")


@pytest.mark.parametrize("answer,ok", [
    (" 48213.", True), (" 48213", True), ("The pass key is 48213. Remember", True), ("48213", True),
    (" 4821", False), (" 148213", False), (" 482130", False), (" 48 213", False), ("", False),
    (" 12345. The pass key is", False),
])
def test_scorer_accepts_exactly_the_key(answer, ok):
    assert is_correct(answer, "48213") is ok
