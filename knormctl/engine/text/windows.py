"""Deterministic samples: contiguous token windows cut from a source's documents.

A sample is ``prompt_tokens + eval_tokens`` contiguous tokens cut from one document at a
seeded offset. Only a character window around the offset is tokenized, never a whole novel.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from knormctl.engine.text.sources import Document, iter_documents, load_documents, parse_source
from knormctl.errors import UsageError

SAFETY_TOKENS = 4  # extra tokens tokenized past a window, so its last token is not cut mid-word


@dataclass
class TextSample:
    """A prompt and the tokens that follow it, with where they came from."""

    dataset: str
    doc_id: str
    doc_title: str | None
    char_offset: int  # where the sample starts in the document's text
    text_hash: str  # sha256 (16 hex chars) of the decoded prompt + eval text
    prompt_ids: list[int]
    eval_ids: list[int] = field(default_factory=list)


@dataclass
class _DocWindows:
    """Windows already cut from one document (char intervals), and its chars-per-token estimate."""

    doc: Document
    used: list[tuple[int, int]] = field(default_factory=list)
    chars_per_token: float = 4.0
    exhausted: bool = False

    def gaps(self) -> list[tuple[int, int]]:
        free, pos = [], 0
        for a, b in sorted(self.used):
            if a > pos:
                free.append((pos, a))
            pos = max(pos, b)
        if pos < len(self.doc.text):
            free.append((pos, len(self.doc.text)))
        return free


def _snap(text: str, pos: int, limit: int) -> int:
    """Move ``pos`` forward to a line start (if one is near) or else a word start."""
    if pos > 0 and text[pos - 1] != "\n":
        nl = text.find("\n", pos, min(limit, pos + 400))
        if nl != -1:
            pos = nl + 1
        else:
            m = re.compile(r"\s").search(text, pos, limit)
            pos = m.end() if m else limit
    while pos < limit and text[pos].isspace():
        pos += 1
    return pos


def _cut(text: str, start: int, limit: int, need: int, tokenizer, chars_per_token: float):
    """(end_char, ids) of the first ``need`` tokens of text[start:limit], or None if it is too short.

    Tokenizes a character span sized from the chars-per-token estimate, growing it until
    it holds enough tokens: cost is proportional to the window, not to the document.
    """
    fast = getattr(tokenizer, "is_fast", False)
    span = int((need + SAFETY_TOKENS) * chars_per_token * 1.2) + 64
    while True:
        stop = min(limit, start + span)
        enc = tokenizer(text[start:stop], add_special_tokens=False, return_offsets_mapping=fast)
        ids = list(enc["input_ids"])
        at_limit = stop >= limit
        if len(ids) >= need + SAFETY_TOKENS or (at_limit and len(ids) >= need):
            # Slow tokenizers give no offsets: count the whole span as used (never overlaps).
            end = start + enc["offset_mapping"][need - 1][1] if fast else stop
            return end, ids[:need]
        if at_limit:
            return None
        span = int(span * (need + SAFETY_TOKENS) / max(len(ids), 1) * 1.2) + 64


def _take_window(state: _DocWindows, need: int, tokenizer, rng: random.Random):
    """Cut one more window from a free stretch of the document: (start, ids) or None."""
    text = state.doc.text
    est = int(need * state.chars_per_token)
    # One character is at most 4 tokens (byte-level BPE, 4-byte UTF-8), so a gap shorter than
    # need/4 characters cannot hold the window; every other gap is tried for real.
    gaps = [g for g in state.gaps() if g[1] - g[0] >= need / 4]
    rng.shuffle(gaps)
    for g0, g1 in gaps:
        tries = [rng.randint(g0, g1 - est)] if g1 - est > g0 else []
        tries.append(g0)  # packed at the gap's start: the most that can still fit
        for pos in tries:
            start = _snap(text, pos, g1)
            got = _cut(text, start, g1, need, tokenizer, state.chars_per_token)
            if got:
                end, ids = got
                state.used.append((start, end))
                state.chars_per_token = max((end - start) / need, 0.5)  # this document's own ratio
                return start, ids
    return None


def make_samples(source: str, n: int, tokenizer, prompt_tokens: int, eval_tokens: int, seed: int,
                 progress: Callable[[str], None] | None = None) -> list[TextSample]:
    """``n`` samples of ``prompt_tokens + eval_tokens`` contiguous tokens, chosen from ``seed``.

    Documents are visited in a seeded order (wiki-lite-long: longest first; pg19: stream
    order) and each gives one window at a seeded offset; documents too short are skipped.
    If that is not enough, further rounds cut more non-overlapping windows from the
    documents already used. A source that cannot fill the request raises UsageError.
    """
    if n < 0:
        raise UsageError(f"number of samples must be >= 0, got {n}")
    if prompt_tokens < 1 or eval_tokens < 0:
        raise UsageError(f"need prompt_tokens >= 1 and eval_tokens >= 0, got {prompt_tokens} and {eval_tokens}")
    kind, _ = parse_source(source)
    if n == 0:
        return []
    need = prompt_tokens + eval_tokens
    rng = random.Random(seed)
    if progress:
        progress(f"cutting {n} sample(s) of {prompt_tokens}{f' + {eval_tokens}' if eval_tokens else ''} tokens "
                 f"from {source}")

    if kind == "pg19":
        docs: Iterator[Document] = iter_documents(source, progress)  # lazy: books are large
    else:
        ordered = load_documents(source, progress)
        if kind != "wiki-lite-long":
            rng.shuffle(ordered)
        docs = iter(ordered)

    samples: list[TextSample] = []
    states: list[_DocWindows] = []
    seen = 0
    chars_per_token = 4.0  # learned from each window cut; sizes the next tokenized span

    def add(state: _DocWindows, start: int, ids: list[int]) -> None:
        text = tokenizer.decode(ids)
        samples.append(TextSample(
            dataset=state.doc.dataset, doc_id=state.doc.doc_id, doc_title=state.doc.title, char_offset=start,
            text_hash=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            prompt_ids=ids[:prompt_tokens], eval_ids=ids[prompt_tokens:]))

    # Round one: one window per document, documents in order.
    while len(samples) < n:
        doc = next(docs, None)
        if doc is None:
            break
        seen += 1
        state = _DocWindows(doc, chars_per_token=chars_per_token)
        got = _take_window(state, need, tokenizer, rng)
        if got:
            states.append(state)
            add(state, *got)
            chars_per_token = state.chars_per_token
    # Later rounds: more windows from the documents that had room (a novel holds many).
    while len(samples) < n and any(not s.exhausted for s in states):
        for state in states:
            if len(samples) == n:
                break
            if state.exhausted:
                continue
            got = _take_window(state, need, tokenizer, rng)
            if got:
                add(state, *got)
            else:
                state.exhausted = True

    if len(samples) < n:
        raise UsageError(
            f"text source {source!r} cannot fill the request: {n} samples of {need} tokens "
            f"({prompt_tokens} prompt + {eval_tokens} eval) were asked, only {len(samples)} could be made "
            f"({len(states)} of {seen} documents are long enough); ask for fewer or shorter samples")
    return samples
