"""Text sources and sample selection: exact token counts, honest offsets, determinism, errors."""

from __future__ import annotations

import bz2
import hashlib
import pathlib
import time
import zipfile

import pytest

from knormctl.engine import assets, text as T
from knormctl.engine.text import hub as _hub, wiki as _wiki  # noqa: F401  (T.hub, T.wiki)
from knormctl.engine.text import load_documents, make_samples, validate_source
from knormctl.errors import AssetError, UsageError


def _docs(source):
    return {d.doc_id: d for d in load_documents(source)}


def _decoded(tok, s):
    return tok.decode(s.prompt_ids + s.eval_ids)


def test_books_samples_exact_counts_and_offsets(books_dir, tiny_tokenizer):
    source = f"text:{books_dir}"
    samples = make_samples(source, 8, tiny_tokenizer, prompt_tokens=300, eval_tokens=50, seed=0)
    docs = _docs(source)
    assert len(samples) == 8
    assert {s.doc_id for s in samples} <= set(docs)
    for s in samples:
        assert (len(s.prompt_ids), len(s.eval_ids)) == (300, 50)
        assert s.dataset == source
        assert s.doc_title == docs[s.doc_id].title == s.doc_id.removesuffix(".txt")
        text = docs[s.doc_id].text
        decoded = _decoded(tiny_tokenizer, s)
        assert text[s.char_offset:].startswith(decoded)  # the offset points at the sample's text
        assert s.char_offset == 0 or text[s.char_offset - 1].isspace()  # starts at a word boundary
        assert s.text_hash == hashlib.sha256(decoded.encode()).hexdigest()[:16]
        # eval_ids are the tokens that follow the prompt in the same text
        assert tiny_tokenizer(decoded, add_special_tokens=False).input_ids[:300] == s.prompt_ids


def test_same_seed_same_samples_other_seed_differs(books_dir, tiny_tokenizer):
    source = f"text:{books_dir}"
    a = make_samples(source, 4, tiny_tokenizer, 200, 20, seed=7)
    b = make_samples(source, 4, tiny_tokenizer, 200, 20, seed=7)
    c = make_samples(source, 4, tiny_tokenizer, 200, 20, seed=8)
    assert a == b
    assert [(s.doc_id, s.char_offset) for s in a] != [(s.doc_id, s.char_offset) for s in c]


def test_one_document_gives_many_non_overlapping_windows(books_dir, tiny_tokenizer):
    source = f"text:{books_dir / 'persuasion.txt'}"
    samples = make_samples(source, 20, tiny_tokenizer, 400, 100, seed=3)
    assert len(samples) == 20 and {s.doc_id for s in samples} == {"persuasion.txt"}
    spans = sorted((s.char_offset, s.char_offset + len(_decoded(tiny_tokenizer, s))) for s in samples)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, "windows overlap"
    assert len({s.text_hash for s in samples}) == 20


def test_fewer_documents_than_samples_uses_every_document(tmp_path, books_dir, tiny_tokenizer):
    emma = (books_dir / "emma.txt").read_text()
    (tmp_path / "a.txt").write_text(emma[:40_000])
    (tmp_path / "b.txt").write_text(emma[100_000:140_000])
    (tmp_path / "short.txt").write_text("Too short to hold a sample.\n")
    samples = make_samples(f"text:{tmp_path}", 6, tiny_tokenizer, 250, 50, seed=1)
    assert len(samples) == 6
    assert {s.doc_id for s in samples} == {"a.txt", "b.txt"}  # the short file is skipped


def test_only_a_window_is_tokenized(books_dir, tiny_tokenizer):
    """A 2k-token sample from a 900k-character novel must not tokenize the novel."""
    seen = []

    class Counting:
        is_fast = True

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tiny_tokenizer(text, **kw)

        def decode(self, ids):
            return tiny_tokenizer.decode(ids)

    make_samples(f"text:{books_dir / 'emma.txt'}", 1, Counting(), 2000, 100, seed=0)
    assert sum(seen) < 40_000  # 2100 tokens is ~6k characters with this tokenizer


def test_request_too_large_says_what_was_asked(tmp_path, tiny_tokenizer, books_dir):
    (tmp_path / "small.txt").write_text((books_dir / "emma.txt").read_text()[:6000])
    with pytest.raises(UsageError, match=r"5 samples of 500 tokens .* only \d could be made"):
        make_samples(f"text:{tmp_path}", 5, tiny_tokenizer, 400, 100, seed=0)


@pytest.mark.parametrize("content, problem", [
    (b"", "empty"),
    (b"  \n\n ", "empty"),
    (b"GIF89a\x00\x01\x02binary", "binary"),
    (b"caf\xe9 latin-1 text", "not UTF-8"),
])
def test_bad_text_files_are_usage_errors(tmp_path, tiny_tokenizer, content, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=problem) as err:
        make_samples(f"text:{path}", 1, tiny_tokenizer, 10, 0, seed=0)
    assert str(path) in str(err.value)


def test_missing_paths_and_empty_folders(tmp_path, tiny_tokenizer):
    with pytest.raises(UsageError, match="no such file or folder"):
        validate_source(f"text:{tmp_path / 'nope'}")
    with pytest.raises(UsageError, match="no such file or folder"):
        make_samples(f"text:{tmp_path / 'nope.txt'}", 1, tiny_tokenizer, 10, 0, seed=0)
    (tmp_path / "notes.md").write_text("not a txt file")
    with pytest.raises(UsageError, match="no .txt files"):
        validate_source(f"text:{tmp_path}")
    with pytest.raises(UsageError, match="needs a path"):
        validate_source("text:")


def test_unknown_source(tiny_tokenizer):
    with pytest.raises(UsageError, match="unknown text source 'wikipedia'.*wiki-lite, wiki-lite-long, wikitext, pg19"):
        validate_source("wikipedia")
    with pytest.raises(UsageError, match="unknown text source"):
        make_samples("c4", 1, tiny_tokenizer, 10, 0, seed=0)


def test_validate_source_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(T.wiki, "pip_download", lambda *a, **k: pytest.fail("validate_source downloaded"))
    for name in ("wiki-lite", "wiki-lite-long", "wikitext", "pg19"):
        validate_source(name)


def test_bad_counts(books_dir, tiny_tokenizer):
    source = f"text:{books_dir}"
    assert make_samples(source, 0, tiny_tokenizer, 10, 0, seed=0) == []
    with pytest.raises(UsageError):
        make_samples(source, -1, tiny_tokenizer, 10, 0, seed=0)
    with pytest.raises(UsageError):
        make_samples(source, 1, tiny_tokenizer, 0, 10, seed=0)


def test_wiki_markup_is_stripped():
    markup = """{{Infobox person|name=Ada}}
'''Ada''' was a [[mathematician|mathematical]] [[writer]].<ref>{{cite book|title=X}}</ref> She wrote notes.<ref name="a"/>
[[File:Ada.jpg|thumb|upright|A portrait of [[Ada]]]]
== Life ==
Born in [[London]] in 1815.<!-- hidden -->
{| class="wikitable"
| cell || cell
|}
== See also ==
* [[Charles Babbage]]
[[Category:Mathematicians]]
[[de:Ada Lovelace]]
"""
    text = T.wiki.wiki_to_text(markup)
    assert text.startswith("Ada was a mathematical writer. She wrote notes.")
    assert "Born in London in 1815." in text and "Life" in text
    for junk in ("[[", "{{", "<ref", "thumb", "portrait", "cell", "Category", "Babbage", "hidden", "de:"):
        assert junk not in text


def test_hub_datasets_fail_fast_with_a_hint_when_unreachable(monkeypatch):
    monkeypatch.setattr(T.hub, "hub_status", lambda: (False, "test: Hub unreachable"))
    for source, hint in (("wikitext", "--wikitext-source wiki-lite"), ("pg19", "--pg19-source wiki-lite-long")):
        t0 = time.perf_counter()
        try:
            next(T.iter_documents(source))
        except AssetError as e:
            assert f"dataset '{source}' needs the Hugging Face Hub or its local cache" in str(e)
            assert hint in str(e) and "text:PATH" in str(e)
        else:  # this machine has the dataset in its Hugging Face cache
            pass
        assert time.perf_counter() - t0 < 15


def test_wiki_lite_real_fetch(real_home, tiny_tokenizer):
    """Fetches the gensim wheel once per machine (28 MB from PyPI), then reads the JSONL cache."""
    messages = []
    docs = load_documents("wiki-lite", progress=messages.append)
    assert len(docs) >= 100
    titles = [d.title for d in docs]
    assert "Anarchism" in titles and "Abraham Lincoln" in titles
    for d in docs:
        assert len(d.text.split()) >= 200
        assert "[[" not in d.text and "{{" not in d.text and "<ref" not in d.text
        assert d.dataset == "wiki-lite"
    assert (real_home / "data" / "wiki-lite.jsonl").exists()

    longest = load_documents("wiki-lite-long")
    lengths = [len(d.text) for d in longest]
    assert lengths == sorted(lengths, reverse=True)

    samples = make_samples("wiki-lite-long", 2, tiny_tokenizer, 500, 50, seed=0)
    assert [s.doc_title for s in samples] == [d.title for d in longest[:2]]  # long-first, not shuffled
    assert all(s.dataset == "wiki-lite-long" for s in samples)
    short = make_samples("wiki-lite", 3, tiny_tokenizer, 200, 20, seed=0)
    assert short == make_samples("wiki-lite", 3, tiny_tokenizer, 200, 20, seed=0)


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    from knormctl.engine.text import hub

    served = {}
    monkeypatch.setattr(hub, "hub_status", lambda: (True, "reachable"))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: served[name])
    return served


def test_wikitext_documents_split_at_top_level_titles_only(fake_hub):
    from knormctl.engine.text import hub

    fake_hub["wikitext"] = [{"text": t} for t in (
        "", " = Alpha = \n", " Alpha text .\n", " = = History = = \n", " More alpha .\n",
        " = Beta = \n", " Beta text .\n")]
    docs = list(hub.wikitext_documents())
    assert [(d.doc_id, d.title) for d in docs] == [("0", "Alpha"), ("1", "Beta")]
    assert "History" in docs[0].text and "More alpha" in docs[0].text


def test_pg19_documents_are_named_by_their_url(fake_hub):
    from knormctl.engine.text import hub

    fake_hub["deepmind/pg19"] = [{"url": "http://gutenberg/1", "short_book_title": "One", "text": "a"},
                                 {"short_book_title": "Two", "text": "b"}]
    assert [(d.doc_id, d.title) for d in hub.pg19_documents()] == [("http://gutenberg/1", "One"), ("1", "Two")]


def test_an_offline_dataset_load_does_not_leave_datasets_offline(monkeypatch):
    import datasets.config

    from knormctl.engine.text import hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_status", lambda: (False, "test: unreachable"))
    seen = []
    assert list(hub.hub_iter("x", "hint", lambda: seen.append(datasets.config.HF_HUB_OFFLINE) or [])) == []
    assert seen == [True]  # the load ran cache-only
    assert datasets.config.HF_HUB_OFFLINE is False  # and the setting is back


def test_a_folders_text_files_are_in_name_order_whatever_the_file_system_lists(tmp_path, monkeypatch):
    from knormctl.engine.text.sources import text_files

    for name in ("b.txt", "a.txt", "c.txt"):
        (tmp_path / name).write_text("x")
    original = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(original(self), reverse=True)))
    assert [p.name for p in text_files(tmp_path)] == ["a.txt", "b.txt", "c.txt"]


def test_text_files_get_plain_newlines_and_lose_a_byte_order_mark(tmp_path):
    from knormctl.engine.text import load_documents

    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfFirst line\r\nsecond line\rthird line\n")
    [doc] = load_documents(f"text:{tmp_path}")
    assert doc.text == "First line\nsecond line\nthird line\n"


def _page(pid, title, text, ns="0", redirect=False):
    red = '<redirect title="X" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{pid}</id>{red}"
            f"<revision><id>9</id><text>{text}</text></revision></page>")


@pytest.fixture
def fake_gensim_wheel():
    """A wheel in knormctl's downloads holding a tiny MediaWiki dump: no PyPI needed."""
    from knormctl.engine.text import wiki

    words = " ".join(f"word{i}" for i in range(250))
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + _page(1, "Long article", f"'''Long''' {words}.")
           + _page(2, "Stub", "Only a few words here.")
           + _page(3, "Talk:Long article", words, ns="1")
           + _page(4, "Redirected", f"#REDIRECT [[Long article]] {words}")
           + _page(5, "Flagged redirect", words, redirect=True)
           + "</mediawiki>")
    downloads = assets.knormctl_home() / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", "w") as zf:
        zf.writestr(wiki.WIKI_MEMBER, bz2.compress(xml.encode()))
    return wiki


def test_wiki_lite_keeps_long_articles_only(fake_gensim_wheel):
    wiki = fake_gensim_wheel
    docs = wiki.wiki_lite_documents()
    assert [(d.doc_id, d.title) for d in docs] == [("1", "Long article")]
    assert docs[0].text.startswith("Long word0") and docs[0].dataset == "wiki-lite"


def test_an_unreadable_wiki_lite_cache_is_rebuilt(fake_gensim_wheel):
    wiki = fake_gensim_wheel
    cache = assets.knormctl_home() / "data" / wiki.WIKI_CACHE
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json\n")
    assert [d.title for d in wiki.wiki_lite_documents()] == ["Long article"]


def test_wiki_lite_documents_are_visited_in_a_seeded_order(monkeypatch, tiny_tokenizer, books_dir):
    from knormctl.engine.text import make_samples, wiki
    from knormctl.engine.text.sources import Document

    emma = (books_dir / "emma.txt").read_text()
    docs = [Document("wiki-lite", str(i), f"T{i}", emma[i * 5000:(i + 1) * 5000]) for i in range(10)]
    monkeypatch.setattr(wiki, "wiki_lite_documents", lambda progress=None: list(docs))
    firsts = [[s.doc_id for s in make_samples("wiki-lite", 3, tiny_tokenizer, 50, 0, seed=seed)]
              for seed in range(4)]
    assert firsts[0] == [s.doc_id for s in make_samples("wiki-lite", 3, tiny_tokenizer, 50, 0, seed=0)]
    assert any(f != ["0", "1", "2"] for f in firsts)  # not simply the dump's first articles
    assert len({tuple(f) for f in firsts}) > 1


def test_a_document_just_long_enough_gives_its_one_window(tmp_path, tiny_tokenizer, books_dir):
    from knormctl.engine.text import make_samples

    text = (books_dir / "emma.txt").read_text()[2000:3500].strip() + "\n"
    (tmp_path / "a.txt").write_text(text)
    total = len(tiny_tokenizer(text, add_special_tokens=False).input_ids)
    [s] = make_samples(f"text:{tmp_path}", 1, tiny_tokenizer, total - 12, 10, seed=0)  # 2 tokens to spare
    assert (len(s.prompt_ids), len(s.eval_ids), s.char_offset) == (total - 12, 10, 0)
