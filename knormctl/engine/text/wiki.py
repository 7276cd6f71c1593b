"""wiki-lite: real Wikipedia articles, offline. The PyPI wheel gensim==4.4.0 ships a MediaWiki
dump excerpt (206 pages) as test data; its articles are read out of the wheel once, the
markup stripped (mwparserfromhell), and cached as JSONL in knormctl's home."""

from __future__ import annotations

import bz2
import json
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from knormctl.engine.assets import knormctl_home, pip_download, remove_quietly, short_reason
from knormctl.engine.text.sources import Document
from knormctl.errors import AssetError

# The pip flags pick the cp311 manylinux wheel on any machine; we only read a data file out of it.
GENSIM_WHEEL = "gensim==4.4.0"
GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
GENSIM_PIP_ARGS = ("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                   "--platform", "manylinux_2_28_x86_64")
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_WORDS = 200  # drop stubs and lists: too short to hold a sample
WIKI_CACHE = "wiki-lite.jsonl"


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
