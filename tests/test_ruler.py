"""RULER's synthetic tasks: the answers are really in the prompt, the prompt is as long as
asked, the same seed gives the same sample, and RULER's scoring accepts right and refuses
wrong answers."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from knormctl.errors import UsageError
from knormctl.tasks import ruler
from knormctl.tasks.catalog import RULER_SYNTHETIC, subtask
from knormctl.tasks.haystack import Haystack
from knormctl.tasks.scoring import ruler_clean, score, string_match_all, string_match_part

LENGTH = 1536  # vt alone brings a ~500-token solved example


@pytest.fixture(scope="module")
def samples(fmt, hay):
    return {name: ruler.make_sample(name, fmt, hay, LENGTH, 0, seed=7) for name in RULER_SYNTHETIC}


def _context(tok, s) -> str:
    return tok.decode(s.context_ids)


@pytest.mark.parametrize("name", RULER_SYNTHETIC)
def test_prompt_plus_answer_fills_the_asked_length(samples, name):
    s = samples[name]
    total = len(s.prompt_ids) + s.max_new_tokens
    assert s.max_new_tokens == subtask(name).max_new_tokens and s.context_length == LENGTH
    # the haystack grows in whole units (a word, a line, a list entry): the last one may not fit
    slack = 120 if name in ("niah_multikey_2", "niah_multikey_3", "vt", "niah_single_1") else 40
    assert LENGTH - slack <= total <= LENGTH, total
    assert s.task == "ruler" and s.subtask == name and s.metric == "string_match_all" and s.answers


@pytest.mark.parametrize("name", RULER_SYNTHETIC)
def test_same_seed_same_sample_other_seed_or_index_another(fmt, hay, samples, name):
    again = ruler.make_sample(name, fmt, hay, LENGTH, 0, seed=7)
    assert again.prompt_ids == samples[name].prompt_ids and again.answers == samples[name].answers
    assert again.text_hash == samples[name].text_hash
    other_index = ruler.make_sample(name, fmt, hay, LENGTH, 1, seed=7)
    other_seed = ruler.make_sample(name, fmt, hay, LENGTH, 0, seed=8)
    assert other_index.text_hash != again.text_hash and other_seed.text_hash != again.text_hash


@pytest.mark.parametrize("name", [n for n in RULER_SYNTHETIC if n.startswith("niah")])
def test_each_needle_answer_is_in_the_context_with_its_key(tiny_tokenizer, samples, name):
    s = samples[name]
    context = _context(tiny_tokenizer, s)
    question = tiny_tokenizer.decode(s.question_ids)
    spec = ruler.NIAH[name]
    for value in s.answers:
        needles = re.findall(rf"One of the special magic {spec.type_v} for (\S+) is: {re.escape(value)}\.", context)
        assert len(needles) == 1, (value, needles)
        assert needles[0] in question  # the needle's key is what the question asks about
    assert len(s.answers) == spec.num_v * spec.num_q
    n_needles = len(re.findall(r"One of the special magic", context))
    if spec.haystack != "needle":  # multikey_2/3: the haystack itself is made of needles
        assert n_needles == max(spec.num_k, spec.num_q) * spec.num_v
    assert ("are all the special magic" in question) == (spec.num_q * spec.num_v > 1)


def test_multikey_answer_is_the_value_of_the_key_the_question_asks_about(tiny_tokenizer, fmt, hay):
    """If this fails, niah_multikey_1 scores the value of an unasked key as the right answer."""
    for index in range(6):  # the asked key is drawn per sample: several samples ask about different keys
        s = ruler.make_sample("niah_multikey_1", fmt, hay, 512, index, seed=7)
        key = re.search(r"special magic number for (\S+) mentioned", tiny_tokenizer.decode(s.question_ids)).group(1)
        needles = dict(re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.",
                                  tiny_tokenizer.decode(s.context_ids)))
        assert len(needles) == 4 and key in needles  # four keys in the text, one of them asked
        assert s.answers == [needles[key]], (index, key, s.answers, needles)


def test_variable_tracking_chain_is_in_order_and_complete(tiny_tokenizer, samples):
    s = samples["vt"]
    context = _context(tiny_tokenizer, s)
    value = re.search(r"assigned the value (\d+)", tiny_tokenizer.decode(s.question_ids)).group(1)
    names = s.answers
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    assert f"VAR {names[0]} = {value}" in context
    positions = [context.index(f"VAR {names[j + 1]} = VAR {names[j]} ") for j in range(4)]
    assert positions == sorted(positions) and context.index(f"VAR {names[0]} = {value}") < positions[0]
    # the solved example before it has its own chain, with its answer written out
    assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n", context)


def test_common_words_are_the_ten_most_frequent(tiny_tokenizer, samples):
    s = samples["cwe"]
    main = _context(tiny_tokenizer, s).split("Below is a numbered list of words.")[-1]
    counts = Counter(re.findall(r"\d+\. (\S+)", main))
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(s.answers)
    assert {counts[w] for w in s.answers} == {6}  # below 4096 tokens: 6x the common, 1x the others
    assert max(counts[w] for w in counts if w not in s.answers) == 1
    assert 0 <= s.extra["chance"] <= 1


def test_frequent_words_are_ranks_two_to_four(tiny_tokenizer, samples):
    s = samples["fwe"]
    text = _context(tiny_tokenizer, s).split("coded words. ")[1]
    counts = Counter(text.split())
    ranked = [w for w, _ in counts.most_common(4)]
    assert ranked[0] == "..." and ranked[1:] == s.answers
    assert counts[s.answers[0]] > counts[s.answers[1]] > counts[s.answers[2]]


def test_copy_chance_is_what_copying_the_lists_start_scores(tiny_tokenizer, samples):
    """The stored chance level is read back from the prompt's own text (as for a Hub record):
    cwe's first 10 distinct list words, fwe's first 3 coded words ('...' skipped)."""
    for name, k in (("cwe", 10), ("fwe", 3)):
        s = samples[name]
        listed = ruler.listed_words(name, _context(tiny_tokenizer, s))
        distinct = [w for w in dict.fromkeys(listed) if w != "..."][:k]
        assert len(distinct) == k and s.extra["chance"] == string_match_all(" ".join(distinct), s.answers)
    assert ruler.copy_chance("cwe", ["a", "b", "a", "c"], ["b", "d"]) == 0.5
    assert ruler.copy_chance("fwe", ["...", "x", "...", "y", "z", "w"], ["w", "x", "y"]) == pytest.approx(2 / 3)


def test_no_cwe_word_lies_inside_another(fmt, hay):
    """string_match_all finds an answer inside a longer word: 'step' in a predicted
    'footstep'. The list never holds both (the pool has inflected forms)."""
    assert ruler.unnested(["step", "footstep", "stepping", "plan", "steps", "airplane", "tree"]) == \
        ["step", "plan", "tree"]
    assert ruler.unnested(["footstep", "step", "steps"]) == ["footstep", "steps"]
    s = ruler.make_sample("cwe", fmt, hay, 8192, 0, seed=1)
    words = set(ruler.listed_words("cwe", fmt.tokenizer.decode(s.context_ids)))
    assert len(words) > 100
    assert not [(a, b) for a in words for b in words if a != b and a in b]


def test_cwe_from_4096_on_uses_rulers_heavier_mix(fmt, hay):
    s = ruler.make_sample("cwe", fmt, hay, 8192, 0, seed=1)  # a 512-token vocabulary needs room
    main = fmt.tokenizer.decode(s.context_ids).split("Below is a numbered list of words.")[-1]
    counts = Counter(re.findall(r"\d+\. (\S+)", main))
    assert {counts[w] for w in s.answers} == {30} and max(c for w, c in counts.items() if w not in s.answers) == 3


def test_a_length_too_short_for_the_template_is_a_clear_error(fmt, hay):
    with pytest.raises(UsageError, match="ask for a longer context length"):
        ruler.make_sample("vt", fmt, hay, 400, 0, seed=0)


def test_a_word_pool_too_small_for_cwe_is_a_clear_error(fmt):
    tiny = Haystack("text:tiny", ("The cat sat. " * 50).split(), [f"w{i:03d}" for i in range(60)])
    with pytest.raises(UsageError, match="haystack material runs out"):
        ruler.make_sample("cwe", fmt, tiny, 2048, 0, seed=0)


# --- scoring --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, refs, expected", [
    (" 1234567.", ["1234567"], 1.0),
    ("The number is 7654321", ["1234567"], 0.0),
    ("1234567, 2345678", ["1234567", "2345678", "3456789", "4567890"], 0.5),
    ("ABCDE FGHIJ", ["abcde", "fghij"], 1.0),  # case-insensitive, as RULER
    ("", ["x"], 0.0),
])
def test_string_match_all(prediction, refs, expected):
    assert string_match_all(prediction, refs) == expected
    assert score("string_match_all", prediction, refs) == expected


def test_string_match_part_and_rulers_clean_up():
    assert string_match_part("Paris, France", ["London", "paris"]) == 1.0
    assert string_match_part("Rome", ["London", "Paris"]) == 0.0
    assert ruler_clean("  a\tb\x00c \n") == "a\nb\nc"


def test_every_generated_answer_scores_one_and_a_wrong_one_less(samples):
    for name, s in samples.items():
        right = " ".join(s.answers)
        assert score(s.metric, right, s.answers) == 1.0, name
        assert score(s.metric, "I do not know.", s.answers) == 0.0, name
        if len(s.answers) > 1:
            assert score(s.metric, s.answers[0], s.answers) == pytest.approx(1 / len(s.answers))


def test_a_stored_score_is_the_answers_not_the_text_past_its_end():
    """Generation runs on past an EOS (every configuration generates the same count): the stored
    score is the answer's, so a wrong answer followed by the right number after EOS scores 0."""
    from types import SimpleNamespace

    from knormctl.config import PressConfig
    from knormctl.sample_rows import sample_fields
    from knormctl.tasks.catalog import PASSKEY_DIGITS
    from knormctl.tasks.prompt import QuestionSample

    sample = QuestionSample(task="passkey", subtask="passkey", dataset="passkey:books", doc_id="d", doc_title=None,
                            char_offset=0, context_ids=[1, 2], question_ids=[3], suffix_ids=[4], answers=["48213"],
                            metric=PASSKEY_DIGITS, max_new_tokens=8)
    res = SimpleNamespace(new_tokens=8, ttft_s=0.1, tpot_s=0.01, itl_p50_s=0.01, itl_p90_s=0.01, itl_p99_s=0.01,
                          throughput_tps=100.0, total_s=0.2, memory=SimpleNamespace(bytes=1, kind="cpu", reason=None),
                          kv_bytes_peak=1, kv_bytes_final=1, kv_entries_peak=1, kv_entries_final=1, compress_events=0,
                          compress_time_s=0.0, ppl_compressed=None, eval_tokens=None, token_ids=[5] * 8,
                          step_latencies_s=[0.01] * 7, text="11111. The pass key is 48213.")
    row = sample_fields(sample, PressConfig().validate(), res, answer="11111.")
    assert row["score"] == 0.0 and row["extra_json"]["answer"] == "11111."
    assert sample_fields(sample, PressConfig().validate(), res, answer=None)["score"] == 1.0  # no EOS: all of it


def test_the_answer_is_scored_up_to_the_first_end_of_sequence(tiny_tokenizer):
    from types import SimpleNamespace

    from knormctl.tasks.scoring import answer_text, stop_ids

    eos = tiny_tokenizer.eos_token_id
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[eos, 7]))
    assert stop_ids(tiny_tokenizer, model) == {eos, 7}
    ids = tiny_tokenizer(" 1234567.", add_special_tokens=False)["input_ids"]
    after = tiny_tokenizer(" 7654321", add_special_tokens=False)["input_ids"]
    assert answer_text(ids + [eos] + after, tiny_tokenizer, {eos}) == " 1234567."
    assert answer_text(ids + after, tiny_tokenizer, {eos}) == " 1234567. 7654321"  # no EOS: all of it
