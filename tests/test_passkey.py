"""The passkey builder puts the key at the asked depth; the scorer accepts exactly the key."""

from __future__ import annotations

import pytest

from knormctl.errors import UsageError
from knormctl.tasks.passkey import ANSWER_PREFIX, INTRO, NEEDLE, QUESTION, build_passkey_sample, is_correct
from knormctl.tasks.prompt import PromptFormat


@pytest.fixture(scope="module")
def filler(books_dir):
    return (books_dir / "emma.txt").read_text(encoding="utf-8")[:60_000]


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_sits_at_the_asked_depth_in_a_prompt_of_the_asked_length(tiny_tokenizer, filler, depth):
    s = build_passkey_sample(tiny_tokenizer, filler, 512, depth, "48213")
    assert len(s.prompt_ids) == 512 and s.answers == ["48213"] and s.needle_depth == depth
    assert s.task == s.subtask == "passkey" and s.metric == "passkey_digits" and s.context_length == 512
    needle = tiny_tokenizer(NEEDLE.format(key="48213"), add_special_tokens=False)["input_ids"]
    at = s.extra["needle_token_index"]
    assert s.context_ids[at:at + len(needle)] == needle  # the needle is in the part that may be compressed
    assert tiny_tokenizer.decode(s.question_ids) == QUESTION
    assert tiny_tokenizer.decode(s.suffix_ids) == "\n" + ANSWER_PREFIX  # plain format: newline, answer prefix
    # the needle's position among the filler tokens is depth x the filler's length (to one token)
    intro = _n_tokens(tiny_tokenizer, INTRO)
    filler_tokens = len(s.context_ids) - intro - len(needle)
    assert abs((at - intro) - depth * filler_tokens) <= 1


def test_different_keys_give_different_prompts(tiny_tokenizer, filler):
    a = build_passkey_sample(tiny_tokenizer, filler, 256, 0.5, "11111")
    b = build_passkey_sample(tiny_tokenizer, filler, 256, 0.5, "22222")
    assert a.text_hash != b.text_hash and a.prompt_ids != b.prompt_ids


def test_chat_template_wraps_context_and_question_and_opens_the_answer(tiny_tokenizer, filler):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    s = build_passkey_sample(tok, filler, 512, 0.5, "48213", fmt=PromptFormat(tok, "auto"))
    assert len(s.prompt_ids) == 512
    assert tok.decode(s.context_ids).startswith("<|im_start|>user\n" + INTRO)
    assert tok.decode(s.suffix_ids) == "<|im_end|>\n<|im_start|>assistant\n" + ANSWER_PREFIX
    with pytest.raises(UsageError, match="no chat template"):
        PromptFormat(tiny_tokenizer, "on")


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
