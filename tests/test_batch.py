"""Batches of equal-length prompts (issue 16 item 3, engine/batch.py): row j of a batch generates
exactly the tokens, and keeps exactly the entries, that prompt j generates and keeps alone --
for every kind of press, both cache paths, chunked prefill and question protocols.

float32 models (knorm scores in float32, so float64 is refused): a batched matmul may round
differently from a batch-1 one; kept keys are compared to 1e-5, and on these random prompts no
greedy token or kept entry is near enough a tie to flip. The rows differ from each
other (asserted), so a bug that broadcast row 0 to every row would fail.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from knormctl.config import PressConfig
from knormctl.engine import loop
from knormctl.engine.batch import as_batch_ids, batch_refusal
from knormctl.engine.loop import run_generation
from knormctl.errors import UsageError
from knormctl.press_spec import parse_press_spec
from tiny_models import MODELS, VOCAB

B, PROMPT, NEW = 3, 48, 8
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def llama32():
    return MODELS["llama"]()


@pytest.fixture
def caches(monkeypatch):
    made = []
    real = loop.new_cache
    monkeypatch.setattr(loop, "new_cache", lambda m, **kw: made.append(real(m, **kw)) or made[-1])
    return made


def _prompts(n=PROMPT, b=B, seed=5):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def _cfg(spec, mode="prefill", kr=0.5, prune_after=0, keep_recent=0):
    if spec == "none":
        return PressConfig().validate()
    name, params = parse_press_spec(spec)
    return PressConfig(press=name, params=params, keep_ratio=kr, prune_after=prune_after, skip_layers=(),
                       mode=mode, keep_recent=keep_recent).validate()


def _kept(layer, row):
    """Per head, the keys a layer holds for one row: the live ones after a per-head cut."""
    keys = layer.keys[row]
    live = getattr(layer, "live_mask", None)
    if live is None:
        return [keys[h] for h in range(keys.shape[0])]
    return [keys[h][live[row, h]] for h in range(keys.shape[0])]


def _check_rows_equal_alone(model, caches, cfg, *, kv_buffer=True, question=None, **kw):
    ids = _prompts()
    batch = run_generation(model, ids, cfg, NEW, seed=SEEDS, kv_buffer=kv_buffer, question_ids=question, **kw)
    batch_cache = caches[-1]
    assert batch.batch_size == B and len(batch.rows) == B
    assert batch.token_ids == batch.rows[0]
    assert len({tuple(r) for r in batch.rows}) > 1, "rows should differ (else a broadcast bug would pass)"
    per_head = cfg.press == "adakv"
    entries = []
    for j in range(B):
        q = None if question is None else question[j:j + 1]
        alone = run_generation(model, ids[j:j + 1], cfg, NEW, seed=SEEDS[j], kv_buffer=kv_buffer,
                               question_ids=q, **kw)
        assert batch.rows[j] == alone.token_ids, f"row {j}"
        entries.append([layer.keys.shape[-2] for layer in caches[-1].layers])
        assert batch.compress_events == alone.compress_events
        for li, (lb, la) in enumerate(zip(batch_cache.layers, caches[-1].layers)):
            kb, ka = _kept(lb, j), _kept(la, 0)
            for h, (x, y) in enumerate(zip(kb, ka)):
                assert x.shape == y.shape, f"row {j} layer {li} head {h}: {x.shape} vs {y.shape}"
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # every row keeps the same count; per-head budgets hold each layer at the largest per-head count
    # of ANY row (the cache is one length), live entries as alone (compared above), the rest masked
    held = [layer.keys.shape[-2] for layer in batch_cache.layers]
    assert held == ([max(col) for col in zip(*entries)] if per_head else entries[0])
    assert per_head or all(e == entries[0] for e in entries)
    # the rows kept different entries (different prompts): layer 1's keys differ between rows
    assert not torch.equal(batch_cache.layers[1].keys[0], batch_cache.layers[1].keys[1])
    return batch


PRESSES = [
    ("none", "prefill"),
    ("knorm", "prefill"), ("knorm", "decode"),
    ("random", "prefill"), ("random", "decode"),
    ("streaming", "prefill"), ("streaming", "decode"),
    ("snapkv(window_size=4)", "prefill"), ("snapkv(window_size=4)", "decode"),
    ("tova", "prefill"), ("tova", "decode"),
    ("expected-attention(n_future_positions=16)", "prefill"),
    ("expected-attention(n_future_positions=16)", "decode"),
    ("pyramidkv(window_size=4)", "prefill"),
    ("adakv(base=snapkv(window_size=4))", "prefill"),
    ("adakv(base=random)", "prefill"),
    ("criticalkv(base=knorm)", "prefill"),
]


@pytest.mark.parametrize("kv_buffer", [True, False], ids=["buffer", "reference"])
@pytest.mark.parametrize("spec,mode", PRESSES, ids=[f"{s}-{m}" for s, m in PRESSES])
def test_each_row_generates_and_keeps_what_it_does_alone(model, caches, spec, mode, kv_buffer):
    # decode mode: cut whenever a layer holds more than 32 entries (every step after the prefill)
    cfg = _cfg(spec, mode=mode, prune_after=32 if mode == "decode" else 0)
    res = _check_rows_equal_alone(model, caches, cfg, kv_buffer=kv_buffer)
    if spec != "none":
        assert res.compress_events >= 1 and res.kv_entries_final < res.kv_entries_peak


@pytest.mark.parametrize("spec", ["knorm", "snapkv(window_size=4)", "expected-attention(n_future_positions=16)"])
def test_chunked_prefill_rows_match(llama32, caches, spec):
    _check_rows_equal_alone(llama32, caches, _cfg(spec), prefill_chunk=16)


@pytest.mark.parametrize("spec", ["knorm", "snapkv(window_size=4)", "adakv(base=snapkv(window_size=4))"])
def test_question_rows_match(llama32, caches, spec):
    question = _prompts(n=6, seed=9)
    _check_rows_equal_alone(llama32, caches, _cfg(spec), question=question)


def test_keep_recent_rows_match(llama32, caches):
    _check_rows_equal_alone(llama32, caches, _cfg("knorm", keep_recent=8))


def test_sampling_draws_per_row(llama32, caches):
    res = _check_rows_equal_alone(llama32, caches, _cfg("knorm"), sampling=True, temperature=1.5)
    greedy = run_generation(llama32, _prompts(), _cfg("knorm"), NEW)
    assert res.rows != greedy.rows  # the draws were used


def test_one_seed_is_every_rows_seed(llama32):
    ids = _prompts()
    res = run_generation(llama32, ids, _cfg("random"), NEW, seed=7)
    alone = run_generation(llama32, ids[2:3], _cfg("random"), NEW, seed=7)
    assert res.rows[2] == alone.token_ids


def test_lists_of_equal_rows_batch_and_a_flat_list_is_one_row(llama32):
    ids = _prompts()
    assert run_generation(llama32, ids.tolist(), _cfg("knorm"), 4).rows == \
        run_generation(llama32, ids, _cfg("knorm"), 4).rows
    one = run_generation(llama32, ids[0].tolist(), _cfg("knorm"), 4)
    assert one.batch_size == 1 and one.rows == [one.token_ids]


def test_throughput_counts_every_row_and_split_shares_the_batch(llama32):
    res = run_generation(llama32, _prompts(), _cfg("knorm"), NEW, seed=SEEDS)
    assert res.throughput_tps == pytest.approx(B * NEW / res.total_s)
    rows = res.split()
    assert [r.token_ids for r in rows] == res.rows
    for r in rows:
        assert r.batch_size == B and r.ttft_s == res.ttft_s and r.tpot_s == res.tpot_s
        assert r.kv_bytes_peak == res.kv_bytes_peak // B and r.kv_entries_peak == res.kv_entries_peak
        assert r.throughput_tps == pytest.approx(NEW / res.total_s)
    alone = run_generation(llama32, _prompts()[:1], _cfg("knorm"), NEW)
    assert rows[0].kv_bytes_peak == alone.kv_bytes_peak  # per row = what a row alone holds


def test_stop_ids_stop_once_every_row_has_stopped(llama32):
    ids = _prompts()
    free = run_generation(llama32, ids, _cfg("none"), 12)
    # stop at row 0's 3rd token and row 1's 5th: row 2 never produces either, so no early stop...
    stop = {free.rows[0][2], free.rows[1][4]}
    if any(t in stop for t in free.rows[2]):
        pytest.skip("row 2 happens to produce a stop id")  # pragma: no cover - depends on the random model
    assert len(run_generation(llama32, ids, _cfg("none"), 12, stop_ids=stop).rows[0]) == 12
    # ...and with rows 0 and 1 only, the loop stops once both have: at the later one
    both = run_generation(llama32, ids[:2], _cfg("none"), 12, stop_ids=stop)
    first = [min(i for i, t in enumerate(r) if t in stop) for r in free.rows[:2]]
    assert len(both.rows[0]) == max(first) + 1
    assert both.rows == [r[:max(first) + 1] for r in free.rows[:2]]  # rows keep their tokens after a stop


def test_unequal_rows_are_refused_in_one_line(llama32):
    with pytest.raises(UsageError, match="differ in length"):
        run_generation(llama32, [[1, 2, 3], [1, 2]], _cfg("knorm"), 4)
    with pytest.raises(UsageError, match="question_ids differ in length"):
        run_generation(llama32, _prompts(), _cfg("knorm"), 4, question_ids=[[1, 2], [3], [4, 5]])
    with pytest.raises(UsageError, match="2 rows for a batch of 3"):
        run_generation(llama32, _prompts(), _cfg("knorm"), 4, question_ids=[[1, 2], [3, 4]])
    with pytest.raises(UsageError, match="one per row"):
        run_generation(llama32, _prompts(), _cfg("knorm"), 4, seed=[1, 2])
    with pytest.raises(UsageError, match="empty"):
        as_batch_ids([], torch.device("cpu"))


def test_presses_that_cut_inside_the_forward_cannot_batch():
    assert "batch size 1" in batch_refusal(SimpleNamespace(cuts_in_forward=True))
    assert batch_refusal(None) is None


@pytest.mark.kvpress
def test_the_kvpress_backend_is_refused_for_batches(llama32):
    cfg = PressConfig(press="kvpress:KnormPress", keep_ratio=0.5, prune_after=0, skip_layers=(),
                      mode="prefill").validate()
    with pytest.raises(UsageError, match="batch size 3: kvpress presses"):
        run_generation(llama32, _prompts(), cfg, 4)
    assert run_generation(llama32, _prompts()[:1], cfg, 4).batch_size == 1


def _batch_result(**kw):
    from knormctl.engine.result import MemoryPeak

    base = dict(token_ids=[1, 2], text="", prompt_tokens=5, new_tokens=2, ttft_s=0.1, step_latencies_s=[0.05],
                total_s=0.2, tpot_s=0.05, itl_p50_s=0.05, itl_p90_s=0.05, itl_p99_s=0.05, throughput_tps=30.0,
                memory=MemoryPeak(1000, "x"), kv_bytes_peak=3000, kv_bytes_final=1500, kv_entries_peak=40,
                kv_entries_final=20, compress_events=1, compress_time_s=0.01, kv_bytes_held_peak=6000,
                batch_size=3, rows=[[1, 2], [3, 4], [5, 6]], row_texts=["a", "b", "c"])
    base.update(kw)
    from knormctl.engine.result import GenerationResult

    return GenerationResult(**base)


def test_split_gives_each_row_a_third_of_every_kv_byte_count():
    rows = _batch_result().split()
    assert len(rows) == 3
    for r in rows:
        assert (r.kv_bytes_peak, r.kv_bytes_final, r.kv_bytes_held_peak) == (1000, 500, 2000)
        assert (r.kv_entries_peak, r.kv_entries_final) == (40, 20)  # entries are per row already
        assert r.throughput_tps == pytest.approx(2 / 0.2)


def test_sampling_temperature_sharpens_below_one_and_flattens_above():
    from knormctl.engine.batch import RowPicker

    logits = torch.zeros(1, 1, 50)
    logits[0, 0, 7] = 3.0  # softmax at T=1: p(7) ~ 0.29
    cold = RowPicker(True, 0.05, [0])  # T=0.05: p(7) ~ 1
    assert all(cold(logits).item() == 7 for _ in range(100))
    hot = RowPicker(True, 20.0, [0])  # T=20: nearly uniform over 50 ids
    draws = [hot(logits).item() for _ in range(100)]
    assert draws.count(7) < 20 and len(set(draws)) > 20


def test_one_question_is_every_rows_question():
    model = MODELS["llama"]()
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(5))
    cfg = PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill").validate()
    shared = run_generation(model, ids, cfg, 4, question_ids=[7, 8, 9])
    each = run_generation(model, ids, cfg, 4, question_ids=[[7, 8, 9]] * 3)
    assert shared.batch_size == 3 and shared.rows == each.rows
    assert shared.kv_entries_final == each.kv_entries_final
