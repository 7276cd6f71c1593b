"""The three question-task protocols on a tiny model: what is compressed and what is not.

A probe press records how many entries it was asked to score (= the entries eligible for
eviction) and keeps the OLDEST ones, so anything that was eligible and recent -- the
question -- is visibly evicted. The generation's cache is captured at the end, and the
model's forwards are logged (how many tokens each one fed).
"""

from __future__ import annotations

import math

import pytest
import torch

from knormctl.config import PressConfig
from knormctl.engine import loop
from knormctl.engine.loop import run_generation
from knormctl.engine.presses import PRESSES, BasePress
from knormctl.tasks.protocol import split
from knormctl.tasks.prompt import QuestionSample

NEW = 4
KEEP = 0.5


class OldestFirstProbe(BasePress):
    """Keeps the oldest entries; records the length of every scoring call."""

    name = "probe"
    seen: list[int] = []

    def score(self, keys, values, layer_idx=None):
        OldestFirstProbe.seen.append(keys.shape[-2])
        s = keys.shape[-2]
        return -torch.arange(s, dtype=torch.float32).expand(*keys.shape[:-1])


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    from knormctl.engine.models import load_model

    return load_model(str(tiny_llama_dir), device="cpu")


@pytest.fixture
def sample(lm):
    enc = lambda s: lm.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    context = enc("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
                  "seemed to unite some of the best blessings of existence.")
    question = enc("\nWho seemed to unite the best blessings?")
    suffix = enc("\nAnswer: the one")
    return QuestionSample(task="ruler", subtask="test", dataset="t", doc_id="0", doc_title=None, char_offset=None,
                          context_ids=context, question_ids=question, suffix_ids=suffix, answers=["Emma"],
                          metric="string_match_all", max_new_tokens=NEW)


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(PRESSES, "probe", OldestFirstProbe)
    OldestFirstProbe.seen = []
    return OldestFirstProbe


@pytest.fixture
def capture(monkeypatch, lm):
    """The cache of each generation, and the token count of each forward."""
    caches, forwards = [], []

    real = loop.new_cache

    def recording(model, **kw):
        cache = real(model, **kw)
        caches.append(cache)
        return cache

    monkeypatch.setattr(loop, "new_cache", recording)
    handle = lm.model.register_forward_pre_hook(
        lambda mod, args, kwargs: forwards.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    yield caches, forwards
    handle.remove()


def _generate(lm, sample, protocol, press="probe"):
    ids, question = split(sample, protocol)
    pc = PressConfig(press=press, keep_ratio=KEEP if press != "none" else 1.0, prune_after=0, skip_layers=(),
                     mode="prefill")
    return run_generation(lm.model, ids, pc, NEW, question_ids=question, tokenizer=lm.tokenizer)


def _layer0_keys(cache):
    return cache.layers[0].keys[0, 0]  # (seq, head_dim) of the first KV head


def _contains_rows(big: torch.Tensor, rows: torch.Tensor) -> list[bool]:
    # close, not equal: a forward over a different number of tokens rounds differently
    return [bool(any(torch.allclose(r, b, atol=1e-5, rtol=1e-4) for b in big)) for r in rows]


@pytest.mark.parametrize("protocol, eligible, fed_after", [
    ("context", "C", "Q+S"), ("query-aware", "C+Q", "S"), ("paper", "C+Q+S", None)])
def test_what_each_protocol_compresses(lm, sample, probe, capture, protocol, eligible, fed_after):
    caches, forwards = capture
    C, Q, S = len(sample.context_ids), len(sample.question_ids), len(sample.suffix_ids)
    size = {"C": C, "C+Q": C + Q, "C+Q+S": C + Q + S, "Q+S": Q + S, "S": S}
    _generate(lm, sample, protocol)
    # the press scored exactly the eligible entries, once per layer, once per generation (prefill mode)
    assert probe.seen == [size[eligible]] * lm.num_layers
    # forwards: the compressed part, then (if any) the part fed after the cut, then one token per step
    first = [size[eligible]] + ([size[fed_after]] if fed_after else [])
    assert forwards == first + [1] * (NEW - 1)
    # after the cut: ceil(keep x eligible) entries, plus everything fed since (the last token is never fed)
    kept = math.ceil(KEEP * size[eligible])
    after = size[fed_after] if fed_after else 0
    assert [layer.keys.shape[-2] for layer in caches[0].layers] == [kept + after + NEW - 1] * lm.num_layers


def test_context_protocol_keeps_every_question_token_and_paper_evicts_them(lm, sample, probe, capture):
    caches, _ = capture
    C, Q, S = len(sample.context_ids), len(sample.question_ids), len(sample.suffix_ids)
    _generate(lm, sample, "context", press="none")  # reference: nothing evicted
    # layer-0 keys depend only on the token and its position, so the question's entries can be found by value
    reference = _layer0_keys(caches[0])
    question_rows = reference[C:C + Q + S]
    assert reference.shape[0] == C + Q + S + NEW - 1
    _generate(lm, sample, "context")
    assert all(_contains_rows(_layer0_keys(caches[1]), question_rows))  # all there, uncompressed
    _generate(lm, sample, "query-aware")
    found = _contains_rows(_layer0_keys(caches[2]), question_rows)
    assert not any(found[:Q]) and all(found[Q:])  # question eligible (and the oldest-first probe evicted it)
    _generate(lm, sample, "paper")
    assert not any(_contains_rows(_layer0_keys(caches[3]), question_rows))  # question and answer prefix evicted


def test_paper_takes_the_first_token_before_the_cut(lm, sample, probe):
    full = _generate(lm, sample, "paper", press="none")
    paper = _generate(lm, sample, "paper")
    context = _generate(lm, sample, "context")
    # the first answer token comes from the uncompressed prefill, whatever the press evicts
    assert paper.token_ids[0] == full.token_ids[0]
    with torch.inference_mode():  # the same token a plain forward over the whole prompt predicts
        logits = lm.model(torch.tensor([sample.prompt_ids])).logits[0, -1]
    assert int(logits.argmax()) == full.token_ids[0]
    # context mode: the first token came from a forward that attended to the compressed cache
    assert context.compress_events == 1 and context.ttft_s > 0


def test_the_three_protocols_see_the_same_tokens(sample):
    pieces = {p: split(sample, p) for p in ("context", "query-aware", "paper")}
    for ids, question in pieces.values():
        assert ids + (question or []) == sample.prompt_ids
    with pytest.raises(ValueError, match="unknown protocol"):
        split(sample, "both")


def test_stepwise_question_feed_equals_one_forward(lm, sample):
    """Where a multi-token forward cannot be masked per layer the loop feeds one token at a time;
    on equal lengths both give the same result."""
    from transformers import DynamicCache

    from knormctl.engine.kvcache import cache_kwargs

    C, n = len(sample.context_ids), len(sample.prompt_ids)
    rest = torch.tensor([sample.question_ids + sample.suffix_ids])
    positions = torch.arange(C, n).unsqueeze(0)
    outs, caches = [], []
    with torch.inference_mode():
        for stepwise in (False, True):
            cache = DynamicCache(config=lm.model.config)
            lm.model(input_ids=torch.tensor([sample.context_ids]), position_ids=torch.arange(C).unsqueeze(0),
                     **cache_kwargs(lm.model, cache))  # the cache under the name this transformers reads
            fwd = loop.CachedForward(lm.model, cache, last_logits_only=False)
            fwd.ledger.held = [C] * len(cache.layers)  # the context's prefill above, outside the ledger
            outs.append(loop.feed(fwd, rest, positions, stepwise=stepwise).logits[0, -1])
            caches.append(cache)
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5, rtol=1e-4)


def test_context_protocol_with_a_skipped_layer(lm, sample, probe, capture):
    caches, forwards = capture
    C, Q, S = len(sample.context_ids), len(sample.question_ids), len(sample.suffix_ids)
    ids, question = split(sample, "context")
    pc = PressConfig(press="probe", keep_ratio=KEEP, prune_after=0, skip_layers=(0,), mode="prefill")
    run_generation(lm.model, ids, pc, NEW, question_ids=question)
    assert forwards == [C, Q + S] + [1] * (NEW - 1)  # the question in one forward, a mask per layer
    lengths = [layer.keys.shape[-2] for layer in caches[0].layers]
    assert lengths[0] == C + Q + S + NEW - 1  # layer 0 skipped: nothing evicted
    assert lengths[1:] == [math.ceil(KEEP * C) + Q + S + NEW - 1] * (lm.num_layers - 1)
