"""What the task generators build, beyond what test_ruler/test_niah/test_passkey check: where
needles go, RULER's cwe/fwe mixes and chance levels, passkey keys, --answer-tokens and --seed on
every path, the Hub record choice, prompt lengths at the model's limit, question tokens, text
hashes, BOS under a chat template, and the query-aware refusal."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from knormctl.tasks import ruler
from knormctl.tasks.prompt import PromptFormat
from knormctl.tasks.scoring import string_match_all


# --- ruler: where the needles go ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["niah_single_1", "niah_multikey_1"])  # a noise and an essay haystack
def test_needles_are_spread_over_the_whole_haystack(tiny_tokenizer, fmt, hay, name):
    """Needle depths are drawn from RULER's 40 over 0..100%: across samples they reach both ends."""
    where = []
    for index in range(6):
        s = ruler.make_sample(name, fmt, hay, 1024, index, seed=7)
        text = tiny_tokenizer.decode(s.context_ids)
        body = text.split("afterwards.\n", 1)[1]
        where += [m.start() / len(body) for m in re.finditer(r"One of the special magic", body)]
    assert len(where) >= 6
    assert min(where) < 0.35 and max(where) > 0.65, sorted(where)


# --- ruler: cwe / fwe -----------------------------------------------------------------------------


def _cwe_main(tok, s) -> list[str]:
    main = tok.decode(s.context_ids).split("Below is a numbered list of words.")[-1]
    return re.findall(r"\d+\. (\S+)", main)


@pytest.mark.parametrize("length, common, uncommon", [(4095, 6, 1), (4096, 30, 3)])
def test_cwe_switches_to_rulers_heavier_mix_at_4096(hay, length, common, uncommon):
    """RULER's lighter mix is for lengths BELOW 4096 (kvpress's default length is 4096 itself).
    The generator is called directly: a 4096-token heavy-mix prompt does not fit the tiny tokenizer."""
    import random

    context, _, _, answers, _ = ruler._cwe(random.Random(0), hay, length)[0](20)
    counts = Counter(re.findall(r"\d+\. (\S+)", context.split("Below is a numbered list of words.")[-1]))
    assert {counts[w] for w in answers} == {common}
    assert {c for w, c in counts.items() if w not in answers} == {uncommon}


def test_cwe_chance_is_the_score_of_repeating_the_lists_first_ten_distinct_words(fmt, hay):
    s = ruler.make_sample("cwe", fmt, hay, 1536, 0, seed=7)
    first = list(dict.fromkeys(_cwe_main(fmt.tokenizer, s)))[:10]
    assert s.extra["chance"] == pytest.approx(string_match_all(" ".join(first), s.answers))
    assert s.extra["chance"] < 1.0  # here not every common word opens the list


def test_fwe_counts_follow_zipf_with_rulers_alpha_2(tiny_tokenizer, fmt, hay):
    s = ruler.make_sample("fwe", fmt, hay, 1536, 0, seed=7)
    n = s.extra["haystack_units"]
    text = tiny_tokenizer.decode(s.context_ids).split("coded words. ")[1].split()
    counts = Counter(text)
    for rank, word in enumerate(["...", *s.answers], start=1):
        assert counts[word] == int(n * rank ** -2.0 / ruler._ZETA_2), (rank, word, counts[word], n)


def test_fwe_chance_ignores_the_noise_dots(tiny_tokenizer, fmt, hay):
    """chance = the score of repeating the text's first 3 distinct coded words; "..." is not a word."""
    s = ruler.make_sample("fwe", fmt, hay, 1024, 0, seed=7)
    text = tiny_tokenizer.decode(s.context_ids).split("coded words. ")[1].split()
    first = [w for w in dict.fromkeys(text) if w != "..."][:3]
    assert "..." in list(dict.fromkeys(text))[:3]  # the dots open the text here: they must not count
    assert s.extra["chance"] == pytest.approx(string_match_all(" ".join(first), s.answers))


# --- niah -----------------------------------------------------------------------------------------


def test_niah_doc_id_names_the_cell_and_the_sample(fmt, hay):
    from knormctl.tasks import niah

    ids = [niah.make_sample(fmt, hay, 512, 0.5, i, seed=3).doc_id for i in range(2)]
    assert ids == ["512/0.5/0", "512/0.5/1"]  # two samples of one cell are told apart


# --- passkey and build.py -------------------------------------------------------------------------


def test_passkeys_always_have_five_digits():
    import random

    from knormctl.tasks.passkey import make_passkey

    rng = random.Random(0)
    keys = [make_passkey(rng) for _ in range(300)]
    assert all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys), [k for k in keys if len(k) != 5]


def _passkey_cfg(books_dir, **kw):
    from knormctl.config import RunConfig

    base = {"command": "sweep", "task": "passkey", "haystack": f"text:{books_dir}", "passkey_lengths": [256],
            "passkey_depths": [0.5], "passkey_seeds": 1, "chat_template": "off", "seed": 0}
    return RunConfig(**{**base, **kw})


def test_passkey_answer_tokens_overrides_the_passkey_default(tiny_tokenizer, books_dir):
    from knormctl.tasks.build import make_samples

    [default] = make_samples(_passkey_cfg(books_dir), tiny_tokenizer, None, lambda m: None)
    [asked] = make_samples(_passkey_cfg(books_dir, answer_tokens=3), tiny_tokenizer, None, lambda m: None)
    assert default.max_new_tokens == 16 and asked.max_new_tokens == 3


def test_the_catalogs_passkey_answer_length_is_the_runs_default():
    from knormctl.config import RunConfig
    from knormctl.tasks.catalog import subtask

    assert subtask("passkey").max_new_tokens == RunConfig.passkey_new_tokens  # the docs name one number


def test_passkey_seed_changes_the_key(tiny_tokenizer, books_dir):
    from knormctl.tasks.build import make_samples

    keys = {make_samples(_passkey_cfg(books_dir, seed=s, passkey_depths=[0.1, 0.5, 0.9]), tiny_tokenizer, None,
                         lambda m: None)[0].answers[0] for s in range(4)}
    assert len(keys) > 1


def test_prompt_plus_answer_exactly_filling_the_models_context_is_accepted(tiny_tokenizer, books_dir):
    """A length equal to the model's context fits (prompt + answer <= length); one more token does not."""
    from knormctl.errors import UsageError
    from knormctl.tasks.build import make_samples

    cfg = _passkey_cfg(books_dir, answer_tokens=6)
    [s] = make_samples(cfg, tiny_tokenizer, 256 + 6, lambda m: None)
    assert len(s.prompt_ids) + s.max_new_tokens == 262
    with pytest.raises(UsageError, match="does not fit the model's context"):
        make_samples(cfg, tiny_tokenizer, 261, lambda m: None)
    ruler_cfg = _passkey_cfg(books_dir, task="ruler", context_lengths=[512], subtasks=["niah_single_1"],
                             samples_per_task=1, answer_tokens=6)
    [r] = make_samples(ruler_cfg, tiny_tokenizer, 512, lambda m: None)
    assert len(r.prompt_ids) + 6 <= 512
    with pytest.raises(UsageError, match="do not fit the model's context"):
        make_samples(ruler_cfg, tiny_tokenizer, 511, lambda m: None)


# --- hub ------------------------------------------------------------------------------------------


def _ruler_rows(n=20):
    return {4096: [{"context": f"Text {i}. The magic number is 12345{i}.\n", "question": "What is the magic number?",
                    "answer_prefix": "It is", "answer": [f"12345{i}"], "task": "niah_single_1"} for i in range(n)]}


def test_hub_ruler_answer_tokens_and_seed_are_honoured(fmt):
    from knormctl.tasks import hub

    [s] = hub.ruler_samples(_ruler_rows(), ["niah_single_1"], 1, 0, fmt, answer_tokens=5)
    assert s.max_new_tokens == 5
    picked = {tuple(x.doc_id for x in hub.ruler_samples(_ruler_rows(), ["niah_single_1"], 3, seed, fmt, None))
              for seed in range(4)}
    assert len(picked) > 1  # --seed picks other records


def test_hub_records_are_taken_in_index_order(fmt):
    from knormctl.tasks import hub

    ids = [int(s.doc_id.split("/")[1]) for s in hub.ruler_samples(_ruler_rows(), ["niah_single_1"], 8, 0, fmt, None)]
    assert len(ids) == 8 and ids == sorted(ids)


# --- catalog --------------------------------------------------------------------------------------


def test_rulers_answer_lengths_are_its_tokens_to_generate():
    from knormctl.tasks.catalog import subtask

    expected = {"niah_single_1": 128, "niah_multiquery": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
    assert {n: subtask(n).max_new_tokens for n in expected} == expected


def test_chance_and_near_chance_edges():
    from types import SimpleNamespace

    from knormctl.tasks.catalog import chance_of, near_chance

    trec, qasper = SimpleNamespace(subtask="trec", extra_json=None), SimpleNamespace(subtask="qasper", extra_json=None)
    assert chance_of([trec, qasper]) is None  # one sample without a chance level: no verdict for the cell
    assert near_chance(0.95, 0.6, interval=(0.6, 0.99))  # the interval reaches down to chance exactly


# --- prompt and protocol --------------------------------------------------------------------------


def test_question_tokens_are_everything_after_the_context(fmt, hay):
    from knormctl.tasks import niah

    s = niah.make_sample(fmt, hay, 512, 0.5, 0, seed=3)
    assert len(s.suffix_ids) > 0 and s.question_tokens == len(s.prompt_ids) - len(s.context_ids)


def test_text_hash_covers_the_answers(fmt, hay):
    import dataclasses

    from knormctl.tasks import niah

    s = niah.make_sample(fmt, hay, 512, 0.5, 0, seed=3)
    assert dataclasses.replace(s, answers=["0000000"]).text_hash != s.text_hash  # resume notices a changed answer


def test_a_chat_template_prompt_gets_no_second_bos(tiny_tokenizer):
    """With a template its text holds the specials: a BOS-adding tokenizer must not add another."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = tiny_tokenizer.backend_tokenizer.__class__.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    bos = tiny_tokenizer.bos_token_id
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    plain = PromptFormat(tok, "off").pieces("Some context.", "Q?", "A:")
    chat = PromptFormat(tok, "auto").pieces("Some context.", "Q?", "A:")
    assert plain[0][0] == bos and plain[0][1] != bos  # plain: the tokenizer's own BOS
    assert chat[0][0] == bos and chat[0][1] != bos, chat[0][:3]  # template: its BOS, once
    assert bos not in plain[1] + plain[2] + chat[1] + chat[2]


def test_query_aware_refuses_a_sample_with_nothing_after_the_cut(fmt):
    from knormctl.errors import UsageError
    from knormctl.tasks.prompt import QuestionSample
    from knormctl.tasks.protocol import split

    s = QuestionSample(task="ruler", subtask="x", dataset="d", doc_id="0", doc_title=None, char_offset=None,
                       context_ids=[1, 2], question_ids=[3], suffix_ids=[], answers=["a"], metric="string_match_all",
                       max_new_tokens=2)
    with pytest.raises(UsageError, match="nothing to feed after the cut"):
        split(s, "query-aware")
