"""Shared fixtures: an isolated cache per test, a tiny tokenizer, tiny Llama and GPT-NeoX folders.

Slow end-to-end tests ask for ``real_home``: a persistent cache (``$KNORMCTL_TEST_HOME``,
else ``~/.cache/knormctl-test``) so the smollm2 download + conversion happens once per machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BOOKS = REPO.parent / "shared" / "data" / "books"  # real novels: test data, not part of the product

TINY_VOCAB = 512  # byte-level BPE: 256 bytes + merges; small enough to train in well under a second


@pytest.fixture(scope="session")
def real_home() -> Path:
    """A persistent knormctl home for slow tests (real smollm2-135m, real wiki-lite)."""
    home = Path(os.environ.get("KNORMCTL_TEST_HOME") or Path.home() / ".cache" / "knormctl-test")
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(autouse=True)
def _isolated_home(request, tmp_path, monkeypatch):
    """Every test gets its own cache folder and results database (tests that ask for
    ``real_home`` get that cache instead, so real assets are fetched once)."""
    if "real_home" in request.fixturenames:
        home = request.getfixturevalue("real_home")
    else:
        home = tmp_path / "knormctl-home"
    monkeypatch.setenv("KNORMCTL_HOME", str(home))
    monkeypatch.setenv("KNORMCTL_DB", str(tmp_path / "knormctl.db"))


@pytest.fixture(scope="session")
def books_dir() -> Path:
    """../shared/data/books: six Jane Austen novels (plain UTF-8)."""
    assert BOOKS.is_dir(), f"shared test data missing: {BOOKS}"
    return BOOKS


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (fast, with offsets) trained on a slice of Emma."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (BOOKS / "emma.txt").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)


@pytest.fixture(scope="session")
def hay(books_dir):
    """The novels as a task haystack (RULER, needle grids, passkey)."""
    from knormctl.tasks.haystack import load_haystack

    return load_haystack(f"text:{books_dir}")


@pytest.fixture(scope="session")
def fmt(tiny_tokenizer):
    """Prompts built with the tiny tokenizer, no chat template."""
    from knormctl.tasks.prompt import PromptFormat

    return PromptFormat(tiny_tokenizer, "off")


def _tiny_model_dir(folder: Path, config_cls, model_cls, tokenizer, **arch) -> Path:
    """A 2-layer, 32-wide random model of ``config_cls`` sharing the tokenizer's vocabulary and
    special tokens, saved (safetensors) with the tokenizer as a model folder."""
    import torch

    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer Llama (GQA: 4 heads, 2 KV heads) + tokenizer, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), LlamaConfig, LlamaForCausalLM, tiny_tokenizer,
                           num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer GPT-NeoX (Pythia layout, partial rotary) + tokenizer, saved as a model folder."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return _tiny_model_dir(tmp_path_factory.mktemp("tiny-neox"), GPTNeoXConfig, GPTNeoXForCausalLM, tiny_tokenizer,
                           rotary_pct=0.25)


@pytest.fixture
def db(tmp_path) -> str:
    """Path of a fresh results database (report and plot tests)."""
    return str(tmp_path / "r.db")


@pytest.fixture
def store(db):
    """An open store on ``db``, for tests that fill it by hand."""
    from knormctl.store import open_store

    with open_store(db) as s:
        yield s


@pytest.fixture
def caches(monkeypatch):
    """Every cache ``run_generation`` makes, in order, to compare what each path held."""
    from knormctl.engine import loop

    made = []
    real = loop.new_cache

    def recording(model, **kw):
        made.append(real(model, **kw))
        return made[-1]

    monkeypatch.setattr(loop, "new_cache", recording)
    return made
