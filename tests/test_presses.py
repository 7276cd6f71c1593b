"""Presses: each keeps the right set; every registered press passes the same property tests on
tiny Llama and GPT-NeoX models; press specs parse and validate; `knormctl presses` lists them.

Parity with kvpress's implementations is in test_kvpress_parity.py (compat venv)."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from knormctl.config import PressConfig, RunConfig
from knormctl.press_spec import PRESS_NAMES, format_press_spec, parse_press_list, parse_press_spec
from knormctl.engine.compress import Compressor, keep_indices, kv_size, n_keep_for
from knormctl.engine.presses import PRESSES, make_press, resolve_press
from knormctl.errors import UsageError

VOCAB = 97


def _keys_with_norms(norms):
    """(1, 1, S, 4) keys whose L2 norms are exactly ``norms``."""
    k = torch.zeros(1, 1, len(norms), 4)
    k[0, 0, :, 0] = torch.tensor(norms, dtype=torch.float32)
    return k


def _kept(press_name, norms, n_keep, keep_recent=0, **kw):
    press = make_press(press_name, **kw)
    keys = _keys_with_norms(norms)
    return keep_indices(press.score(keys, keys.clone()), n_keep, keep_recent)[0, 0].tolist()


NORMS = [5.0, 1.0, 4.0, 2.0, 9.0, 3.0, 8.0, 0.5]


def test_knorm_keeps_lowest_norms_in_order():
    assert _kept("knorm", NORMS, 4) == [1, 3, 5, 7]


def test_knorm_inverse_keeps_highest_norms():
    assert _kept("knorm-inverse", NORMS, 3) == [0, 4, 6]


def test_streaming_keeps_sinks_and_recent_window():
    assert _kept("streaming", list(range(20)), 7, n_sink=4) == [0, 1, 2, 3, 17, 18, 19]
    assert _kept("streaming", list(range(20)), 3, n_sink=0) == [17, 18, 19]


def test_random_is_seeded_and_of_the_right_size():
    a = _kept("random", NORMS * 4, 10, seed=1)
    b = _kept("random", NORMS * 4, 10, seed=1)
    c = _kept("random", NORMS * 4, 10, seed=2)
    assert a == b and a != c
    assert len(set(a)) == 10 and a == sorted(a)


def test_keydiff_keeps_the_keys_pointing_away_from_the_mean():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, -0.05]]).view(1, 1, 6, 2)
    kept = keep_indices(make_press("keydiff").score(keys, keys), 2)[0, 0].tolist()
    assert kept == [3, 4]  # the two outliers; the four near-parallel keys go


def test_keep_recent_protects_the_newest_entries():
    # the newest entry has the highest norm; knorm alone would drop it
    assert 7 not in _kept("knorm", [1, 2, 3, 4, 5, 6, 7, 99.0], 4)
    assert _kept("knorm", [1, 2, 3, 4, 5, 6, 7, 99.0], 4, keep_recent=2) == [0, 1, 6, 7]


def test_random_press_in_the_cache_is_reproducible():
    def run(seed):
        cache = DynamicCache()
        g = torch.Generator().manual_seed(0)
        cache.update(torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g), 0)
        Compressor(PressConfig(press="random", keep_ratio=0.5, prune_after=0, skip_layers=(), seed=seed,
                               mode="prefill"), 1).after_forward(cache, prefill=True)
        return cache.layers[0].keys
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_ties_at_the_boundary_keep_the_most_recent_entries():
    assert _kept("knorm", [1.0, 2.0, 2.0, 2.0, 3.0, 0.5], 3) == [0, 3, 5]
    assert _kept("knorm", [2.0] * 6, 2) == [4, 5]


# ----------------------------------------------------------------------------- registry and specs

def test_the_torch_free_list_of_quiet_presses_follows_the_registry():
    """The report calls a TTFT change an artifact only for presses that do no work inside a
    forward (press_spec.QUIET_IN_FORWARD, torch-free); every other press hooks it or cuts in it."""
    from knormctl.press_spec import QUIET_IN_FORWARD

    quiet = {n for n in PRESS_NAMES if n != "none"
             if not (p := make_press(n, keep_ratio=0.5)).observes and not p.cuts_in_forward}
    assert quiet == set(QUIET_IN_FORWARD)


def test_registry_and_unknown_press():
    assert set(PRESSES) >= {"none", "knorm", "knorm-inverse", "random", "streaming", "snapkv", "tova",
                            "expected-attention", "keydiff", "pyramidkv", "adakv"}
    assert tuple(PRESSES) == PRESS_NAMES, "press_spec.PRESS_NAMES (torch-free, for the CLI and report) follows the registry"
    assert make_press("none") is None
    with pytest.raises(UsageError, match="unknown press"):
        make_press("h2o")
    for name, cls in PRESSES.items():
        if cls is not None:
            assert cls.description and len(cls.description) < 120, f"{name}: one-line description"
            assert set(make_press(name).modes) <= {"prefill", "decode"}


def test_press_spec_syntax_round_trips():
    assert parse_press_list("knorm, snapkv(window_size=32,kernel_size=7) ,tova,all") == [
        "knorm", "snapkv(window_size=32,kernel_size=7)", "tova", "all"]
    spec = "adakv(base=snapkv(window_size=16),alpha_safeguard=0.5)"
    name, params = parse_press_spec(spec)
    assert (name, params) == ("adakv", (("base", "snapkv(window_size=16)"), ("alpha_safeguard", 0.5)))
    assert format_press_spec(name, params) == spec
    assert parse_press_spec("expected-attention(use_covariance=false,epsilon=1e-06)")[1] == (
        ("use_covariance", False), ("epsilon", 1e-06))
    assert parse_press_spec("kvpress:SnapKVPress(window_size=64)") == ("kvpress:SnapKVPress", (("window_size", 64),))


def test_every_setting_that_changes_what_a_configuration_keeps_is_in_its_key():
    """The key names a configuration in the store (resume and the report group by it): two that keep
    different entries must not share one."""
    from knormctl.config import PressConfig

    def key(**kw):
        return PressConfig(**{"press": "streaming", "keep_ratio": 0.5, "prune_after": 0, **kw}).validate().key

    base = key()
    changed = [key(keep_ratio=0.25), key(prune_after=64), key(skip_layers=()), key(mode="prefill"),
               key(keep_recent=8), key(n_sink=8), key(press="knorm")]
    assert len({base, *changed}) == 1 + len(changed)


@pytest.mark.parametrize("text, message", [
    ("knorm(x", "unclosed"), ("knorm)", "unbalanced"), ("snapkv(window_size)", "key=value"),
    ("snapkv(window_size=1,window_size=2)", "given twice"), ("knorm,,tova", "empty item"),
    ("snapkv(window_size=nan)", "finite"), ("snap kv", "malformed"), ("knorm,knorm", "duplicate"),
])
def test_press_spec_syntax_errors_are_one_line(text, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_press_list(text)
    assert "\n" not in str(err.value)


def test_resolve_types_drops_defaults_and_refuses_what_does_not_fit():
    assert resolve_press("snapkv", {"window_size": 64}) == ()  # the default: the same configuration
    assert resolve_press("snapkv", {"kernel_size": 7, "window_size": 16}) == (("window_size", 16), ("kernel_size", 7))
    assert resolve_press("adakv", {"alpha_safeguard": 1}) == (("alpha_safeguard", 1.0),)
    assert resolve_press("adakv", {"base": "snapkv(window_size=64)"}) == ()
    assert resolve_press("adakv", {"base": "tova"}, "prefill") == (("base", "tova"),)
    cases = [
        ("snapkv", {"window_size": 3.5}, None, "must be int"),
        ("snapkv", {"kernel_size": 4}, None, "odd"),
        ("snapkv", {"windowsize": 3}, None, "no parameter 'windowsize'"),
        ("random", {"seed": 3}, None, "--seed"),
        ("pyramidkv", {}, "decode", "prefill mode only"),
        ("adakv", {}, "decode", "prefill mode only"),
        ("adakv", {"base": "h2o"}, None, "unknown press 'h2o'"),
        ("adakv", {"base": "adakv"}, None, "per-head budgets"),
        ("criticalkv", {"base": "pyramidkv"}, None, "cannot refine 'pyramidkv': its per-layer budgets"),
        ("adakv", {"alpha_safeguard": 2.0}, None, r"\[0, 1\]"),
        ("expected-attention", {"use_vnorm": 1}, None, "must be bool"),
    ]
    for name, params, mode, message in cases:
        with pytest.raises(UsageError, match=message):
            resolve_press(name, params, mode)


def test_run_config_expands_all_per_mode_and_stores_canonical_specs():
    prefill = RunConfig(presses=parse_press_list("snapkv(window_size=64),all"), compress_mode="prefill").validate()
    assert prefill.presses == ["snapkv"] + [n for n in PRESS_NAMES if n not in ("none", "snapkv")]
    decode = RunConfig(presses=["all"], compress_mode="decode").validate()
    assert "pyramidkv" not in decode.presses and "adakv" not in decode.presses and "snapkv" in decode.presses
    cfgs = RunConfig(presses=parse_press_list("snapkv(window_size=8)"), keep_ratios=[0.5],
                     compress_mode="prefill").validate().press_configs()
    assert [(c.press, c.params, c.spec) for c in cfgs[1:]] == [("snapkv", (("window_size", 8),), "snapkv(window_size=8)")]
    assert cfgs[1].key == "snapkv|kr=0.5|pa=512|skip=0|prefill|window_size=8"
    with pytest.raises(UsageError, match="duplicate"):
        RunConfig(presses=["snapkv", "snapkv(window_size=64)"]).validate()
    with pytest.raises(UsageError, match="stream cuts in decode mode, which press 'pyramidkv' does not support: use --ppl-method teacher-forced"):
        RunConfig(presses=["pyramidkv"], compress_mode="prefill", ppl_method="stream").validate()


# ----------------------------------------------------------------------------- on tiny models

def _llama(layers=3, kv_heads=2, heads=4):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv_heads,
                                        intermediate_size=37, max_position_embeddings=4096)).eval()


def _neox(layers=3, heads=4):
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                            num_attention_heads=heads, intermediate_size=37, rotary_pct=0.25,
                                            max_position_embeddings=4096)).eval()


MODELS = {"llama": _llama, "neox": _neox}

# every registered press, and a few parameterised specs (small windows: the prompts are short)
SPECS = [n for n in PRESS_NAMES if n != "none"] + [
    "snapkv(window_size=8)", "pyramidkv(window_size=4,beta=2)", "adakv(base=knorm)",
    "criticalkv(base=expected-attention)", "expected-attention(use_covariance=false)"]


def _cfg(spec, keep_ratio=0.5, mode="prefill", skip=(), prune_after=0):
    name, params = parse_press_spec(spec)
    return PressConfig(press=name, params=params, keep_ratio=keep_ratio, prune_after=prune_after,
                       skip_layers=tuple(skip), mode=mode).validate()


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _ids(n=60, seed=1):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids, cache, start):
    """One forward at absolute positions start.. (the cache keyword is named per transformers version)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids, position_ids=pos, use_cache=True, **{name: cache}).logits


def _prefill_and_cut(model, spec, ids, **kw):
    cfg = _cfg(spec, **kw)
    comp = Compressor(cfg, model.config.num_hidden_layers, model=model)
    cache = DynamicCache(config=model.config)
    _forward(model, ids, cache, 0)
    with torch.inference_mode():
        cut = comp.after_forward(cache, prefill=True)
    return comp, cache, cut


def _live_counts(layer):
    live = getattr(layer, "live_mask", None)
    if live is None:
        return [layer.keys.shape[-2]] * layer.keys.shape[1]
    return live[0].sum(-1).tolist()


@pytest.mark.parametrize("spec", SPECS)
def test_kept_set_sizes_and_skipped_layers(model, spec):
    """Every press keeps ceil(keep_ratio x n) per head (on average for per-head budgets; per
    layer where it sets layer budgets, the same in total), never touches a skipped layer, and
    keeps keys and values together."""
    ids = _ids(60)
    full = DynamicCache(config=model.config)
    _forward(model, ids, full, 0)
    comp, cache, cut = _prefill_and_cut(model, spec, ids, skip=(0,))
    comp.close()
    assert cut and comp.events == 1
    assert torch.equal(cache.layers[0].keys, full.layers[0].keys), "skipped layer untouched"
    n_keep, heads = n_keep_for(60, 0.5), cache.layers[1].keys.shape[1]
    layers = cache.layers[1:]
    counts = [_live_counts(layer) for layer in layers]
    if spec.startswith("pyramidkv("):
        n_layers = model.config.num_hidden_layers
        press = make_press("pyramidkv", params=dict(parse_press_spec(spec)[1]))
        budgets = [press.layer_keep(n_keep, 60, i, n_layers, 0.5) for i in range(n_layers)]
        assert [c[0] for c in counts] == budgets[1:]  # the skipped layer 0 keeps its budget unused
        assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) > 1
        assert abs(sum(budgets) - n_keep * n_layers) <= n_layers  # the uniform total, up to rounding
    elif spec.startswith("adakv"):
        assert all(sum(c) == heads * n_keep for c in counts)
    else:
        assert all(c == [n_keep] * heads for c in counts)
    for layer, ref in zip(layers, full.layers[1:]):  # every kept (key, value) pair is a prefill pair
        k, fk = layer.keys[0], ref.keys[0]
        eq = (k[:, :, None, :] == fk[:, None, :, :]).all(-1)
        assert (eq.sum(-1) == 1).all()
        idx = eq.float().argmax(-1)
        assert torch.equal(layer.values[0], ref.values[0].gather(1, idx.unsqueeze(-1).expand_as(layer.values[0])))
        live = getattr(layer, "live_mask", None)
        order = idx if live is None else idx.masked_fill(~live[0], -1)
        assert all(torch.all(r[r >= 0].diff() > 0) for r in order), "kept entries stay in position order"


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("make", [lambda: _llama(layers=1, kv_heads=1), lambda: _neox(layers=1, heads=1)],
                         ids=["llama", "neox"])
def test_logits_after_pruning_equal_model_fed_only_kept_tokens(make, spec):
    """One layer, one key head: the kept entries ARE kept tokens. A model fed only those tokens
    at their true positions gives the same next-token logits -- for every press."""
    m = make()
    ids = _ids(40)
    full = DynamicCache(config=m.config)
    _forward(m, ids, full, 0)
    comp, cache, _ = _prefill_and_cut(m, spec, ids)
    k, fk = cache.layers[0].keys[0, 0], full.layers[0].keys[0, 0]
    kept = (k[:, None, :] == fk[None, :, :]).all(-1).float().argmax(-1)
    nxt = torch.tensor([[5]])
    pruned = _forward(m, nxt, cache, 40)[0, -1]
    comp.close()
    with torch.inference_mode():
        ref = m(input_ids=torch.cat([ids[0, kept], nxt[0]]).unsqueeze(0),
                position_ids=torch.cat([kept, torch.tensor([40])]).unsqueeze(0)).logits[0, -1]
    assert len(kept) == (30 if "beta=2" in spec else 20)  # one layer: the pyramid keeps its top budget
    torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS)
def test_keep_one_is_the_full_cache_and_costs_nothing(model, spec):
    """keep_ratio 1.0: nothing evicted, no hook installed (no extra work in the forwards)."""
    ids = _ids(30)
    mods = [getattr(layer, "self_attn", None) or layer.attention
            for layer in (model.model.layers if hasattr(model, "model") else model.gpt_neox.layers)]
    comp, cache, cut = _prefill_and_cut(model, spec, ids, keep_ratio=1.0)
    assert not cut and comp.events == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in mods)
    assert all(layer.keys.shape[-2] == 30 for layer in cache.layers)


@pytest.mark.parametrize("spec", [s for s in SPECS if "decode" in make_press(parse_press_spec(s)[0]).modes])
def test_decode_mode_lengths_follow_the_rule(model, spec):
    ids = _ids(30)
    cfg = _cfg(spec, keep_ratio=0.8, mode="decode", skip=(1,), prune_after=20)
    comp = Compressor(cfg, model.config.num_hidden_layers, model=model)
    cache = DynamicCache(config=model.config)
    logits = _forward(model, ids, cache, 0)
    expected, pos = 30, 30
    try:
        for step in range(12):
            with torch.inference_mode():
                comp.after_forward(cache, prefill=(step == 0))
            expected = n_keep_for(expected, 0.8) if expected > 20 else expected
            lengths = [layer.keys.shape[-2] for layer in cache.layers]
            assert lengths[1] == pos and all(n == expected for i, n in enumerate(lengths) if i != 1)
            logits = _forward(model, logits[:, -1:].argmax(-1), cache, pos)
            assert torch.isfinite(logits).all()
            pos += 1
            expected += 1
    finally:
        comp.close()
    assert comp.events >= 3


@pytest.mark.parametrize("spec", [s for s in SPECS if make_press(parse_press_spec(s)[0]).stackable and s != "random"])
def test_stacked_cut_keeps_exactly_what_the_per_layer_cut_keeps(model, spec):
    """On GPUs the cut scores all layers as one stacked tensor: presses that allow it must keep
    the same entries that way (random excepted: one draw for all layers is another draw)."""
    ids = _ids(50)
    caches = []
    for budget in (0, 1 << 40):  # 0: layer by layer; unbounded: all layers scored as one stacked tensor
        cache = DynamicCache(config=model.config)
        _forward(model, ids, cache, 0)
        comp = Compressor(_cfg(spec, keep_ratio=0.6, skip=(0,)), model.config.num_hidden_layers,
                          budget_bytes=budget, model=model)
        with torch.inference_mode():
            comp.after_forward(cache, prefill=True)
        caches.append(cache)
    for a, b in zip(*(c.layers for c in caches)):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_observers_only_for_presses_that_need_them_and_gone_after_a_prefill_cut():
    m = _llama()
    mods = [layer.self_attn for layer in m.model.layers]
    for spec, observed in (("knorm", False), ("keydiff", False), ("snapkv", True), ("expected-attention", True)):
        comp = Compressor(_cfg(spec, skip=(0,)), 3, model=m)
        assert [bool(x._forward_pre_hooks) for x in mods] == [False, observed, observed], spec
        cache = DynamicCache(config=m.config)
        _forward(m, _ids(40), cache, 0)
        with torch.inference_mode():
            comp.after_forward(cache, prefill=True)
        assert not any(x._forward_pre_hooks for x in mods), "decode steps must not pay for observing"
        comp.close()


def test_snapkv_window_slides_in_decode_like_one_prefill():
    """The window a press sees after a prefill and decode steps is the window of one prefill of
    the same tokens: queries recomputed with the right positions."""
    m = _llama()
    ids = _ids(45)
    a = make_press("snapkv", params={"window_size": 8})
    b = make_press("snapkv", params={"window_size": 8})
    from knormctl.engine.observe import install_observers

    for press, chunks in ((a, [ids[:, :40]] + [ids[:, j:j + 1] for j in range(40, 45)]), (b, [ids])):
        hooks = install_observers(m, press, [0, 1, 2])
        cache, start = DynamicCache(config=m.config), 0
        for chunk in chunks:
            _forward(m, chunk, cache, start)
            start += chunk.shape[1]
        for h in hooks:
            h.remove()
    for i in range(3):
        torch.testing.assert_close(a._queries[i], b._queries[i], atol=1e-5, rtol=1e-5)


def test_expected_attention_statistics_add_up_over_chunks_and_steps():
    """Running mean and covariance (chunks of the prefill, then decode steps) give the scores of
    the statistics of all the queries at once."""
    m = _llama()
    ids = _ids(50)
    from knormctl.engine.observe import install_observers

    def scores(chunk_size, split):
        press = make_press("expected-attention")
        press.chunk = chunk_size
        hooks = install_observers(m, press, [0, 1, 2])
        cache = DynamicCache(config=m.config)
        _forward(m, ids[:, :split], cache, 0)
        for j in range(split, 50):
            _forward(m, ids[:, j:j + 1], cache, j)
        for h in hooks:
            h.remove()
        return [press.score(layer.keys, layer.values, i) for i, layer in enumerate(cache.layers)], press._stats

    (whole, at_once), (split, stepwise) = scores(4096, 50), scores(7, 41)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the statistics themselves: on this tiny model the scores barely move with the covariance (an
    # almost uniform softmax), so a merge that dropped the between-chunk term passed the check above
    for layer, (n, mean, m2) in at_once.items():
        n_s, mean_s, m2_s = stepwise[layer]
        assert n == n_s == 50 - 4  # every query after the 4 sinks
        torch.testing.assert_close(mean_s, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m2_s, m2, atol=1e-4, rtol=1e-5)


def test_per_head_budgets_hold_the_largest_count_and_mask_the_rest():
    """adakv: heads keep different counts; the layer holds the largest, the surplus is dead and
    hidden from attention (garbage in a dead slot changes nothing; without the mask it would);
    kv_size counts the bytes held, mask included; a multi-token forward after the cut agrees
    with token-by-token decoding."""
    m = _llama(layers=2)
    ids = _ids(60)
    comp, cache, _ = _prefill_and_cut(m, "adakv(base=knorm)", ids, skip=())
    layer = cache.layers[1]
    counts = layer.live_mask[0].sum(-1).tolist()
    assert len(set(counts)) > 1 and sum(counts) == 2 * 30 and layer.keys.shape[-2] == max(counts)
    entries, nbytes = kv_size(cache)
    assert nbytes == sum(x.keys.numel() * 4 * 2 + x.live_mask.numel() for x in cache.layers) and entries < 2 * 60

    def next_logits(c):
        return _forward(m, torch.tensor([[5]]), c, 60)[0, -1]

    def clone(c):
        new = DynamicCache(config=m.config)
        for i, x in enumerate(c.layers):
            new.update(x.keys.clone(), x.values.clone(), i)
            new.layers[i].live_mask = x.live_mask.clone()
        return new

    ref = next_logits(clone(cache))
    junk = clone(cache)
    dead = ~junk.layers[1].live_mask
    junk.layers[1].keys[dead] = 50.0
    junk.layers[1].values[dead] = -50.0
    torch.testing.assert_close(next_logits(junk), ref)
    unmasked = clone(junk)
    unmasked.layers[1].live_mask = None
    assert not torch.allclose(next_logits(unmasked), ref, atol=1e-3), "the test must be able to fail"

    three = torch.tensor([[5, 9, 11]])
    one_go = clone(cache)
    together = _forward(m, three, one_go, 60)[0]
    stepwise = clone(cache)
    steps = torch.cat([_forward(m, three[:, j:j + 1], stepwise, 60 + j)[0] for j in range(3)])
    torch.testing.assert_close(together, steps, atol=1e-5, rtol=1e-4)
    assert one_go.layers[1].live_mask.shape[-1] == one_go.layers[1].keys.shape[-2]
    comp.close()


def test_per_head_cut_when_one_head_keeps_everything():
    """alpha_safeguard 0 lets one head take the whole budget: the layer keeps every slot, the other
    head's are all dead (it then attends to new tokens only)."""
    from knormctl.engine.headmask import cut_per_head

    cache = DynamicCache()
    keys = torch.randn(1, 2, 8, 4)
    cache.update(keys.clone(), keys.clone(), 0)
    scores = torch.cat([torch.full((1, 1, 8), 10.0), torch.zeros(1, 1, 8)], dim=1)
    live = make_press("adakv", params={"base": "knorm", "alpha_safeguard": 0.0}).head_keep(scores, 4)
    assert live[0].sum(-1).tolist() == [8, 0]
    cut_per_head(cache.layers[0], scores, live)
    assert torch.equal(cache.layers[0].keys, keys) and torch.equal(cache.layers[0].live_mask, live)


@pytest.mark.parametrize("alpha, floor", [(0.2, 1), (0.4, 2), (0.6, 3)])
def test_adakv_safeguard_keeps_each_heads_floor_of_the_uniform_budget(alpha, floor):
    """Each head keeps at least alpha_safeguard x the uniform budget, its own best entries: without
    the floor a head whose scores are all weaker than another's would keep nothing."""
    n, n_keep = 16, 5
    strong = torch.arange(n, dtype=torch.float32) + 100.0  # every entry beats every weak one
    weak = torch.arange(n, dtype=torch.float32).flip(0)  # its best: the first positions
    scores = torch.stack([strong, weak]).unsqueeze(0)
    live = make_press("adakv", params={"base": "knorm", "alpha_safeguard": alpha}).head_keep(scores, n_keep)
    assert live[0].sum(-1).tolist() == [2 * n_keep - floor, floor]  # the layer's budget, the floor to the weak head
    assert live[0, 1].nonzero().flatten().tolist() == list(range(floor))  # the weak head's own best
    assert live[0, 0].nonzero().flatten().tolist() == list(range(n - (2 * n_keep - floor), n))


def test_model_whose_queries_cannot_be_recomputed_is_refused_before_any_forward():
    from knormctl.engine.presses import check_model_support

    class Attn(torch.nn.Module):  # an attention module without q_proj / query_key_value / qkv_proj
        pass

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.layers[0].self_attn = Attn()

    check_model_support(Model(), [_cfg("knorm")])  # keys only: fine
    with pytest.raises(UsageError, match="cannot recompute"):
        check_model_support(Model(), [_cfg("snapkv")])


# ----------------------------------------------------------------------------- the CLI

def test_presses_command_lists_every_press_with_modes_and_parameters():
    from typer.testing import CliRunner

    from knormctl.cli import app

    res = CliRunner().invoke(app, ["presses", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == set(PRESS_NAMES) - {"none"}
    assert rows["snapkv"]["params"] == {"window_size": 64, "kernel_size": 5}
    assert rows["pyramidkv"]["modes"] == ["prefill"] and rows["tova"]["modes"] == ["prefill", "decode"]
    text = CliRunner().invoke(app, ["presses"], env={"COLUMNS": "80"})
    assert text.exit_code == 0
    assert "snapkv(window_size=64, kernel_size=5)  [prefill, decode]" in text.stdout
    assert "kvpress:ClassName" in text.stdout
    lines = text.stdout.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    # a long spec wraps between its parameters, never inside one
    assert "expected-attention(n_future_positions=512, use_covariance=true, use_vnorm=true," in lines


def _sweep_refuses(monkeypatch, args, message):
    from typer.testing import CliRunner

    import knormctl.engine.models as models
    from knormctl.cli import app

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the press was validated")

    monkeypatch.setattr(models, "load_model", no_model)
    res = CliRunner().invoke(app, ["sweep", "--model", "x", *args])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1


def test_kvpress_backend_missing_fails_at_once_with_one_line(monkeypatch):
    from importlib import metadata

    real = metadata.distribution

    def missing(name):
        if name == "kvpress":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    _sweep_refuses(monkeypatch, ["--presses", "knorm,kvpress:SnapKVPress", "--compress-mode", "prefill"],
                   "pip install 'knormctl[kvpress]'")
    # in decode mode (the default) too: "use --compress-mode prefill" first sent the user to this error
    _sweep_refuses(monkeypatch, ["--presses", "kvpress:SnapKVPress"], "pip install 'knormctl[kvpress]'")


def test_kvpress_backend_with_unsupported_transformers_fails_at_once(monkeypatch):
    from importlib import metadata

    class FakeDist:
        version = "0.5.5"
        requires = ["torch<3,>=2.3.1", "transformers<5.3,>=4.56.0"]

    real_dist, real_version = metadata.distribution, metadata.version
    monkeypatch.setattr(metadata, "distribution", lambda n: FakeDist() if n == "kvpress" else real_dist(n))
    monkeypatch.setattr(metadata, "version", lambda n: "5.24.0" if n == "transformers" else real_version(n))
    _sweep_refuses(monkeypatch, ["--presses", "kvpress:SnapKVPress", "--compress-mode", "prefill"],
                   "supports transformers<5.3,>=4.56.0, this environment has 5.24.0")


def test_unsupported_mode_is_refused_at_validation(monkeypatch):
    _sweep_refuses(monkeypatch, ["--presses", "pyramidkv", "--compress-mode", "decode"], "prefill mode only")
    _sweep_refuses(monkeypatch, ["--presses", "snapkv(window=3)"], "no parameter 'window'")


def test_config_and_cli_import_without_torch():
    """Press specs parse torch-free: the CLI (--help, report) starts without the engine."""
    import subprocess
    import sys

    code = ("import sys, knormctl.cli, knormctl.config, knormctl.press_spec as c\n"
            "assert c.parse_press_list('knorm,snapkv(window_size=8)') == ['knorm', 'snapkv(window_size=8)']\n"
            "heavy = [m for m in ('torch', 'transformers', 'knormctl.engine') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_kvpress_backend_sets_compression_ratio_to_one_minus_keep_ratio():
    from knormctl.engine.presses.kvpress_backend import KvpressPress

    press = SimpleNamespace(compression_ratio=0.0)
    KvpressPress("kvpress:X", press, 0.25)
    assert press.compression_ratio == pytest.approx(0.75)
    untouched = SimpleNamespace(compression_ratio=0.0)
    KvpressPress("kvpress:X", untouched, 1.0)
    assert untouched.compression_ratio == 0.0


def test_the_kvpress_hook_cuts_only_layers_holding_more_than_prune_after():
    from knormctl.engine.presses.kvpress_backend import KvpressPress

    calls = []

    def forward_hook(module, args, kwargs, output):
        calls.append(module.layer_idx)
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        layer.keys = layer.keys[..., :2, :]
        return output

    kv = KvpressPress("kvpress:X", SimpleNamespace(forward_hook=forward_hook), 0.5)
    comp = SimpleNamespace(cfg=SimpleNamespace(prune_after=8), _sync=lambda: None, seconds=0.0)
    hook = kv._hook(comp)
    module = SimpleNamespace(layer_idx=0)

    def cache_of(n):
        return SimpleNamespace(layers=[SimpleNamespace(keys=torch.zeros(1, 1, n, 4))])

    assert hook(module, (), {"past_key_values": cache_of(8)}, "out") == "out"
    assert calls == [] and not kv.take_cut()  # 8 entries, prune_after 8: not above it
    hook(module, (), {"past_key_values": cache_of(9)}, "out")
    assert calls == [0] and kv.take_cut() and not kv.take_cut()


def test_a_kvpress_requirement_for_another_platform_does_not_refuse_this_transformers(monkeypatch):
    import importlib.util
    from importlib import metadata

    from knormctl.engine.presses import kvpress_backend
    from knormctl.errors import UsageError

    class FakeDist:
        version = "0.5.5"
        requires = ['transformers<5.3; python_version < "3.0"']  # a marker that does not apply here

    real_dist = metadata.distribution
    monkeypatch.setattr(metadata, "distribution", lambda n: FakeDist() if n == "kvpress" else real_dist(n))
    if importlib.util.find_spec("kvpress") is None:  # the main venv: it gets as far as the import
        with pytest.raises(UsageError, match="does not import") as exc:
            kvpress_backend.load_kvpress()
        assert "supports transformers" not in str(exc.value)
    else:  # the compat venv: kvpress loads
        kvpress_backend.load_kvpress()
