"""LongBench (THUDM): per-dataset prompts split for the protocols, and its metrics.

Prompts: LongBench's ``config/dataset2prompt.json`` cut into context / question /
answer prefix exactly as kvpress did for its Hub copy (``evaluation/benchmarks/
longbench/create_huggingface_dataset.py``), so the context can be compressed alone.
Answer lengths: ``config/dataset2maxlen.json`` (catalog.py). Long prompts are cut in
the middle (``pred.py``: the start and the end hold the instructions).

Metrics: LongBench's ``metrics.py`` and ``eval.py`` (``scorer``: the best score over the
reference answers; trec, triviaqa and samsum score only the first line), re-implemented
in pure Python without its dependencies:
- ``rouge_score`` used the ``rouge`` package (pltrdy, 1.0.1): summary-level ROUGE-L F with
  sentences split at ".", words at " ", and ``exclusive=True`` -- words are counted as SETS
  (repeats count once). Reproduced here step by step, including its choice among equal
  longest common subsequences, and its failures (an empty side) scoring 0. Its LCS
  reconstruction is recursive and could hit Python's recursion limit on sentences of
  ~1000 words (LongBench would then score 0); this one is iterative and has no limit.
- ``code_sim_score`` used ``fuzzywuzzy.fuzz.ratio`` which, without python-Levenshtein
  (not in LongBench's requirements), is ``difflib.SequenceMatcher(None, a, b).ratio()``
  rounded to a whole percent -- the same call here.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter

from knormctl.tasks import catalog as c

# --- prompts (context prefix, question template, answer prefix), per dataset --------------

_QA_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output any "
                "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
                "given passages. Only give me the answer and do not output any other words.\n\n")
_QASPER_RULES = ('as concisely as you can, using a single phrase or sentence if possible. If the question cannot be '
                 'answered based on the information in the article, write "unanswerable". If the question is a '
                 'yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.')
_NARRATIVE_RULES = "asconcisely as you can, using a single phrase if possible. Do not provide any explanation."  # sic

CONTEXT_PREFIX = {
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. Answer "
                    f"the question {_NARRATIVE_RULES}\n\nStory: {{context}}\n\nNow, answer the question based on "
                    f"the story {_NARRATIVE_RULES}\n\n"),
    "qasper": (f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}\n\n"
               f"Article: {{context}}\n\n Answer the question based on the above article {_QASPER_RULES}\n\n"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\n"),
    "hotpotqa": _QA_PASSAGES, "2wikimqa": _QA_PASSAGES, "musique": _QA_PASSAGES,
    "gov_report": ("You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                   "Report:\n{context}\n\n"),
    "qmsum": ("You are given a meeting transcript and a query containing a question or instruction. Answer the "
              "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
              "above meeting transcript in one or more sentences.\n\n"),
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n",
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output any "
                 "other words. The following are some examples.\n\n{context}\n\n"),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n",
    "passage_count": ("There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                      "carefully read these paragraphs and determine how many unique paragraphs there are after "
                      "removing duplicates. In other words, how many non-repeating paragraphs are there in "
                      "total?\n\n{context}\n\n"),
    "passage_retrieval_en": ("Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                             "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"),
    "lcc": "Please complete the code given below. \n{context}",
    "repobench-p": "Please complete the code given below. \n{context}",
}
QUESTION_TEMPLATE = {
    "narrativeqa": "Question: {input}\n\n", "qasper": "Question: {input}\n\n", "multifieldqa_en": "Question: {input}\n",
    "hotpotqa": "Question: {input}\n", "2wikimqa": "Question: {input}\n", "musique": "Question: {input}\n",
    "gov_report": "Now, write a one-page summary of the report.\n\n", "qmsum": "Query: {input}\n",
    "multi_news": "Now, write a one-page summary of all the news.\n\n",
    "trec": "{input}", "triviaqa": "{input}", "samsum": "{input}",
    "passage_count": ("Please enter the final count of unique paragraphs after removing duplicates. The output "
                      "format should only contain the number, such as 1, 2, 3, and so on.\n\n"),
    "passage_retrieval_en": ('{input}\n\nPlease enter the number of the paragraph that the abstract is from. The '
                             'answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'),
    "lcc": "{input}", "repobench-p": "{input}",
}
ANSWER_PREFIX = {
    "narrativeqa": "Answer:", "qasper": "Answer:", "multifieldqa_en": "Answer:", "hotpotqa": "Answer:",
    "2wikimqa": "Answer:", "musique": "Answer:", "gov_report": "Summary:", "qmsum": "Answer:", "trec": "Type:",
    "multi_news": "Summary:", "samsum": "Summary:", "triviaqa": "Answer:", "passage_count": "The final answer is: ",
    "passage_retrieval_en": "The answer is: ", "lcc": "Next line of code:\n", "repobench-p": "Next line of code:\n",
}
# few-shot sets whose ``input`` already ends with the answer prefix (kvpress removes it)
_INPUT_ENDS_WITH_PREFIX = {"trec": "Type:", "triviaqa": "Answer:", "samsum": "Summary:"}
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")  # eval.py scores only the first line


def prompt_texts(dataset: str, record: dict) -> tuple[str, str, str]:
    """(context, question, answer prefix) of one record, in either Hub format:
    kvpress's copy (``context``/``question``/``answer_prefix`` already formatted) or
    THUDM's original (``context``/``input``)."""
    if "answer_prefix" in record and "question" in record:
        return record["context"], record["question"], record["answer_prefix"]
    raw = record.get("input") or ""
    suffix = _INPUT_ENDS_WITH_PREFIX.get(dataset)
    if suffix:
        raw = raw.removesuffix(suffix)
    return (CONTEXT_PREFIX[dataset].format(context=record["context"]), QUESTION_TEMPLATE[dataset].format(input=raw),
            ANSWER_PREFIX[dataset])


# --- metrics ----------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: list[str], truth: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, truth: str, **_) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(truth).split())


def _numbers_equal_to(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, truth: str, **_) -> float:
    return _numbers_equal_to(prediction, str(truth))


def retrieval_score(prediction: str, truth: str, **_) -> float:
    found = re.findall(r"Paragraph (\d+)", truth)
    return _numbers_equal_to(prediction, found[0]) if found else 0.0


def classification_score(prediction: str, truth: str, all_classes=None, **_) -> float:
    """The right class named, shared among the classes named (a class that is part of the
    truth's name, e.g. 'Date' in 'Date of birth', does not count against it)."""
    kept = [name for name in (all_classes or []) if name in prediction]
    # LongBench removes such names from the list while a for-loop walks it, which skips the
    # element after each removal; reproduced (index walk, remove, index moves on anyway).
    i = 0
    while i < len(kept):
        term = kept[i]
        if term in truth and term != truth:
            kept.remove(term)
        i += 1
    return 1.0 / len(kept) if truth in kept else 0.0


def edit_sim(prediction: str, truth: str, **_) -> float:
    """LongBench code_sim_score: the first line that is not a comment or a fence, against the truth."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, truth) / 100


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy.fuzz.ratio without python-Levenshtein: equal -> 100, one empty -> 0."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def rouge_l(prediction: str, truth: str, **_) -> float:
    """``Rouge().get_scores([prediction], [truth], avg=True)["rouge-l"]["f"]``; 0 where it raises."""
    hyp = [" ".join(s.split()) for s in prediction.split(".") if len(s) > 0]
    ref = [" ".join(s.split()) for s in truth.split(".") if len(s) > 0]
    if not hyp or not ref:
        return 0.0  # "Collections must contain at least 1 sentence." (LongBench catches it: 0)
    m = len(set(_words(ref)))
    n = len(set(_words(hyp)))
    llcs = 0
    union: set[str] = set()
    for ref_sentence in ref:
        before = len(union)
        ref_words = ref_sentence.split(" ")
        for hyp_sentence in hyp:
            union |= set(_lcs_words(ref_words, hyp_sentence.split(" ")))
        llcs += len(union) - before
    r, p = llcs / m, llcs / n
    return 2.0 * ((p * r) / (p + r + 1e-8))


def _words(sentences: list[str]) -> list[str]:
    return [w for s in sentences for w in s.split(" ")]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """The words of one longest common subsequence, reconstructed as the `rouge` package does
    (from the end; on a tie between up and left, go left)."""
    rows, cols = len(x), len(y)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        xi, prev, row = x[i - 1], table[i - 1], table[i]
        for j in range(1, cols + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out = []
    i, j = rows, cols
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


METRICS = {c.QA_F1: qa_f1, c.ROUGE_L: rouge_l, c.CLASSIFICATION: classification_score, c.RETRIEVAL: retrieval_score,
           c.COUNT: count_score, c.EDIT_SIM: edit_sim}


def score(dataset: str, metric: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """LongBench's per-sample score: the best over the reference answers."""
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = METRICS[metric]
    return max(float(fn(prediction, truth, all_classes=all_classes)) for truth in answers)
