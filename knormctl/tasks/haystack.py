"""Haystack text and word lists for generated tasks, from any knormctl text source.

RULER's "essay" haystack is Paul Graham's essays joined into one text, whitespace
collapsed, cut into sentences with nltk, the first N words taken. Here the documents of
any text source (``wiki-lite-long``, ``text:PATH``, ``pg19``, ... -- engine/text.py) are
joined the same way, and each sample starts at a seeded sentence start (wrapping around
at the end), so samples differ in their haystack too. Sentences end at a word ending in
. ! or ? before a word starting with a capital, digit or quote, unless the word is a
title or an initial ("Mr.", "Dr.", "J."; no nltk).

RULER draws its needle keys (adjective-noun pairs) and the common-words lists from the
``wonderwords`` package's word lists. Offline, the word pool here is the source's own
vocabulary: distinct all-lowercase words of 4-10 letters, minus common function words,
sorted (so a source gives the same pool every time). The difference: words come from
the haystack's language and topic rather than a curated dictionary; for cwe, which never
shows the haystack, that only changes which words are counted.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from knormctl.errors import UsageError

MAX_WORDS = 2_000_000  # enough for 1M-token haystacks; a streamed source (pg19) is read no further
_POOL_WORD = re.compile(r"\b[a-z]{4,10}\b")
_SENTENCE_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*$")
_SENTENCE_START = re.compile(r"^[\"'(\[\u201c\u2018]*[A-Z0-9]")
# a period after these (or after an initial, "J.") does not end a sentence: nltk's punkt,
# which RULER uses, knows them; a needle must not land inside "Mr. Knightley"
_ABBREVIATION = re.compile(r"^[\"'(\[\u201c\u2018]*(?:[A-Z]|Mr|Mrs|Ms|Mme|Mlle|Dr|St|Mt|Jr|Sr|Prof|Rev|Hon|Gen|Col|"
                           r"Capt|Lt|Sgt|Gov|Sen|Rep|Messrs|No|Nos|Vol|vs|etc|viz|i\.e|e\.g|cf|Fig|Co|Inc|Ltd|Bros)\.$")
_STOPWORDS = frozenset((  # function words: keys and word lists should be content words
    "about above after again against also among because been before being below between both could does "
    "doing down during each even every first from further have having here into just like made many more "
    "most much must only other ought over said same shall should some such than that their theirs them then "
    "there these they this those through under until upon very were what when where which while whom whose "
    "will with would your yours").split())


@dataclass
class Haystack:
    """A source's text as one stream of words, and its word pool."""

    source: str
    words: list[str]
    pool: list[str]

    def sentence_start(self, rng: random.Random) -> int:
        """A seeded word index where a sentence starts (the first one after a random word)."""
        total = len(self.words)
        start = rng.randrange(total)
        for step in range(min(400, total)):
            i = (start + step) % total
            if is_sentence_start(self.words, i):
                return i
        return start

    def take(self, start: int, n_words: int) -> list[str]:
        """``n_words`` consecutive words from ``start``, wrapping around at the end."""
        total = len(self.words)
        if start + n_words <= total:
            return self.words[start:start + n_words]
        return [self.words[(start + k) % total] for k in range(n_words)]

    def pool_sample(self, rng: random.Random, k: int, what: str) -> list[str]:
        if k > len(self.pool):
            raise UsageError(f"{what} needs {k} distinct words; the haystack source {self.source!r} has only "
                             f"{len(self.pool)} (use a larger source or a shorter context length)")
        return rng.sample(self.pool, k)


def is_sentence_start(words: list[str], i: int) -> bool:
    if i == 0:
        return True
    prev = words[i - 1]
    return bool(_SENTENCE_END.search(prev)) and not _ABBREVIATION.match(prev) and bool(_SENTENCE_START.match(words[i]))


def sentence_starts(words: list[str]) -> list[int]:
    """Word indices where a sentence starts (0 always; len(words) as the end)."""
    return [i for i in range(len(words)) if is_sentence_start(words, i)] + [len(words)]


def load_haystack(source: str, progress: Callable[[str], None] | None = None) -> Haystack:
    """The source's documents joined into one word stream (at most MAX_WORDS words)."""
    from knormctl.engine.text import iter_documents

    words: list[str] = []
    pool: set[str] = set()
    for doc in iter_documents(source, progress):
        words.extend(doc.text.split())
        pool.update(w for w in _POOL_WORD.findall(doc.text) if w not in _STOPWORDS)
        if len(words) >= MAX_WORDS:
            break
    if len(words) < 100:
        raise UsageError(f"haystack source {source!r} has only {len(words)} words")
    return Haystack(source, words, sorted(pool))


def insert_at_depths(words: list[str], items: list[tuple[float, str]]) -> str:
    """The words as text, each item inserted at the sentence boundary nearest to its depth
    (a fraction of the words: 0 = before the first, 1 = after the last)."""
    starts = sentence_starts(words)
    placed = []
    for depth, item in sorted(items, key=lambda x: x[0]):
        target = depth * len(words)
        placed.append((min(starts, key=lambda s: (abs(s - target), s)), item))
    pieces, prev = [], 0
    for at, item in placed:
        if at > prev:
            pieces.append(" ".join(words[prev:at]))
        pieces.append(item)
        prev = max(prev, at)
    if prev < len(words):
        pieces.append(" ".join(words[prev:]))
    return " ".join(pieces)
