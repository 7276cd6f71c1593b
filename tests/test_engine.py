"""Engine: the cut rule, the kept sets, positions after pruning, and the loop's metrics."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from knormctl.config import PressConfig
from knormctl.engine.compress import Compressor, n_keep_for
from knormctl.engine.loop import run_generation
from knormctl.engine.quality import compressed_perplexity, context_perplexity
from knormctl.errors import UsageError

VOCAB = 97


def _llama(layers=3, kv_heads=2, heads=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=37, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def _neox(layers=3, heads=4):
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=37, rotary_pct=0.25, max_position_embeddings=4096)
    return GPTNeoXForCausalLM(cfg).eval()


MODELS = {"llama": _llama, "neox": _neox}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _prompt(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), cache=cache, use_cache=True)
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
            out = model(input_ids=tok, position_ids=torch.tensor([[pos]]), cache=cache, use_cache=True)
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
        pruned = m(input_ids=nxt, position_ids=torch.tensor([[40]]), cache=cache, use_cache=True).logits[0, -1]
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
        a = model(input_ids=nxt, position_ids=pos, cache=cache, use_cache=True).logits
        b = model(input_ids=nxt, position_ids=pos, cache=ref_cache, use_cache=True).logits
    torch.testing.assert_close(a, b)


# --- the loop ----------------------------------------------------------------------------------

def test_baseline_matches_transformers_generate(model):
    ids = _prompt(30)
    res = run_generation(model, ids, PressConfig(), 16)
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert res.token_ids == gen[0, 30:].tolist()


def test_keep_ratio_one_equals_no_press(model):
    ids = _prompt(40)
    eval_ids = _prompt(20, seed=2)[0].tolist()
    none = PressConfig()
    full = PressConfig(press="knorm", keep_ratio=1.0, prune_after=0, skip_layers=())
    a, b = run_generation(model, ids, none, 12), run_generation(model, ids, full, 12)
    assert a.token_ids == b.token_ids
    assert b.compress_events == 0 and b.compress_time_s == 0.0
    assert compressed_perplexity(model, ids, eval_ids, none) == compressed_perplexity(model, ids, eval_ids, full)


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


@pytest.mark.parametrize("press", ["knorm", "knorm-inverse", "streaming"])
def test_stacked_cut_used_on_gpus_keeps_exactly_the_same_entries(model, press):
    """The CUDA path (all layers stacked, ~20 kernels) must keep what the per-layer path keeps."""
    ids = _prompt(50)
    a, _ = _prefill(model, ids)
    b = _clone_cache(model, a)
    cfg = PressConfig(press=press, keep_ratio=0.6, prune_after=10, skip_layers=(0,), mode="prefill")
    n = model.config.num_hidden_layers
    Compressor(cfg, n, stack_layers=False).after_forward(a, prefill=True)
    Compressor(cfg, n, stack_layers=True).after_forward(b, prefill=True)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    with torch.inference_mode():  # and the model decodes on from the stacked layers' views
        out = model(input_ids=torch.tensor([[3]]), position_ids=torch.tensor([[50]]), cache=b, use_cache=True)
    assert torch.isfinite(out.logits).all()
