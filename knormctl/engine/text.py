"""Text sources and deterministic sample selection.

Sources:
  wiki-lite       real Wikipedia articles from the PyPI wheel gensim==4.4.0 (offline default)
  wiki-lite-long  the same articles, longest first (the offline stand-in for pg-19)
  wikitext        wikitext-2-raw-v1, test split, through ``datasets`` (Hub or its cache)
  pg19            deepmind/pg19, test split, streamed (Hub or its cache)
  text:PATH       a UTF-8 .txt file, or a folder of them (one document per file)

A sample is ``prompt_tokens + eval_tokens`` contiguous tokens cut from one document at a
seeded offset. Only a character window around the offset is tokenized, never a whole novel.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import random
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from knormctl.engine.assets import hub_status, knormctl_home, pip_download, remove_quietly, short_reason
from knormctl.errors import AssetError, UsageError

SOURCES = ("wiki-lite", "wiki-lite-long", "wikitext", "pg19")

# wiki-lite: a real MediaWiki dump excerpt (206 pages) shipped as gensim test data. The pip flags
# pick the cp311 manylinux wheel on any machine; we only read a data file out of it.
GENSIM_WHEEL = "gensim==4.4.0"
GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
GENSIM_PIP_ARGS = ("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                   "--platform", "manylinux_2_28_x86_64")
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_WORDS = 200  # drop stubs and lists: too short to hold a sample
WIKI_CACHE = "wiki-lite.jsonl"

SAFETY_TOKENS = 4  # extra tokens tokenized past a window, so its last token is not cut mid-word


@dataclass
class Document:
    """One article, book or file."""

    dataset: str
    doc_id: str
    title: str | None
    text: str


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


# ---------------------------------------------------------------------------------------
# source names


def parse_source(source: str) -> tuple[str, Path | None]:
    """'text:PATH' -> ('text', Path); a built-in name -> (name, None); else UsageError."""
    if source.startswith("text:"):
        raw = source[len("text:"):]
        if not raw:
            raise UsageError("text source 'text:' needs a path, e.g. text:../shared/data/books")
        return "text", Path(raw).expanduser()
    if source in SOURCES:
        return source, None
    raise UsageError(f"unknown text source {source!r} (choose wiki-lite, wiki-lite-long, wikitext, pg19 or text:PATH)")


def validate_source(source: str) -> None:
    """Cheap check of a source name and, for text:PATH, that the path holds text files.

    Downloads nothing and reads no file contents; used before any model is loaded.
    """
    kind, path = parse_source(source)
    if kind == "text":
        text_files(path)


def text_files(path: Path) -> list[Path]:
    """The .txt files of a text:PATH source: the file itself, or a folder's *.txt sorted by name."""
    if not path.exists():
        raise UsageError(f"text source {path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
        if not files:
            raise UsageError(f"text source {path}: folder has no .txt files")
        return files
    if not os.access(path, os.R_OK):
        raise UsageError(f"text source {path}: file is not readable")
    return [path]


def read_text_file(path: Path) -> str:
    """A UTF-8 text file with '\\n' line ends; empty, binary or non-UTF-8 files are errors."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"text source {path}: cannot read ({e.strerror or e})") from None
    if b"\x00" in data:
        raise UsageError(f"text source {path}: binary file (contains NUL bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"text source {path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise UsageError(f"text source {path}: file is empty")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------------------
# documents


def iter_documents(source: str, progress: Callable[[str], None] | None = None) -> Iterator[Document]:
    """Documents of a source, in the source's own order (pg19 is streamed lazily)."""
    kind, path = parse_source(source)
    if kind == "wiki-lite":
        yield from wiki_lite_documents(progress)
    elif kind == "wiki-lite-long":
        docs = wiki_lite_documents(progress)
        for d in sorted(docs, key=lambda d: len(d.text), reverse=True):  # stable: ties keep dump order
            yield Document("wiki-lite-long", d.doc_id, d.title, d.text)
    elif kind == "text":
        for p in text_files(path):
            yield Document(source, p.name, p.stem, read_text_file(p))
    elif kind == "wikitext":
        yield from _wikitext_documents()
    elif kind == "pg19":
        yield from _pg19_documents()


def load_documents(source: str, progress: Callable[[str], None] | None = None) -> list[Document]:
    """All documents of a source as a list (avoid for pg19: it is large)."""
    return list(iter_documents(source, progress))


# --- wiki-lite ------------------------------------------------------------------------


def wiki_lite_documents(progress: Callable[[str], None] | None = None) -> list[Document]:
    """The wiki-lite articles, built once from the gensim wheel and cached as JSONL."""
    path = knormctl_home() / "data" / WIKI_CACHE
    for attempt in range(2):
        if not path.exists():
            build_wiki_lite(path, progress)
        try:
            docs = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    r = json.loads(line)
                    docs.append(Document("wiki-lite", str(r["id"]), r["title"], r["text"]))
            if docs:
                return docs
        except (OSError, ValueError, KeyError):
            pass
        remove_quietly(path)  # unreadable cache: build it again, once
    raise AssetError(f"could not read the wiki-lite cache {path}; delete it and try again")


def build_wiki_lite(path: Path, progress: Callable[[str], None] | None = None) -> int:
    """Fetch the gensim wheel, strip the articles' markup, write ``path`` (JSONL).

    Returns the number of articles written (-1 when another process wrote it meanwhile).
    """
    home = knormctl_home()
    hint = "check network access to PyPI or pass a text:PATH source"
    wheel = pip_download(GENSIM_WHEEL, home / "downloads", GENSIM_WHEEL_GLOB, extra_args=GENSIM_PIP_ARGS,
                         hint=hint, progress=progress, what="wiki-lite's source text (28 MB)")
    if progress:
        progress("extracting Wikipedia articles into wiki-lite (one time, ~5 s)")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(WIKI_MEMBER) as raw:
            articles = [(pid, title, wiki_to_text(markup)) for pid, title, markup in iter_wiki_pages(bz2.open(raw))]
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, ET.ParseError) as e:
        if path.exists():  # another process built it and removed the wheel
            return -1
        remove_quietly(wheel)  # a broken download: fetch it again next time
        raise AssetError(f"could not read {WIKI_MEMBER} from {wheel}: {short_reason(e)}; "
                         "run the command again to re-download it") from None
    articles = [a for a in articles if len(a[2].split()) >= WIKI_MIN_WORDS]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for pid, title, text in articles:
            f.write(json.dumps({"id": pid, "title": title, "text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # atomic: readers see the old state or the whole file
    remove_quietly(wheel)
    return len(articles)


def iter_wiki_pages(stream) -> Iterator[tuple[str, str, str]]:
    """(id, title, wikitext) of each article page of a MediaWiki XML dump (no redirects, namespace 0)."""
    def local(tag: str) -> str:  # '{http://www.mediawiki.org/xml/export-0.10/}page' -> 'page'
        return tag.rsplit("}", 1)[-1]

    for _, el in ET.iterparse(stream, events=("end",)):
        if local(el.tag) != "page":
            continue
        page = {"redirect": False, "text": ""}
        for child in el:
            name = local(child.tag)
            if name in ("title", "ns", "id"):
                page[name] = (child.text or "").strip()
            elif name == "redirect":
                page["redirect"] = True
            elif name == "revision":
                for sub in child:
                    if local(sub.tag) == "text":
                        page["text"] = sub.text or ""
        el.clear()  # keep memory flat
        if page.get("ns") == "0" and not page["redirect"] and not page["text"].lstrip().upper().startswith("#REDIRECT"):
            yield page.get("id", ""), page.get("title", ""), page["text"]


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref\s*>", re.S | re.I)
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]{0,300})?/?>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_FILE_LINK = re.compile(r"\[\[\s*(?:file|image)\s*:[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_DROP_LINK = re.compile(r"^\s*:?\s*(?:file|image|media|category|[a-z]{2,3}(?:-[a-z]+)?)\s*:", re.I)
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score",
              "syntaxhighlight", "source", "chem", "hiero"}
_APPENDIX = ("See also", "References", "External links", "Further reading")  # standard end sections
_JUNK_LINE = re.compile(r"^(?:thumb|thumbnail|left|right|center|upright|frameless|\d+px|alt=)[|=]|^Category:|^[{|!]", re.I)


def wiki_to_text(markup: str) -> str:
    """MediaWiki markup -> plain prose: no references, tables, templates, images, categories
    or end sections (See also, References, ...)."""
    import mwparserfromhell

    markup = _REF.sub("", _COMMENT.sub("", markup))
    code = mwparserfromhell.parse(markup)
    for node in code.filter_tags():
        if str(node.tag).strip().lower() in _DROP_TAGS:
            try:
                code.remove(node)
            except ValueError:  # already gone with a removed parent
                pass
    for node in code.filter_wikilinks():
        if _DROP_LINK.match(str(node.title)):  # images, categories, interlanguage links
            try:
                code.remove(node)
            except ValueError:
                pass
    text = code.strip_code()
    # What the parser left behind in malformed markup.
    text = _REF.sub("", text)
    text = _FILE_LINK.sub("", text)
    for _ in range(3):  # nested templates, innermost first
        text = _TEMPLATE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _HTML_TAG.sub("", text)
    text = text.replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")
    lines: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        if not line:
            if lines and lines[-1]:
                lines.append("")  # keep one blank line between paragraphs
            continue
        if line in _APPENDIX:  # link lists from here on, not prose
            break
        if _JUNK_LINE.match(line):  # image captions, category lines, table rows
            continue
        lines.append(line)
    return "\n".join(lines).strip()


# --- Hub datasets -----------------------------------------------------------------------


def _hub_iter(name: str, hint: str, load: Callable[[], Iterable[dict]]) -> Iterator[dict]:
    """Records of a ``datasets`` dataset; Hub or cache failures become one clear AssetError."""
    import datasets.config

    reachable, why = hub_status()
    saved = datasets.config.HF_HUB_OFFLINE
    if not reachable:
        datasets.config.HF_HUB_OFFLINE = True  # cache only: fails in a second instead of ~25 s of retries
    try:
        try:
            records = iter(load())
        finally:
            datasets.config.HF_HUB_OFFLINE = saved
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            yield record
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        reason = short_reason(e) if reachable else f"{why}, and it is not in the local cache"
        raise AssetError(f"dataset {name!r} needs the Hugging Face Hub or its local cache ({reason}); {hint}") from None


def _wikitext_documents() -> Iterator[Document]:
    """wikitext-2-raw-v1 test split, one document per top-level ' = Title = ' section."""
    import datasets

    def load():
        return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")

    header = re.compile(r" = ([^=].*?) = \n?")
    title, lines, index = None, [], 0
    for record in _hub_iter("wikitext", "use --wikitext-source wiki-lite or text:PATH", load):
        line = record["text"]
        m = header.fullmatch(line)
        if m:
            if title is not None and "".join(lines).strip():
                yield Document("wikitext", str(index), title, "".join(lines).strip("\n"))
                index += 1
            title, lines = m.group(1).strip(), []
        else:
            lines.append(line)
    if title is not None and "".join(lines).strip():
        yield Document("wikitext", str(index), title, "".join(lines).strip("\n"))


def _pg19_documents() -> Iterator[Document]:
    """deepmind/pg19 test split, streamed: one book per record, fetched only when reached."""
    import datasets

    def load():
        return datasets.load_dataset("deepmind/pg19", split="test", streaming=True)

    for i, record in enumerate(_hub_iter("pg19", "use --pg19-source wiki-lite-long or text:PATH", load)):
        doc_id = str(record.get("url") or i)
        yield Document("pg19", doc_id, record.get("short_book_title"), record["text"])


# ---------------------------------------------------------------------------------------
# samples


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
