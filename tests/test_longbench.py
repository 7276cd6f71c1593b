"""LongBench's metrics (pure Python, pinned to values of LongBench's own code) and the Hub
path: tiny records built here go through the same loader code as the real datasets."""

from __future__ import annotations

import pytest

from knormctl.errors import AssetError, UsageError
from knormctl.tasks import hub, longbench
from knormctl.tasks.prompt import PromptFormat
from knormctl.tasks.scoring import score

# --- metrics: expected values are what LongBench's metrics.py (with rouge 1.0.1 and fuzzywuzzy
# 0.18.0, no python-Levenshtein) returns for the same inputs; the comments show the arithmetic.


def test_qa_f1_normalises_like_squad():
    assert longbench.qa_f1("The Eiffel Tower!", "eiffel tower") == 1.0  # articles, case, punctuation go
    # prediction {paris, france}, truth {paris}: p = 1/2, r = 1 -> 2/3
    assert longbench.qa_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert longbench.qa_f1("London", "Paris") == 0.0


def test_rouge_l_is_the_rouge_packages_set_based_summary_level_f():
    assert longbench.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0, abs=1e-7)
    # one sentence each; LCS words {the, cat, mat}; words counted as sets: hyp {the, cat, ate, mat} = 4,
    # ref {the, cat, sat, on, mat} = 5 -> p = 3/4, r = 3/5, f = 2pr/(p+r) = 2/3
    assert longbench.rouge_l("the cat ate the mat", "the cat sat on the mat") == pytest.approx(2 / 3, abs=1e-7)
    # sentences split at "."; the union of LCS words over hypothesis sentences: {a, b} and {c} -> 3 of 3
    assert longbench.rouge_l("a b. c", "a b c") == pytest.approx(1.0, abs=1e-7)
    assert longbench.rouge_l("", "a b c") == 0.0 and longbench.rouge_l("...", "a") == 0.0  # rouge raises: 0


def test_classification_shares_credit_and_reproduces_longbenchs_list_walk():
    classes = ["Date", "Date of birth", "City", "Country"]
    assert longbench.classification_score("Type: City", "City", all_classes=classes) == 1.0
    assert longbench.classification_score("City or Country", "City", all_classes=classes) == 0.5
    assert longbench.classification_score("Country", "City", all_classes=classes) == 0.0
    # "Date" is part of the truth "Date of birth", so it does not count against it
    assert longbench.classification_score("Date of birth", "Date of birth", all_classes=classes) == 1.0
    # LongBench removes while iterating: after removing "Date", "Date of" is skipped and stays -> 1/2
    assert longbench.classification_score("Date of birth", "Date of birth", all_classes=["Date", "Date of", "Date of birth"]) == 0.5


def test_retrieval_count_and_edit_similarity():
    assert longbench.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert longbench.retrieval_score("Paragraph 3 or 12", "Paragraph 12") == 0.5
    assert longbench.count_score("There are 7 unique paragraphs", "7") == 1.0
    assert longbench.count_score("7 or 8", "7") == 0.5 and longbench.count_score("none", "7") == 0.0
    assert longbench.edit_sim("x = 1\n", "x = 1") == 1.0
    # the first line without a comment or a fence is compared: "y = 2" vs "x = 1": 3 of 5 chars match
    assert longbench.edit_sim("# comment\ny = 2", "x = 1") == 0.6
    assert longbench.fuzz_ratio("", "") == 100 and longbench.fuzz_ratio("a", "") == 0


def test_score_takes_the_best_reference_and_first_line_for_few_shot_sets():
    assert score("qa_f1", "Paris", ["London", "Paris"], subtask="hotpotqa") == 1.0
    # triviaqa: only the first line is scored
    assert score("qa_f1", "\nLondon\nParis", ["Paris"], subtask="triviaqa") == 0.0
    assert score("qa_f1", "\nLondon\nParis", ["Paris"], subtask="hotpotqa") == pytest.approx(2 / 3)


def test_samsum_scores_only_the_first_line_of_the_summary():
    """If this fails, samsum's ROUGE-L also counts the made-up next dialogue a model writes after its summary."""
    generated = "\nAnna brings the cake\nDialogue:\nTom: what cake"
    # the first line is the reference word for word: ROUGE-L 1
    assert score("rouge_l", generated, ["Anna brings the cake"], subtask="samsum") == pytest.approx(1.0, abs=1e-7)
    # a summary set without the rule (gov_report) scores the whole text: the extra words cost precision
    assert score("rouge_l", generated, ["Anna brings the cake"], subtask="gov_report") < 0.9


# --- prompts and the Hub path ---------------------------------------------------------------------

THUDM_RECORD = {"input": "Which city is the capital?", "context": "Paris is the capital of France. " * 40,
                "answers": ["Paris"], "length": 280, "dataset": "hotpotqa", "all_classes": None, "_id": "h0"}


def test_both_hub_record_shapes_give_the_same_prompt():
    context, question, prefix = longbench.prompt_texts("hotpotqa", THUDM_RECORD)
    kvpress_record = {"context": context, "question": question, "answer_prefix": prefix, "answers": ["Paris"]}
    assert longbench.prompt_texts("hotpotqa", kvpress_record) == (context, question, prefix)
    assert context.startswith("Answer the question based on the given passages.") and THUDM_RECORD["context"] in context
    assert question == "Question: Which city is the capital?\n" and prefix == "Answer:"
    # few-shot sets: the answer prefix at the end of "input" is moved to the answer prefix
    _, q, p = longbench.prompt_texts("trec", {"input": "What is X?\nType:", "context": "examples"})
    assert q == "What is X?\n" and p == "Type:"


@pytest.fixture
def tiny_hub(monkeypatch):
    """Records served through hub.LOAD as a real ``datasets.Dataset`` (no network)."""
    import datasets

    from knormctl.engine.text import hub as text

    served: dict[tuple[str, str], list[dict]] = {}
    monkeypatch.setattr(text, "hub_status", lambda: (True, "test"))
    monkeypatch.setattr(hub, "LOAD", lambda name, config: datasets.Dataset.from_list(served[(name, config)]))
    return served


def test_longbench_records_become_samples_and_long_ones_lose_their_middle(tiny_hub, tiny_tokenizer):
    tiny_hub[(hub.LONGBENCH_DATASET, "hotpotqa")] = [THUDM_RECORD, {**THUDM_RECORD, "_id": "h1"}]
    rows = hub.longbench_records(["hotpotqa"])
    fmt = PromptFormat(tiny_tokenizer, "off")
    full = hub.longbench_samples(rows, per_task=5, seed=0, fmt=fmt, room=100_000, answer_tokens=None)
    assert [s.doc_id for s in full] == ["h0", "h1"] and full[0].answers == ["Paris"]
    assert full[0].max_new_tokens == 32 and full[0].metric == "qa_f1" and full[0].extra["truncated"] == 0
    n = len(full[0].prompt_ids)
    cut = hub.longbench_samples(rows, per_task=1, seed=0, fmt=fmt, room=n - 100, answer_tokens=None)[0]
    assert len(cut.prompt_ids) + cut.max_new_tokens == n - 100
    assert cut.question_ids == full[0].question_ids and cut.suffix_ids == full[0].suffix_ids
    k = len(cut.context_ids) // 2  # start and end kept, the middle gone
    assert cut.context_ids[:k] == full[0].context_ids[:k] and cut.context_ids[-k:] == full[0].context_ids[-k:]
    with pytest.raises(UsageError, match="does not fit"):
        hub.longbench_samples(rows, per_task=1, seed=0, fmt=fmt, room=len(cut.question_ids), answer_tokens=None)


def test_kvpress_ruler_records_become_samples_per_subtask(tiny_hub, tiny_tokenizer):
    def rec(task, i):
        return {"context": f"Some text {i}. One of the special magic numbers for k{i} is: 12345{i}.\n",
                "question": "What is the special magic number for k? ", "answer_prefix": "The special magic number is",
                "answer": [f"12345{i}"], "task": task, "max_new_tokens": 128}

    tiny_hub[(hub.RULER_DATASET, "4096")] = [rec("niah_single_1", i) for i in range(4)] + [rec("qa_1", 9)]
    rows = hub.ruler_records([4096])
    samples = hub.ruler_samples(rows, ["niah_single_1", "qa_1"], per_task=2, seed=0,
                                fmt=PromptFormat(tiny_tokenizer, "off"), answer_tokens=None)
    assert [s.subtask for s in samples] == ["niah_single_1", "niah_single_1", "qa_1"]
    assert samples[2].metric == "string_match_part" and samples[2].max_new_tokens == 32
    assert all(s.context_length == 4096 and s.answers[0] in tiny_tokenizer.decode(s.context_ids) for s in samples)
    again = hub.ruler_samples(rows, ["niah_single_1"], per_task=2, seed=0, fmt=PromptFormat(tiny_tokenizer, "off"),
                              answer_tokens=None)
    assert [s.text_hash for s in again] == [s.text_hash for s in samples[:2]]  # seeded choice of records
    with pytest.raises(UsageError, match="has no vt"):
        hub.ruler_samples(rows, ["vt"], per_task=1, seed=0, fmt=PromptFormat(tiny_tokenizer, "off"),
                          answer_tokens=None)


def test_kvpress_cwe_and_fwe_records_get_the_chance_level_of_copying_their_list(tiny_hub, tiny_tokenizer):
    """The Hub's records store no chance level; a cwe/fwe one gets what copying its list's
    start scores (not 0, which would put any full-cache score far above chance), and one
    whose list cannot be read gets none (no near-chance verdict)."""
    from knormctl.tasks.catalog import chance_of

    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    example = head + "1. xa 2. xb 3. xa\nQuestion: What are the 10 most common words in the above list? Answer: xa\n"
    listed = " ".join(f"{i + 1}. {w}" for i, w in enumerate(["w1", "w2", "w1", "w3", "w4", "w5", "w6", "w7", "w8",
                                                             "w9", "w10", "w11", "w12"]))
    cwe = {"context": example + head + listed + "\n", "question": "What are the 10 most common words?",
           "answer_prefix": "Answer:", "answer": [f"w{i}" for i in range(3, 13)], "task": "cwe"}
    fwe = {"context": "Read the following coded text and track the frequency of each coded word. Find the three "
                      "most frequently appeared coded words. ... abc ... def abc ghi jkl\n",
           "question": "What are the three most frequently appeared words?", "answer_prefix": "Answer:",
           "answer": ["abc", "jkl", "mno"], "task": "fwe"}
    unreadable = {**cwe, "context": "a list in another shape: w1, w2, w3\n"}
    tiny_hub[(hub.RULER_DATASET, "4096")] = [cwe, fwe, unreadable]
    fmt = PromptFormat(tiny_tokenizer, "off")
    by = {}
    for rows in ([cwe, fwe], [unreadable]):
        for s in hub.ruler_samples({4096: rows}, sorted({r["task"] for r in rows}), 1, 0, fmt, None):
            by[(s.subtask, rows[0] is unreadable)] = s
    # cwe: the first 10 distinct are w1..w10, of which w3..w10 are answers (8 of 10); the example's xa is not read
    assert by[("cwe", False)].extra["chance"] == pytest.approx(0.8)
    assert by[("fwe", False)].extra["chance"] == pytest.approx(1 / 3)  # abc def ghi: abc only
    assert by[("cwe", True)].extra["chance"] is None

    class S:
        def __init__(self, sample):
            self.subtask, self.extra_json = sample.subtask, sample.extra

    assert chance_of([S(by[("cwe", False)])]) == pytest.approx(0.8)
    assert chance_of([S(by[("cwe", True)])]) is None  # the catalog's 0 no longer stands in


def test_offline_hub_fails_at_once_naming_the_offline_tasks(monkeypatch):
    from knormctl.engine.text import hub as text

    def unreachable(name, config):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(text, "hub_status", lambda: (False, "test: Hub unreachable"))
    monkeypatch.setattr(hub, "LOAD", unreachable)
    with pytest.raises(AssetError) as e:
        hub.longbench_records(["qasper"])
    msg = str(e.value)
    assert "\n" not in msg and "--task ruler" in msg and "wiki-lite-long" in msg and "Xnhyacinth/LongBench" in msg


def test_code_similarity_skips_leading_slash_slash_comment_lines():
    # LongBench's code_sim_score: the first line without `, # or // is the answer line
    assert longbench.edit_sim("// a comment\nx = 1", "x = 1") == 1.0


def test_fuzz_ratio_rounds_to_the_nearest_percent_like_fuzzywuzzy():
    # SequenceMatcher("abc", "abd").ratio() = 4/6 = 0.6667: fuzzywuzzy returns 67, not 66
    assert longbench.fuzz_ratio("abc", "abd") == 67
    assert longbench.edit_sim("abc", "abd") == pytest.approx(0.67)


def test_qa_f1_drops_the_article_a_too():
    # SQuAD normalisation removes a, an and the
    assert longbench.qa_f1("a cat", "cat") == 1.0
    assert longbench.qa_f1("A dog", "the dog") == 1.0
