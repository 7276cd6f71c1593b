"""The needle grid: the needle is at the asked depth, the prompt is as long as asked, the
same seed gives the same sample, and the scorer accepts exactly the needle's value."""

from __future__ import annotations

import random
import re

import pytest

from knormctl.tasks import niah
from knormctl.tasks.haystack import Haystack, insert_at_depths, is_sentence_start, sentence_starts
from knormctl.tasks.scoring import score


def _needle_position(tok, s) -> tuple[int, int, int]:
    """(first token of the needle, first and last token of the haystack) in the context."""
    needle = tok(s.extra["needle"], add_special_tokens=False)["input_ids"]
    ids = s.context_ids
    head = len(tok(niah.HEAD, add_special_tokens=False)["input_ids"])
    for at in range(len(ids)):
        # the needle's own tokens (the first may merge with the space before it)
        if ids[at + 1:at + len(needle) - 1] == needle[1:-1]:
            return at, head, len(ids) - 1  # the context ends with "\n"
    raise AssertionError("needle not found in the context tokens")


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_the_asked_depth(tiny_tokenizer, fmt, hay, length, depth):
    s = niah.make_sample(fmt, hay, length, depth, 0, seed=3)
    at, start, end = _needle_position(tiny_tokenizer, s)
    needle_len = len(tiny_tokenizer(s.extra["needle"], add_special_tokens=False)["input_ids"])
    haystack_tokens = end - start - needle_len
    # depth counts the haystack before the needle; it moves to the nearest sentence end (a
    # sentence of Austen is up to ~100 tokens of this 512-token vocabulary)
    assert abs((at - start) - depth * haystack_tokens) <= 110, (at - start, depth * haystack_tokens)
    assert s.needle_depth == depth and s.context_length == length
    assert length - 40 <= len(s.prompt_ids) + s.max_new_tokens <= length
    assert s.answers[0] in s.extra["needle"] and s.answers[0] not in tiny_tokenizer.decode(s.question_ids)


def test_depth_zero_opens_and_depth_one_closes_the_haystack(tiny_tokenizer, fmt, hay):
    first = tiny_tokenizer.decode(niah.make_sample(fmt, hay, 1024, 0.0, 0, seed=3).context_ids)
    last = tiny_tokenizer.decode(niah.make_sample(fmt, hay, 1024, 1.0, 0, seed=3).context_ids)
    assert first.startswith(niah.HEAD + "One of the special magic numbers for ")
    assert last.rstrip("\n").endswith(".") and "One of the special magic numbers" in last[-120:]


def test_same_seed_same_sample(fmt, hay):
    a = niah.make_sample(fmt, hay, 1024, 0.5, 0, seed=3)
    b = niah.make_sample(fmt, hay, 1024, 0.5, 0, seed=3)
    c = niah.make_sample(fmt, hay, 1024, 0.5, 0, seed=4)
    d = niah.make_sample(fmt, hay, 1024, 0.5, 1, seed=3)
    assert a.prompt_ids == b.prompt_ids and a.answers == b.answers
    assert len({a.text_hash, c.text_hash, d.text_hash}) == 3


def test_scored_right_and_wrong(fmt, hay):
    s = niah.make_sample(fmt, hay, 1024, 0.5, 0, seed=3)
    value = s.answers[0]
    assert score(s.metric, f" {value}.", s.answers) == 1.0
    assert score(s.metric, f" {value[:-1]}", s.answers) == 0.0
    assert score(s.metric, " 1234567", s.answers) == (1.0 if value == "1234567" else 0.0)


def _words(n_sentences=60):
    words = []
    for i in range(n_sentences):
        words += ["The", f"word{i}", "goes", "on", "and", "on", f"end{i}."]
    return words


def test_each_sample_starts_at_a_sentence_start():
    hay = Haystack("test", _words(), ["pool"])
    starts = set()
    for seed in range(40):
        i = hay.sentence_start(random.Random(seed))
        assert is_sentence_start(hay.words, i), (seed, i, hay.words[i - 1:i + 1])
        starts.add(i)
    assert len(starts) > 5  # seeded: samples start at different sentences


def test_a_title_or_an_initial_does_not_end_a_sentence():
    """A needle must not land inside a name: 'Mr.', 'Mrs.', 'Dr.', 'St.' or an initial
    followed by a capital is not a sentence boundary; a real end before it still is."""
    words = "He met Mr. Knightley and Mrs. Weston. Then Dr. Perry and J. Smith came. \u201cSt. Paul's!\u201d Done.".split()
    starts = [words[i] for i in sentence_starts(words)[:-1]]
    assert starts == ["He", "Then", "\u201cSt.", "Done."]
    text = insert_at_depths(words, [(d / 10, "NEEDLE") for d in range(11)])
    assert not re.search(r"(Mr|Mrs|Dr|J)\. NEEDLE", text)


def test_take_wraps_around_at_the_end_of_the_haystack():
    words = [f"w{i}" for i in range(10)]
    hay = Haystack("test", words, [])
    assert hay.take(8, 5) == ["w8", "w9", "w0", "w1", "w2"]
    assert hay.take(2, 3) == ["w2", "w3", "w4"]
    assert len(hay.take(9, 25)) == 25  # a context longer than the source repeats it
