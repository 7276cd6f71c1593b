"""The in-place KV buffer (engine/kvbuffer.py, issue 16): the same tokens and kept sets as the
reference path (transformers' DynamicCache), no reallocation per step, in-place compaction."""

from __future__ import annotations

import pytest
import torch

from knormctl.config import PressConfig
from knormctl.engine.kvbuffer import BufferLayer
from knormctl.engine.kvcache import CacheLedger, cache_kwargs, new_cache
from knormctl.engine.loop import run_generation
from knormctl.press_spec import parse_press_spec
from tiny_models import MODELS, VOCAB, llama as _llama, neox as _neox  # noqa: F401


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _ids(n=60, seed=1):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


# (spec, mode, keep_ratio, prune_after, skip_layers, keep_recent)
CASES = [
    ("none", "prefill", 1.0, 0, (), 0),
    ("knorm", "prefill", 0.5, 0, (), 0),
    ("knorm", "decode", 0.9, 16, (0,), 0),
    ("knorm", "prefill", 0.3, 0, (1,), 4),
    ("streaming", "prefill", 0.5, 0, (), 0),
    ("streaming", "decode", 0.8, 20, (), 0),
    ("snapkv(window_size=8)", "prefill", 0.5, 0, (), 0),
    ("adakv(base=knorm)", "prefill", 0.5, 0, (), 0),
    ("pyramidkv(window_size=4)", "prefill", 0.4, 0, (), 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("question", [False, True], ids=["plain", "question"])
def test_buffer_equals_the_reference_path(model, caches, case, question):
    spec, mode, kr, prune_after, skip, recent = case
    name, params = parse_press_spec(spec)
    cfg = PressConfig(press=name, params=params, keep_ratio=kr, prune_after=prune_after, skip_layers=skip,
                      mode=mode, keep_recent=recent).validate()
    q = _ids(7, seed=9)[0].tolist() if question else None
    ref = run_generation(model, _ids(), cfg, 12, question_ids=q, kv_buffer=False)
    buf = run_generation(model, _ids(), cfg, 12, question_ids=q, kv_buffer=True)
    ref_cache, buf_cache = caches
    assert all(type(la) is not BufferLayer for la in ref_cache.layers)
    assert all(type(la) is BufferLayer for la in buf_cache.layers)
    assert buf.token_ids == ref.token_ids
    assert (buf.kv_entries_peak, buf.kv_entries_final, buf.kv_bytes_final, buf.compress_events) == (
        ref.kv_entries_peak, ref.kv_entries_final, ref.kv_bytes_final, ref.compress_events)
    if kr < 1.0:
        assert buf.kv_entries_final < buf.kv_entries_peak  # the case does cut
    for lr, lb in zip(ref_cache.layers, buf_cache.layers):  # the same entries, in the same slots
        assert torch.equal(lr.keys, lb.keys) and torch.equal(lr.values, lb.values)
        live_r, live_b = getattr(lr, "live_mask", None), getattr(lb, "live_mask", None)
        assert (live_r is None) == (live_b is None)
        if live_r is not None:
            assert torch.equal(live_r, live_b)


def test_decode_steps_append_in_place_without_reallocating(model):
    """With the capacity the loop asks for, every step writes into the same buffer: the keys the
    model reads are views at one address, and the ledger sees one more entry per step."""
    cache = new_cache(model, capacity=20 + 10)
    ledger = CacheLedger(model, cache)
    kw = cache_kwargs(model, cache)
    ids = _ids(30)
    with torch.inference_mode():
        model(input_ids=ids[:, :20], position_ids=torch.arange(20).unsqueeze(0), **kw)
        ledger.grew(20)
        ptrs = {la.keys.data_ptr() for la in cache.layers}
        for p in range(20, 30):
            model(input_ids=ids[:, p:p + 1], position_ids=torch.tensor([[p]]), **kw)
            ledger.grew(1)
            assert {la.keys.data_ptr() for la in cache.layers} == ptrs
    for la in cache.layers:
        assert la.capacity == 30 and la.keys.shape[-2] == 30
        assert not la.keys.is_contiguous() or la.capacity == la.keys.shape[-2]


def test_running_out_of_room_grows_geometrically_and_keeps_the_entries():
    layer = BufferLayer(capacity=4)
    k = torch.arange(2 * 3 * 10 * 5, dtype=torch.float32).view(2, 3, 10, 5)
    layer.update(k[:, :, :3], -k[:, :, :3])
    assert layer.capacity == 4
    caps = []
    for p in range(3, 10):
        layer.update(k[:, :, p:p + 1], -k[:, :, p:p + 1])
        caps.append(layer.capacity)
    assert caps == [4, 8, 8, 8, 8, 16, 16]  # doubling: O(log n) copies, not one per step
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, -k)


def _filled(n=10, cap=12):
    layer = BufferLayer(capacity=cap)
    k = torch.randn(1, 2, n, 4, generator=torch.Generator().manual_seed(3))
    layer.update(k, k * 2)
    return layer, k


def test_compaction_moves_the_kept_entries_to_the_front_in_place():
    layer, k = _filled()
    addr = layer._k.data_ptr()
    idx = torch.tensor([[[0, 3, 4, 7, 9], [1, 2, 5, 6, 8]]])
    layer.compact(idx)
    want = torch.stack([k[0, h, idx[0, h]] for h in range(2)]).unsqueeze(0)
    assert torch.equal(layer.keys, want) and torch.equal(layer.values, want * 2)
    assert layer._k.data_ptr() == addr and layer.capacity == 12  # kept 5 + 2 to come > half of 12
    layer.update(k[:, :, :1], k[:, :, :1])  # appends after the kept entries, same buffer
    assert layer.keys.shape[-2] == 6 and torch.equal(layer.keys[:, :, 5], k[:, :, 0])
    assert layer._k.data_ptr() == addr


def test_compaction_in_place_with_a_value_head_size_unlike_the_keys():
    """The in-place compaction viewed the value buffer with the key head size: a model whose
    value heads differ from its key heads (MLA-style 192/128) failed at the first cut."""
    layer = BufferLayer(capacity=12)
    k = torch.randn(1, 2, 10, 6, generator=torch.Generator().manual_seed(3))
    v = torch.randn(1, 2, 10, 4, generator=torch.Generator().manual_seed(4))
    layer.update(k, v)
    idx = torch.tensor([[[0, 3, 4, 7, 9], [1, 2, 5, 6, 8]]])
    layer.compact(idx)
    assert torch.equal(layer.keys, torch.stack([k[0, h, idx[0, h]] for h in range(2)]).unsqueeze(0))
    assert torch.equal(layer.values, torch.stack([v[0, h, idx[0, h]] for h in range(2)]).unsqueeze(0))


def test_a_deep_cut_gives_the_evicted_memory_back():
    layer, k = _filled(n=40, cap=42)  # 2 tokens still to come
    layer.compact(torch.arange(0, 40, 4).view(1, 1, 10).expand(1, 2, 10).contiguous())
    assert layer.capacity == 12  # kept 10 + the 2 still to come
    assert torch.equal(layer.keys, k[:, :, ::4])
    for _ in range(2):
        layer.update(k[:, :, :1], k[:, :, :1])
    assert layer.capacity == 12 and layer.keys.shape[-2] == 12


def test_tensors_assigned_from_outside_are_adopted():
    """kvpress's hook assigns layer.keys/values itself: the next append continues from them."""
    layer, k = _filled()
    layer.keys, layer.values = k[:, :, 2:5].clone(), k[:, :, 2:5].clone() * 2
    layer.update(k[:, :, :1], k[:, :, :1] * 2)
    assert torch.equal(layer.keys, torch.cat([k[:, :, 2:5], k[:, :, :1]], dim=-2))
    assert torch.equal(layer.values, layer.keys * 2)
