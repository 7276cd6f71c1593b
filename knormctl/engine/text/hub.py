"""The Hub text sources (wikitext, pg19) through ``datasets``, and the one-line failure every
Hub dataset gets offline (the question tasks' Hub sets use ``hub_iter`` too)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from knormctl.engine.assets import hub_status, short_reason
from knormctl.engine.text.sources import Document
from knormctl.errors import AssetError


def hub_iter(name: str, hint: str, load: Callable[[], Iterable[dict]]) -> Iterator[dict]:
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


def wikitext_documents() -> Iterator[Document]:
    """wikitext-2-raw-v1 test split, one document per top-level ' = Title = ' section."""
    import datasets

    def load():
        return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")

    header = re.compile(r" = ([^=].*?) = \n?")
    title, lines, index = None, [], 0
    for record in hub_iter("wikitext", "use --wikitext-source wiki-lite or text:PATH", load):
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


def pg19_documents() -> Iterator[Document]:
    """deepmind/pg19 test split, streamed: one book per record, fetched only when reached."""
    import datasets

    def load():
        return datasets.load_dataset("deepmind/pg19", split="test", streaming=True)

    for i, record in enumerate(hub_iter("pg19", "use --pg19-source wiki-lite-long or text:PATH", load)):
        doc_id = str(record.get("url") or i)
        yield Document("pg19", doc_id, record.get("short_book_title"), record["text"])
