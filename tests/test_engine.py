"""Engine: the cut rule, the kept sets, positions after pruning, and the loop's metrics."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from knormctl.config import PressConfig
from knormctl.engine.compress import Compressor, n_keep_for
from knormctl.engine.kvcache import cache_kwargs
from knormctl.engine.loop import run_generation
from knormctl.engine.quality import compressed_perplexity, context_perplexity, stream_perplexity
from knormctl.errors import UsageError
from tiny_models import MODELS, VOCAB, llama as _llama, neox as _neox  # noqa: F401


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _prompt(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), **cache_kwargs(model, cache))
    return cache, out


def _clone_cache(model, cache):
    new = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        new.update(layer.keys.clone(), layer.values.clone(), i)
    return new


# --- the rule ---------------------------------------------------------------------------------

def test_n_keep_is_a_robust_ceiling():
    assert n_keep_for(10, 0.7) == 7  # 0.7 * 10 == 7.000000000000001 in floats
    assert n_keep_for(1000, 0.9) == 900
    assert n_keep_for(513, 0.9) == 462
    assert n_keep_for(5, 1.0) == 5
    assert n_keep_for(3, 0.01) == 1


def _norms(keys: torch.Tensor) -> torch.Tensor:
    """L2 norms in float32 with the press's own kernel: the reference tests the SELECTION."""
    return torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)


def _brute_force_lowest(norms: torch.Tensor, n_keep: int) -> list[int]:
    """Reference: the n_keep lowest norms, ties broken toward the most recent entry, in order."""
    order = sorted(range(len(norms)), key=lambda j: (float(norms[j]), -j))
    return sorted(order[:n_keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_knorm_keeps_lowest_norm_keys_per_head(model, dtype):
    ids = _prompt(50)
    cache, _ = _prefill(model, ids)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    before = _clone_cache(model, cache)
    cfg = PressConfig(press="knorm", keep_ratio=0.6, prune_after=10, skip_layers=(0,), mode="prefill")
    comp = Compressor(cfg, model.config.num_hidden_layers)
    assert comp.after_forward(cache, prefill=True)
    n_keep = n_keep_for(50, 0.6)
    for i, (old, new) in enumerate(zip(before.layers, cache.layers)):
        if i == 0:  # skipped layer: untouched, same object content
            assert torch.equal(old.keys, new.keys) and torch.equal(old.values, new.values)
            continue
        assert new.keys.shape[-2] == n_keep
        b, h = old.keys.shape[:2]
        for bi in range(b):
            for hi in range(h):
                norms = _norms(old.keys[bi, hi])
                # recover which positions were kept by matching the stored value rows (order preserved;
                # keys can tie exactly -- a repeated token has the same key norm at every position)
                kept = _match_rows(old.values[bi, hi], new.values[bi, hi])
                assert kept == _brute_force_lowest(norms, n_keep)
                assert torch.equal(new.keys[bi, hi], old.keys[bi, hi][kept]), "keys and values pruned together"


def _match_rows(full: torch.Tensor, kept_rows: torch.Tensor) -> list[int]:
    """Indices j (increasing) such that full[j] == kept_rows[k] in order."""
    out, j = [], 0
    for row in kept_rows:
        while not torch.equal(full[j], row):
            j += 1
        out.append(j)
        j += 1
    return out


def test_knorm_with_ties_and_gqa_matches_reference():
    """Hand-made keys with tied norms (one tie on the keep/drop boundary) on a 2-KV-head layer."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 20, 8, generator=g)
    keys[0, 0, 5] = keys[0, 0, 7]  # exact ties
    keys[0, 1, 2] = keys[0, 1, 3] = keys[0, 1, 4]
    # put a three-way tie exactly on the keep/drop boundary of head 1
    order = _norms(keys[0, 1]).argsort()
    keys[0, 1, order[9]] = keys[0, 1, order[10]] = keys[0, 1, order[11]] = keys[0, 1, order[10]].clone()
    values = torch.randn(1, 2, 20, 8, generator=g)
    cache = DynamicCache()
    cache.update(keys.clone(), values.clone(), 0)
    comp = Compressor(PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill"), 1)
    comp.after_forward(cache, prefill=True)
    for h in range(2):
        norms = _norms(keys[0, h])
        # identify kept entries by their (distinct) values: tied keys are identical rows
        kept = _match_rows(values[0, h], cache.layers[0].values[0, h])
        assert kept == _brute_force_lowest(norms, 10)
        assert torch.equal(cache.layers[0].keys[0, h], keys[0, h, kept])
    # the two heads keep different positions: eviction is per head
    assert not torch.equal(cache.layers[0].keys[0, 0], keys[0, 0, :10])


def test_decode_mode_lengths_follow_the_rule(model):
    ids = _prompt(30)
    cfg = PressConfig(press="knorm", keep_ratio=0.8, prune_after=20, skip_layers=(1,), mode="decode")
    res_lengths = []
    comp = Compressor(cfg, model.config.num_hidden_layers)
    cache, out = _prefill(model, ids)
    expected = 30
    pos = 30
    for step in range(25):
        comp.after_forward(cache, prefill=(step == 0))
        expected = n_keep_for(expected, 0.8) if expected > 20 else expected
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        assert lengths[1] == pos, "skipped layer keeps everything"
        assert all(lengths[i] == expected for i in range(len(lengths)) if i != 1)
        res_lengths.append(expected)
        tok = out.logits[:, -1:].argmax(-1)
        with torch.inference_mode():
            out = model(input_ids=tok, position_ids=torch.tensor([[pos]]), **cache_kwargs(model, cache))
        pos += 1
        expected += 1
    assert max(res_lengths) <= 24 and min(res_lengths) >= 17  # oscillates just under the budget


def test_prefill_mode_cuts_once(model):
    cfg = PressConfig(press="knorm", keep_ratio=0.5, prune_after=8, skip_layers=(), mode="prefill")
    res = run_generation(model, _prompt(40), cfg, 10)
    assert res.compress_events == 1
    n_layers = model.config.num_hidden_layers
    assert res.kv_entries_final == n_layers * (20 + 9)
    assert res.kv_entries_peak == n_layers * 40


def test_skip_layer_that_does_not_exist_is_rejected(model):
    n = model.config.num_hidden_layers
    with pytest.raises(UsageError, match="do not exist"):
        Compressor(PressConfig(press="knorm", skip_layers=(n,)), n)


# --- positions after pruning -------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: _llama(layers=1, kv_heads=1), lambda: _neox(layers=1, heads=1)],
                         ids=["llama", "neox"])
def test_logits_after_pruning_equal_model_fed_only_kept_tokens(make):
    """With one layer and one KV head, the kept cache entries ARE the kept tokens: a model fed only
    those tokens at their true positions must produce the same next-token logits."""
    m = make()
    ids = _prompt(40)
    cache, out = _prefill(m, ids)
    norms = _norms(cache.layers[0].keys[0, 0])
    comp = Compressor(PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill"), 1)
    comp.after_forward(cache, prefill=True)
    kept = torch.tensor(_brute_force_lowest(norms, 20))
    nxt = torch.tensor([[5]])
    with torch.inference_mode():
        pruned = m(input_ids=nxt, position_ids=torch.tensor([[40]]), **cache_kwargs(m, cache)).logits[0, -1]
        ref_ids = torch.cat([ids[0, kept], nxt[0]]).unsqueeze(0)
        ref_pos = torch.cat([kept, torch.tensor([40])]).unsqueeze(0)
        ref = m(input_ids=ref_ids, position_ids=ref_pos).logits[0, -1]
        wrong = m(input_ids=ref_ids).logits[0, -1]  # positions counted from 0: RoPE sees other angles
    torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(wrong, ref, atol=1e-4), "the test must be able to fail without positions"


def test_multilayer_pruned_logits_equal_hand_built_cache(model):
    """Per-head, per-layer kept sets: the engine's cache gives the same logits as a cache built by
    hand from a brute-force argsort, also with a skipped layer of a different length."""
    ids = _prompt(48)
    cache, _ = _prefill(model, ids)
    ref_cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if i != 0:
            order = torch.tensor([[_brute_force_lowest(_norms(k[b, h]), 30) for h in range(k.shape[1])]
                                  for b in range(k.shape[0])])
            k = torch.gather(k, 2, order.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1]))
            v = torch.gather(v, 2, order.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
        ref_cache.update(k.clone(), v.clone(), i)
    cfg = PressConfig(press="knorm", keep_ratio=30 / 48, prune_after=0, skip_layers=(0,), mode="prefill")
    Compressor(cfg, model.config.num_hidden_layers).after_forward(cache, prefill=True)
    nxt, pos = torch.tensor([[7]]), torch.tensor([[48]])
    with torch.inference_mode():
        a = model(input_ids=nxt, position_ids=pos, **cache_kwargs(model, cache)).logits
        b = model(input_ids=nxt, position_ids=pos, **cache_kwargs(model, ref_cache)).logits
    torch.testing.assert_close(a, b)


# --- the loop ----------------------------------------------------------------------------------

def test_baseline_matches_transformers_generate(model):
    ids = _prompt(30)
    res = run_generation(model, ids, PressConfig(), 16)
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert res.token_ids == gen[0, 30:].tolist()


@pytest.mark.parametrize("press", ["none", "knorm"])
def test_stop_ids_end_the_answer_after_the_first_stop_token(model, press):
    ids = _prompt(40)
    pc = PressConfig(press=press, keep_ratio=0.5 if press != "none" else 1.0, prune_after=0, skip_layers=(),
                     mode="prefill")
    question = _prompt(5, seed=3)[0].tolist()
    full = run_generation(model, ids, pc, 16, question_ids=question).token_ids
    # the first token that has not appeared before it, past the first: stopping there is visible
    k = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    cut = run_generation(model, ids, pc, 16, question_ids=question, stop_ids={full[k]})
    assert cut.token_ids == full[:k + 1] and cut.new_tokens == k + 1  # the stop token kept, nothing after it
    assert len(cut.step_latencies_s) == k
    never = next(t for t in range(VOCAB) if t not in full)
    assert run_generation(model, ids, pc, 16, question_ids=question, stop_ids=[never]).token_ids == full
    assert run_generation(model, ids, pc, 16, question_ids=question, stop_ids=None).token_ids == full


def test_keep_ratio_one_equals_no_press(model):
    ids = _prompt(40)
    eval_ids = _prompt(20, seed=2)[0].tolist()
    none = PressConfig()
    full = PressConfig(press="knorm", keep_ratio=1.0, prune_after=0, skip_layers=())
    a, b = run_generation(model, ids, none, 12), run_generation(model, ids, full, 12)
    assert a.token_ids == b.token_ids
    assert b.compress_events == 0 and b.compress_time_s == 0.0
    assert compressed_perplexity(model, ids, eval_ids, none) == compressed_perplexity(model, ids, eval_ids, full)


def test_a_perplexity_that_is_not_finite_fails_the_sample_with_its_reason(model):
    """NaN logits used to give a NaN perplexity, stored as NULL by SQLite: the prompt silently
    left that one metric while its row still counted it."""
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_output_embeddings().weight[0, 0] = float("nan")
    ids, eval_ids = _prompt(20), _prompt(8, seed=2)[0].tolist()
    for measure in (lambda m: context_perplexity(m, ids), lambda m: compressed_perplexity(m, ids, eval_ids, PressConfig()),
                    lambda m: stream_perplexity(m, ids[0].tolist(), PressConfig())):
        assert math.isfinite(measure(model))
        with pytest.raises(RuntimeError, match="perplexity is not finite"):
            measure(broken)


def test_compression_changes_ppl_compressed_but_not_context(model):
    ids = _prompt(60)
    eval_ids = _prompt(30, seed=2)[0].tolist()
    full = compressed_perplexity(model, ids, eval_ids, PressConfig())
    cut = compressed_perplexity(model, ids, eval_ids, PressConfig(press="knorm", keep_ratio=0.3, prune_after=4,
                                                                  skip_layers=()))
    assert full != cut
    ctx = context_perplexity(model, ids)
    assert math.isfinite(ctx) and ctx > 1
    # teacher forcing one token at a time under the full cache == one forward over prompt + eval
    with torch.inference_mode():
        allids = torch.cat([ids, torch.tensor([eval_ids])], dim=1)
        logits = model(allids).logits[0, 59:-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(eval_ids))
    assert full == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_context_perplexity_is_one_forward_over_the_prompt_in_any_chunking(model):
    """ppl_context was only checked to be finite and > 1: a token dropped at each chunk's end
    passed. It is the mean cross entropy of tokens 1..S-1 under one forward."""
    ids = _prompt(60)
    with torch.inference_mode():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:])
    for chunk in (512, 16, 7):  # one chunk, and chunks that do not divide the 59 scored tokens
        assert context_perplexity(model, ids, chunk=chunk) == pytest.approx(math.exp(float(nll)), rel=1e-4)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_ppl_compressed_scores_each_token_on_the_cache_generation_would_hold(model, mode, monkeypatch):
    """The evaluation feeds its tokens as generation does, the press acting after every forward
    (decode mode) or once after the prompt (prefill mode). Fed the tokens greedy generation
    produced under the same press, each one is its step's argmax again. Cut once only, a
    decode-mode evaluation passed every test."""
    import knormctl.engine.quality as quality

    ids = _prompt(40)
    cfg = PressConfig(press="knorm", keep_ratio=0.5, prune_after=8, skip_layers=(), mode=mode)
    res = run_generation(model, ids, cfg, 16)
    assert res.compress_events > 1 if mode == "decode" else res.compress_events == 1  # a cut whenever over 8
    seen = []
    real = quality._nll

    def spy(logits, targets):
        seen.append((logits[0, -1].argmax().item(), targets.reshape(-1)[-1].item()))
        return real(logits, targets)

    monkeypatch.setattr(quality, "_nll", spy)
    compressed_perplexity(model, ids, res.token_ids, cfg)
    assert len(seen) == 16
    assert [a for a, _ in seen] == [t for _, t in seen] == list(res.token_ids)


def test_metrics_are_never_nan(model):
    for n_new in (1, 2, 9):
        res = run_generation(model, _prompt(20), PressConfig(press="knorm", keep_ratio=0.5, prune_after=4), n_new)
        assert res.new_tokens == n_new
        for name, value in res.to_dict().items():
            if isinstance(value, float):
                assert math.isfinite(value), name
        assert res.ttft_s > 0 and res.throughput_tps > 0
        assert len(res.step_latencies_s) == n_new - 1
        if n_new == 1:
            assert res.tpot_s is None and res.itl_p90_s is None
        assert res.memory.bytes is None or res.memory.bytes > 0
        assert res.memory.bytes is not None or res.memory.reason


def test_sampling_is_seeded(model):
    ids = _prompt(20)
    a = run_generation(model, ids, PressConfig(), 12, sampling=True, seed=3)
    b = run_generation(model, ids, PressConfig(), 12, sampling=True, seed=3)
    c = run_generation(model, ids, PressConfig(), 12, sampling=True, seed=4)
    assert a.token_ids == b.token_ids != c.token_ids


def test_stream_perplexity_full_cache_equals_one_forward(model):
    from knormctl.engine.quality import stream_perplexity

    ids = _prompt(40)[0].tolist()
    full = stream_perplexity(model, ids, PressConfig(), skip_first=10)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, 10:-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[11:]))
    assert full == pytest.approx(math.exp(float(nll)), rel=1e-4)
    cut = stream_perplexity(model, ids, PressConfig(press="knorm", keep_ratio=0.5, prune_after=8, skip_layers=()),
                            skip_first=10)
    assert cut != full
    assert stream_perplexity(model, ids[:5], PressConfig(), skip_first=10) is None


# --- the cut: groups, memory, seeds, NaN -------------------------------------------------------

def _owns_compact_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("press", ["knorm", "knorm-inverse", "streaming", "random"])
def test_bounded_cut_keeps_the_per_layer_entries_and_every_layer_owns_its_tensors(press):
    """The cut used on GPUs (scoring stacked in groups and selection in chunks, both sized by a
    memory budget) keeps exactly what the unbounded CPU cut and the layer-by-layer cut keep,
    and after it every layer holds its own compact tensors: no view of a shared stack keeps a
    copy of the cache alive."""
    m = _llama(layers=6)
    a, _ = _prefill(m, _prompt(50))
    caches = [a] + [_clone_cache(m, a) for _ in range(3)]
    cfg = PressConfig(press=press, keep_ratio=0.6, prune_after=10, skip_layers=(0,), mode="prefill")
    layer_bytes = 2 * a.layers[1].keys.numel() * a.layers[1].keys.element_size()
    budgets = [None, 0, 2 * 2 * layer_bytes, 100 * layer_bytes]  # CPU default, layer by layer, pairs, all at once
    for budget, cache in zip(budgets, caches):
        assert Compressor(cfg, 6, budget_bytes=budget, seed=5).after_forward(cache, prefill=True)
    for other in caches[1:]:
        for la, lb in zip(a.layers, other.layers):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    for cache in caches:
        cut = cache.layers[1:]
        assert all(layer.keys.shape[-2] == 30 for layer in cut)
        assert all(_owns_compact_storage(layer.keys) and _owns_compact_storage(layer.values) for layer in cut)
        ptrs = [t.untyped_storage().data_ptr() for layer in cut for t in (layer.keys, layer.values)]
        assert len(set(ptrs)) == len(ptrs), "two layers share one storage"
    with torch.inference_mode():  # and the model decodes on from the bounded cut
        out = m(input_ids=torch.tensor([[3]]), position_ids=torch.tensor([[50]]), **cache_kwargs(m, caches[2]))
    assert torch.isfinite(out.logits).all()


def test_the_budget_bounds_the_stacked_groups_and_selection_chunks(monkeypatch):
    """Spy on the stacks and the selections: their sizes follow the budget."""
    from knormctl.engine import compress

    stacked, selected = [], []
    real_stack, real_keep = torch.stack, compress.keep_indices
    monkeypatch.setattr(compress.torch, "stack",
                        lambda ts, *a, **k: (stacked.append((len(ts), ts[0].dim())), real_stack(ts, *a, **k))[1])
    monkeypatch.setattr(compress, "keep_indices", lambda s, *a: (selected.append(s.shape[0]), real_keep(s, *a))[1])
    g = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    for i in range(5):
        cache.update(torch.randn(1, 2, 100, 8, generator=g), torch.randn(1, 2, 100, 8, generator=g), i)
    layer_bytes = 2 * 1 * 2 * 100 * 8 * 4
    cfg = PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill")
    # half the budget for stacking: 2 layers per group (3 groups for 5 layers); half for selection
    budget = 2 * 2 * layer_bytes
    Compressor(cfg, 5, budget_bytes=budget).after_forward(cache, prefill=True)
    kv_stacks = [n for n, dim in stacked if dim == 4]  # stacks of (b, h, s, d) layers
    assert kv_stacks == [2, 2, 2, 2, 1, 1]  # keys and values of each group
    assert 2 * 100 * compress.SELECT_BYTES_PER_ENTRY == budget // 4  # a layer's selection: a quarter of it
    assert selected == [2, 2, 1]
    selected.clear()
    Compressor(cfg, 5).after_forward(cache, prefill=True)  # CPU default: one selection over all layers
    assert selected == [5]


def test_nan_scores_are_refused_before_anything_is_cut(model, monkeypatch):
    from knormctl.engine.presses.simple import KnormPress

    cache, _ = _prefill(model, _prompt(30))
    before = [layer.keys.clone() for layer in cache.layers]

    def nan_score(self, keys, values, layer_idx=None):
        s = -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)
        s[..., 3] = float("nan")
        return s

    monkeypatch.setattr(KnormPress, "score", nan_score)
    comp = Compressor(PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill"),
                      model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="press 'knorm' gave NaN scores"):
        comp.after_forward(cache, prefill=True)
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, cache.layers)), "nothing was cut"


def test_infinite_scores_keep_exact_counts_per_head():
    """+-inf are legal scores (streaming's sinks, keep_recent): each head still keeps n_keep."""
    from knormctl.engine.compress import keep_indices

    inf = float("inf")
    scores = torch.tensor([[[inf, inf, inf, 1.0, 2.0, -inf], [-inf, -inf, -inf, -inf, 0.0, inf]]])
    kept = keep_indices(scores, 3)
    assert kept.tolist() == [[[0, 1, 2], [3, 4, 5]]]  # ties: the most recent of the tied -inf survives


def test_no_cut_after_the_last_token(model):
    """The cut after the last forward would be read by no token: not done, not counted."""
    n = model.config.num_hidden_layers
    cfg = PressConfig(press="knorm", keep_ratio=0.5, prune_after=2, skip_layers=(), mode="decode")
    res = run_generation(model, _prompt(20), cfg, 5)
    # forwards: prefill + 4 steps; cuts after the first 4 only: 20 -> 10, 11 -> 6, 7 -> 4, 5 -> 3, then 4 (not 2)
    assert res.compress_events == 4
    assert res.kv_entries_final == n * 4
    one = run_generation(model, _prompt(20), dataclasses.replace(cfg, mode="prefill"), 1)
    assert one.compress_events == 0 and one.compress_time_s == 0.0 and one.kv_entries_final == n * 20


def test_random_press_draws_per_sample_and_configuration(model):
    """Not the same subset for every prompt: the seed is hashed with the sample's seed and the
    configuration; the same (sample, configuration) draws the same subset again."""
    from knormctl.engine.compress import press_seed

    cache, _ = _prefill(model, _prompt(40))
    a = PressConfig(press="random", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill", seed=7)
    b = dataclasses.replace(a, keep_ratio=0.6)
    seeds = {press_seed(a, 0), press_seed(a, 1), press_seed(b, 0), press_seed(dataclasses.replace(a, seed=8), 0)}
    assert len(seeds) == 4 and press_seed(a, 0) == press_seed(a, 0)

    def kept(cfg, sample_seed):
        c = _clone_cache(model, cache)
        Compressor(cfg, model.config.num_hidden_layers, seed=sample_seed).after_forward(c, prefill=True)
        return [layer.values.clone() for layer in c.layers]

    same = kept(a, 3), kept(a, 3)
    assert all(torch.equal(x, y) for x, y in zip(*same))
    assert not all(torch.equal(x, y) for x, y in zip(kept(a, 3), kept(a, 4)))


# --- transformers' cache: the name it reads, and the check after every forward ------------------

def test_the_transformers_under_test_is_the_one_ci_asked_for(model):
    """scripts/test.sh runs this file on both ends of the supported range and says which one it
    expects (KNORMCTL_EXPECT_TRANSFORMERS): a compat run that silently used the newest
    transformers would not test the lowest. Each end reads the cache under its own name."""
    import os

    import transformers

    from knormctl.engine.kvcache import cache_kwarg

    expected = os.environ.get("KNORMCTL_EXPECT_TRANSFORMERS")
    if expected is not None:  # the compat run pins its version
        assert transformers.__version__ == expected
    # The name by version (an oracle independent of the signature inspection cache_kwarg does):
    # transformers 5.24 renamed past_key_values to cache.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert cache_kwarg(model) == ("cache" if (major, minor) >= (5, 24) else "past_key_values")


def test_a_cache_the_model_ignores_is_a_clear_error(model, monkeypatch):
    """A forward that does not read the cache (an unknown name is swallowed by **kwargs, as
    `cache=` is by transformers < 5.24) must fail loudly, naming the transformers version."""
    import transformers

    from knormctl.engine import kvcache
    from knormctl.engine.kvcache import CacheMismatchError, probe_cache

    monkeypatch.setattr(kvcache, "cache_kwarg", lambda m: "kv_cache_not_read")
    for cfg in (PressConfig(), PressConfig(press="knorm", keep_ratio=0.5, prune_after=4)):
        with pytest.raises(CacheMismatchError, match=f"transformers {transformers.__version__}"):
            run_generation(model, _prompt(12), cfg, 3)
    with pytest.raises(CacheMismatchError, match="holds 0 entries where 3 were expected"):
        probe_cache(model)
    with pytest.raises(CacheMismatchError):
        context_perplexity(model, _prompt(12))


def test_ledger_follows_prefill_steps_and_cuts(model):
    from knormctl.engine.kvcache import CacheLedger, CacheMismatchError, new_cache

    cache = new_cache(model)
    ledger = CacheLedger(model, cache)
    kw = cache_kwargs(model, cache)
    with torch.inference_mode():
        model(input_ids=_prompt(10), position_ids=torch.arange(10).unsqueeze(0), **kw)
        ledger.grew(10)
        Compressor(PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(0,), mode="prefill"),
                   model.config.num_hidden_layers).after_forward(cache, prefill=True)
        model(input_ids=_prompt(1), position_ids=torch.tensor([[10]]), **kw)
        with pytest.raises(CacheMismatchError, match="layer 1 of the KV cache holds 6 entries where 11"):
            ledger.grew(1)  # the cut was not reported: the ledger notices
        ledger.rebase()
        model(input_ids=_prompt(1), position_ids=torch.tensor([[11]]), **kw)
        ledger.grew(1)
        assert ledger.held == [12] + [7] * (model.config.num_hidden_layers - 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_the_cpu_memory_peak_is_in_bytes():
    import psutil

    from knormctl.engine.timing import MemoryProbe, read_rss_peak

    rss = psutil.Process().memory_info().rss  # bytes; the high-water mark is at least this
    assert read_rss_peak() >= 0.9 * rss
    probe = MemoryProbe("cpu")
    probe.start()
    block = torch.ones(32 * 1024 * 1024 // 4)  # 32 MiB touched
    peak = probe.stop()
    del block
    assert peak.kind == "cpu_process_rss_peak" and peak.bytes >= 0.9 * rss


def test_the_ledger_refuses_a_layer_a_cut_inside_the_forward_emptied():
    from knormctl.engine.kvcache import CacheLedger, CacheMismatchError, new_cache

    model = MODELS["llama"](layers=1)
    cache = new_cache(model, buffered=False)
    ledger = CacheLedger(model, cache)
    k = torch.zeros(1, 2, 10, 8)
    cache.layers[0].keys, cache.layers[0].values = k, k
    ledger.grew(10, may_shrink=True)
    assert ledger.held == [10]
    cache.layers[0].keys = cache.layers[0].values = torch.zeros(1, 2, 6, 8)  # 5 new, cut to 6: fine
    ledger.grew(5, may_shrink=True)
    assert ledger.held == [6]
    cache.layers[0].keys = cache.layers[0].values = torch.zeros(1, 2, 0, 8)  # "never none"
    with pytest.raises(CacheMismatchError, match="holds 0 entries where 11 were expected"):
        ledger.grew(5, may_shrink=True)
