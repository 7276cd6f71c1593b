"""Text source names, the documents of each source, and plain text files.

Sources:
  wiki-lite       real Wikipedia articles from the PyPI wheel gensim==4.4.0 (offline default; ``wiki.py``)
  wiki-lite-long  the same articles, longest first (the offline stand-in for pg-19)
  wikitext        wikitext-2-raw-v1, test split, through ``datasets`` (Hub or its cache; ``hub.py``)
  pg19            deepmind/pg19, test split, streamed (Hub or its cache; ``hub.py``)
  text:PATH       a UTF-8 .txt file, or a folder of them (one document per file)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from knormctl.errors import UsageError

SOURCES = ("wiki-lite", "wiki-lite-long", "wikitext", "pg19")


@dataclass
class Document:
    """One article, book or file."""

    dataset: str
    doc_id: str
    title: str | None
    text: str


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


def iter_documents(source: str, progress: Callable[[str], None] | None = None) -> Iterator[Document]:
    """Documents of a source, in the source's own order (pg19 is streamed lazily)."""
    from knormctl.engine.text import hub, wiki  # their imports (the wheel, datasets) only when used

    kind, path = parse_source(source)
    if kind == "wiki-lite":
        yield from wiki.wiki_lite_documents(progress)
    elif kind == "wiki-lite-long":
        docs = wiki.wiki_lite_documents(progress)
        for d in sorted(docs, key=lambda d: len(d.text), reverse=True):  # stable: ties keep dump order
            yield Document("wiki-lite-long", d.doc_id, d.title, d.text)
    elif kind == "text":
        for p in text_files(path):
            yield Document(source, p.name, p.stem, read_text_file(p))
    elif kind == "wikitext":
        yield from hub.wikitext_documents()
    elif kind == "pg19":
        yield from hub.pg19_documents()


def load_documents(source: str, progress: Callable[[str], None] | None = None) -> list[Document]:
    """All documents of a source as a list (avoid for pg19: it is large)."""
    return list(iter_documents(source, progress))
