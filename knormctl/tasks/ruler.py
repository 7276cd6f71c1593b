"""RULER's synthetic tasks (NVIDIA/RULER, ``scripts/data/synthetic/``), generated offline.

Task definitions follow RULER's ``synthetic.yaml`` (the subtasks' arguments), its
``constants.py`` (prompt templates, answer prefixes, answer lengths) and the generators
``niah.py``, ``variable_tracking.py``, ``common_words_extraction.py`` and
``freq_words_extraction.py``; scoring is ``string_match_all`` (scoring.py). The code is
knormctl's own. Like RULER, a length counts the prompt AND the answer tokens: the
haystack is sized (bisection) so that prompt + answer tokens <= the asked length, in the
run's own tokenizer and prompt format.

Differences from RULER, each deliberate:
- the "essay" haystack is any knormctl text source (haystack.py), from a seeded sentence
  start, instead of Paul Graham's essays from their beginning; word lists (needle keys,
  cwe) are the source's vocabulary instead of wonderwords' lists;
- cwe's words never contain one another (``unnested``): string_match_all counts an answer
  word found inside a longer predicted word ("step" in "footstep"), and a vocabulary has
  inflected forms that wonderwords' lists mostly lack;
- needles go to the sentence boundary nearest to their depth counted in WORDS (RULER
  counts sentences: ``int(n_sentences * depth)``); depths are drawn from RULER's 40;
- every random choice comes from one generator seeded by (seed, subtask, length, index),
  so a sample can be rebuilt alone (resume checks it), where RULER draws from a global
  stream and reuses one shuffle seed for every sample;
- the prompt is split into context / question / answer prefix (kvpress's split of RULER
  prompts) and joined by the prompt format (plain: "\\n" before the answer prefix, where
  RULER's base template has a space; or the tokenizer's chat template).
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import dataclass

from knormctl.tasks import catalog as c
from knormctl.tasks.haystack import Haystack, insert_at_depths
from knormctl.tasks.prompt import PromptFormat, QuestionSample, fit
from knormctl.tasks.scoring import string_match_all

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, num=40))


@dataclass(frozen=True)
class NiahSpec:
    """RULER synthetic.yaml arguments of one needle subtask."""

    haystack: str  # noise | essay | needle
    type_k: str  # words | numbers | uuids
    type_v: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


NIAH = {
    "niah_single_1": NiahSpec("noise", "words", "numbers"),
    "niah_single_2": NiahSpec("essay", "words", "numbers"),
    "niah_single_3": NiahSpec("essay", "words", "uuids"),
    "niah_multikey_1": NiahSpec("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": NiahSpec("needle", "words", "numbers"),
    "niah_multikey_3": NiahSpec("needle", "uuids", "uuids"),
    "niah_multivalue": NiahSpec("essay", "words", "numbers", num_v=4),
    "niah_multiquery": NiahSpec("essay", "words", "numbers", num_q=4),
}


def make_sample(name: str, fmt: PromptFormat, hay: Haystack, length: int, index: int, seed: int,
                max_new_tokens: int | None = None) -> QuestionSample:
    """Sample ``index`` of subtask ``name`` at ``length`` tokens (prompt + answer)."""
    spec = c.subtask(name)
    new = max_new_tokens or spec.max_new_tokens
    rng = random.Random(f"ruler|{seed}|{name}|{length}|{index}")
    budget = length - new
    what = f"ruler {name} at {length} tokens"
    limit = None
    if name in NIAH:
        build, guess = _niah(NIAH[name], rng, hay), 200
    elif name == "vt":
        build, guess = _vt(rng, fmt), 50
    elif name == "cwe":
        build, words = _cwe(rng, hay, length)
        guess, limit = 100, words - 10  # distinct words available besides the 10 common ones
    elif name == "fwe":
        build, guess = _fwe(rng, length, new), 500
    else:
        raise ValueError(f"not a generated RULER subtask: {name!r}")
    n, (context, question, prefix, answers, extra) = fit(build, fmt, budget, guess, what, limit)
    ctx, q, suffix = fmt.pieces(context, question, prefix)
    return QuestionSample(task="ruler", subtask=name, dataset=f"ruler:{hay.source}", doc_id=f"{name}/{index}",
                          doc_title=None, char_offset=None, context_ids=ctx, question_ids=q, suffix_ids=suffix,
                          answers=answers, metric=spec.metric, max_new_tokens=new, context_length=length,
                          extra={"haystack_units": n, **extra})


# --- random values ------------------------------------------------------------------------


def _random_value(rng: random.Random, kind: str, hay: Haystack) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # RULER: 7 digits
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":  # RULER: an adjective-noun pair from wonderwords; here two pool words
        a, b = hay.pool_sample(rng, 2, "a needle key")
        return f"{a}-{b}"
    raise ValueError(kind)


# --- needles -----------------------------------------------------------------------------


def _niah(spec: NiahSpec, rng: random.Random, hay: Haystack):
    n_keys = max(spec.num_k, spec.num_q)
    keys, values, needles = [], [], []
    for _ in range(n_keys):
        keys.append(_random_value(rng, spec.type_k, hay))
        values.append([_random_value(rng, spec.type_v, hay) for _ in range(spec.num_v)])
        needles += [NEEDLE.format(type_v=spec.type_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(n_keys), spec.num_q)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    depths = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
    start = hay.sentence_start(rng) if spec.haystack == "essay" else 0
    spots = [rng.random() for _ in needles]  # noise / needle haystacks: where among the lines
    distractor_seed = rng.random()
    singular = spec.num_q * spec.num_v == 1
    t = spec.type_v[:-1] if singular else spec.type_v  # RULER's template turns "numbers" into "number"
    head = (f"A special magic {t} is hidden" if singular else f"Some special magic {t} are hidden") + \
        f" within the following text. Make sure to memorize it. I will quiz you about the {t} afterwards.\n"
    question = (f"What is the special magic {t} for {query} mentioned in the provided text?" if singular
                else f"What are all the special magic {t} for {query} mentioned in the provided text?")
    prefix = f"The special magic {t} for {query} mentioned in the provided text {'is' if singular else 'are'}"

    def build(n: int):
        if spec.haystack == "essay":
            text = insert_at_depths(hay.take(start, n), list(zip(depths, needles)))
        else:
            if spec.haystack == "noise":
                lines = [NOISE] * n
            else:  # "needle": the haystack is made of needles with other keys and values
                drng = random.Random(distractor_seed)
                lines = [NEEDLE.format(type_v=spec.type_v, key=_random_value(drng, spec.type_k, hay),
                                       value=_random_value(drng, spec.type_v, hay)) for _ in range(n)]
            for at, needle in sorted(zip((int(s * n) for s in spots), needles), reverse=True):
                lines.insert(at, needle)
            text = "\n".join(lines)
        return head + text + "\n", question, prefix, answers, {}

    return build


# --- variable tracking ---------------------------------------------------------------------


def _chain(rng: random.Random, letters: int, hops: int = 4) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, lines, value


def _vt_text(lines: list[str], spots: list[float], n: int) -> str:
    noise = [NOISE] * n
    for j, at in enumerate(sorted(int(s * n) for s in spots)):
        noise.insert(at + j, lines[j])  # in chain order
    return "\n".join(noise).replace(". \n", ".\n")


_VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _vt_parts(text: str, value: str, hops: int = 4) -> tuple[str, str, str]:
    return (_VT_HEAD + text + "\n", f"Question: Find all variables that are assigned the value {value} in the text above.",
            f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
            f"assigned the value {value}, they are: ")


def _vt(rng: random.Random, fmt: PromptFormat):
    # RULER prepends one solved example: 3-letter names, its haystack sized to 500 tokens.
    icl_names, icl_lines, icl_value = _chain(rng, 3)
    icl_spots = [rng.random() for _ in icl_lines]
    plain = PromptFormat(fmt.tokenizer, "off")

    def icl_build(n: int):
        return (*_vt_parts(_vt_text(icl_lines, icl_spots, n), icl_value), None, None)

    _, (ctx, q, prefix, _, _) = fit(icl_build, plain, 500, 20, "ruler vt's example")
    example = f"{ctx}{q} {prefix} {' '.join(icl_names)}\n"
    names, lines, value = _chain(rng, 5)
    spots = [rng.random() for _ in lines]

    def build(n: int):
        context, question, answer_prefix = _vt_parts(_vt_text(lines, spots, n), value)
        return example + "\n" + context, question, answer_prefix, names, {}

    return build


# --- common and frequent words --------------------------------------------------------------

_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
_CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
_CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(words: list[str], common: int, uncommon: int, order: random.Random, n_common: int = 10) -> list[str]:
    listed = words[:n_common] * common + words[n_common:] * uncommon
    order.shuffle(listed)
    return listed


def _cwe(rng: random.Random, hay: Haystack, length: int):
    """``(build, how many words it can list)``."""
    # RULER: below 4096 tokens a lighter mix (6x/1x, example 20 words 3x/1x), else 30x/3x (example 40 words 10x/3x)
    small = length < 4096
    ex_size, ex_common, ex_uncommon = (20, 3, 1) if small else (40, 10, 3)
    common, uncommon = (6, 1) if small else (30, 3)
    example_words = hay.pool_sample(rng, ex_size, "ruler cwe's example")
    example = _word_list(example_words, ex_common, ex_uncommon, random.Random(rng.random()))
    shown = (f"{_CWE_HEAD}{_numbered(example)}\n{_CWE_QUESTION} {_CWE_PREFIX} {_numbered(example_words[:10])}\n")
    pool = unnested(hay.pool_sample(rng, len(hay.pool), "ruler cwe"))  # a seeded order of the whole pool
    order_seed = rng.random()

    def build(n: int):
        words = pool[:n + 10]  # n uncommon words besides the 10 common ones
        listed = _word_list(words, common, uncommon, random.Random(order_seed))
        extra = {"chance": copy_chance("cwe", listed, words[:10])}
        return shown + _CWE_HEAD + _numbered(listed) + "\n", _CWE_QUESTION, _CWE_PREFIX, words[:10], extra

    return build, len(pool)


def unnested(words: list[str]) -> list[str]:
    """``words`` in order, less each one that contains a word kept before it or lies inside
    one (all are >= 4 letters), so no listed word is a substring of another."""
    kept: list[str] = []
    kept_set: set[str] = set()
    inside: set[str] = set()  # every substring (>= 4 letters) of a kept word

    def parts(w: str):
        return {w[i:j] for i in range(len(w) - 3) for j in range(i + 4, len(w) + 1)}

    for w in words:
        pieces = parts(w)
        if w in inside or not kept_set.isdisjoint(pieces):
            continue
        kept.append(w)
        kept_set.add(w)
        inside |= pieces
    return kept


# RULER's templates: cwe's list follows its last head (an example list comes first), fwe's
# coded text follows the head's last sentence
_LIST_STARTS = {"cwe": "Memorize the ones that appear most often.", "fwe": "Find the three most frequently appeared coded words."}
_COPIED = {"cwe": 10, "fwe": 3}


def copy_chance(name: str, listed: list[str], answers: list[str]) -> float:
    """cwe/fwe's chance level: what an answer that copies the list's first distinct words
    scores (10 for cwe, 3 for fwe; fwe's noise "..." skipped). Reading the list is all it
    takes, so a score near it says nothing about what the cache kept."""
    distinct = [w for w in dict.fromkeys(listed) if w.strip(".")][:_COPIED[name]]
    return string_match_all(" ".join(distinct), answers)


def listed_words(name: str, context: str) -> list[str] | None:
    """The words of a cwe/fwe prompt's list, read from its text (a Hub record), in order;
    None when the text does not hold RULER's template."""
    at = context.rfind(_LIST_STARTS[name])
    if at < 0:
        return None
    rest = context[at + len(_LIST_STARTS[name]):]
    words = re.findall(r"(?:^|\s)\d+\.\s+(\S+)", rest) if name == "cwe" else rest.split()
    return words or None


_FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. "
             "Find the three most frequently appeared coded words. ")
_FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                 "What are the three most frequently appeared words in the above coded text?")
_FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
_ZETA_2 = 1.6449340668482264  # zeta(2) = pi^2 / 6: RULER's alpha is 2.0


def _fwe(rng: random.Random, length: int, new_tokens: int):
    # RULER: vocab of (length - answer tokens) // 50 coded 6-letter words, Zipf(2) counts over
    # the vocab's order, the most frequent one replaced by "..." (noise); answer = ranks 2-4.
    size = max(4, (length - new_tokens) // 50)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."
    order_seed = rng.random()

    def build(n: int):
        text = [w for k, w in enumerate(words, start=1) for _ in range(int(n * k ** -2.0 / _ZETA_2))]
        random.Random(order_seed).shuffle(text)
        extra = {"chance": copy_chance("fwe", text, words[1:4])}
        return _FWE_HEAD + " ".join(text) + "\n", _FWE_QUESTION, _FWE_PREFIX, words[1:4], extra

    return build
