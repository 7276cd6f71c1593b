"""Names, answer lengths, metrics and chance levels of every question task (pure data).

Readers (report, plot, benchmarks) import this module without torch. The names are
what a run stores: ``samples.task``, ``samples.subtask`` and ``samples.score_metric``.
"""

from __future__ import annotations

from dataclasses import dataclass

QUESTION_TASKS = ("passkey", "ruler", "niah", "longbench")
PROTOCOLS = ("context", "query-aware", "paper")  # see protocol.py
CHAT_TEMPLATE_MODES = ("auto", "on", "off")  # auto: use the tokenizer's template when it has one (kvpress)
RULER_SOURCES = ("generated", "hub")  # generated offline here, or kvpress's simonjegou/ruler

# score_metric values (samples.score_metric); every score is in [0, 1]
STRING_MATCH_ALL = "string_match_all"  # RULER: fraction of the reference answers found in the output
STRING_MATCH_PART = "string_match_part"  # RULER qa: 1 if any reference answer is found
PASSKEY_DIGITS = "passkey_digits"  # the passkey's digits appear as a number
QA_F1 = "qa_f1"  # LongBench: token F1 after SQuAD normalisation
ROUGE_L = "rouge_l"  # LongBench: ROUGE-L F (the `rouge` package's summary-level variant)
CLASSIFICATION = "classification"  # LongBench: the right class, shared among the classes named
RETRIEVAL = "retrieval"  # LongBench passage retrieval: share of the numbers named that are right
COUNT = "count"  # LongBench passage count: share of the numbers named that are right
EDIT_SIM = "edit_sim"  # LongBench code: fuzzywuzzy ratio of the first code line / 100

# "Near chance": the full cache answers at most this much above chance (a quarter of the
# questions beyond guessing), or its 95% interval reaches down to chance. The model cannot
# do the task, so what compression does to it means nothing. One rule for the report and
# benchmarks/tasks.py (``near_chance``).
NEAR_CHANCE_MARGIN = 0.25


@dataclass(frozen=True)
class Subtask:
    name: str
    task: str
    metric: str
    max_new_tokens: int  # the reference implementation's answer length
    chance: float | None  # expected score of an answer that reads nothing; None: not defined


def _ruler(name: str, metric: str = STRING_MATCH_ALL) -> Subtask:
    kind = name.split("_")[0]
    # RULER scripts/data/synthetic/constants.py: tokens_to_generate per task family
    new = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}[kind]
    # niah/vt answers are random 5-7 digit numbers, uuids or 5-letter names: a guess scores ~0.
    # cwe/fwe: an answer that merely copies the list's start scores above 0 (0.5-1.0), so each
    # sample stores its own level (extra_json "chance", ruler.copy_chance); without it, none.
    return Subtask(name, "ruler", metric, new, None if kind in ("cwe", "fwe") else 0.0)


RULER_SYNTHETIC = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                   "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
RULER_QA = ("qa_1", "qa_2")  # need SQuAD / HotpotQA documents: only in the Hub set

# LongBench (THUDM) datasets with English metrics, as in kvpress's copy of the set. The
# Chinese ones (multifieldqa_zh, dureader, vcsum) score with jieba word segmentation, which
# knormctl does not ship; lsht and passage_retrieval_zh are not in kvpress's copy.
_LONGBENCH = {  # name: (metric, max new tokens: LongBench config/dataset2maxlen.json)
    "narrativeqa": (QA_F1, 128), "qasper": (QA_F1, 128), "multifieldqa_en": (QA_F1, 64),
    "hotpotqa": (QA_F1, 32), "2wikimqa": (QA_F1, 32), "musique": (QA_F1, 32),
    "gov_report": (ROUGE_L, 512), "qmsum": (ROUGE_L, 512), "multi_news": (ROUGE_L, 512),
    "trec": (CLASSIFICATION, 64), "triviaqa": (QA_F1, 32), "samsum": (ROUGE_L, 128),
    "passage_count": (COUNT, 32), "passage_retrieval_en": (RETRIEVAL, 32),
    "lcc": (EDIT_SIM, 64), "repobench-p": (EDIT_SIM, 64),
}
LONGBENCH = tuple(_LONGBENCH)
LONGBENCH_UNSUPPORTED = {"multifieldqa_zh": "jieba", "dureader": "jieba", "vcsum": "jieba",
                         "lsht": "kvpress's copy", "passage_retrieval_zh": "kvpress's copy"}
# trec: 50 question types; passage_retrieval_en: 30 paragraphs. Other LongBench metrics have
# no meaningful chance level (None: the report gives no near-chance verdict there).
_LONGBENCH_CHANCE = {"trec": 1 / 50, "passage_retrieval_en": 1 / 30}

SUBTASKS: dict[str, Subtask] = {
    "passkey": Subtask("passkey", "passkey", PASSKEY_DIGITS, 16, 0.0),  # = RunConfig.passkey_new_tokens
    "niah": Subtask("niah", "niah", STRING_MATCH_ALL, 32, 0.0),
    **{n: _ruler(n) for n in RULER_SYNTHETIC},
    **{n: _ruler(n, STRING_MATCH_PART) for n in RULER_QA},
    **{n: Subtask(n, "longbench", m, new, _LONGBENCH_CHANCE.get(n)) for n, (m, new) in _LONGBENCH.items()},
}

# what each task runs when --subtasks is not given
DEFAULT_SUBTASKS = {"ruler": RULER_SYNTHETIC, "longbench": LONGBENCH}
# the classic grid's default lengths; RULER's default is kvpress's 4096
DEFAULT_CONTEXT_LENGTHS = {"ruler": (4096,), "niah": (1024, 2048, 4096)}
DEFAULT_NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES_PER_TASK = {"ruler": 5, "niah": 1, "longbench": 10}  # niah: per depth x length cell


def subtask(name: str) -> Subtask:
    return SUBTASKS[name]


def chance_of(samples) -> float | None:
    """The chance level of a cell's questions: the mean of what each sample stored (cwe/fwe's
    copy-the-list score in ``extra_json["chance"]``), else its subtask's (0 for an open answer
    a guess cannot hit: digits, uuids, names). None where a sample's metric has no chance level
    (LongBench's F1, ROUGE-L, edit similarity, passage count: generic text already scores above
    0 against a reference) or there are no samples: then there is no near-chance verdict."""
    levels = []
    for s in samples:
        level = (getattr(s, "extra_json", None) or {}).get("chance")
        if level is None:
            known = SUBTASKS.get(getattr(s, "subtask", None) or "")
            level = known.chance if known else None
        if level is None:
            return None
        levels.append(level)
    return sum(levels) / len(levels) if levels else None


def near_chance(score: float | None, chance: float | None, interval: tuple[float, float] | None = None) -> bool:
    """A full-cache accuracy within NEAR_CHANCE_MARGIN of ``chance``, or whose 95% interval
    reaches down to it. No verdict (False) without a score or a chance level."""
    if score is None or chance is None:
        return False
    return score <= chance + NEAR_CHANCE_MARGIN or (interval is not None and interval[0] <= chance)
