"""Parity with NVIDIA's kvpress 0.5.5, the reference implementation of these presses (issue 12).

On tiny random Llama (GQA) and Qwen3 (q/k norms) models in prefill mode, with the same kept
count, knormctl's presses keep the SAME entries, head by head and layer by layer, as
kvpress's. Every intended difference is a named test below (``test_difference_*``).

Runs in .venv-compat (transformers 5.2.0 + kvpress 0.5.5; scripts/test.sh); the main venv
deselects it (-m "not kvpress"). It never skips: where kvpress does not import, it fails.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from knormctl.config import PressConfig
from knormctl.engine.compress import Compressor, kv_size, n_keep_for
from knormctl.errors import UsageError

pytestmark = pytest.mark.kvpress

VOCAB, LAYERS, S = 97, 3, 64


@pytest.fixture(scope="module")
def kvpress():
    import kvpress  # an ImportError here fails the compat run: parity cannot be skipped into green

    return kvpress


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, max_position_embeddings=1024, initializer_range=0.2)).eval()


def _qwen3():
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=37, max_position_embeddings=1024, initializer_range=0.2)).eval()
    with torch.no_grad():  # trained q/k norms have uneven weights; all-ones would give every key one norm
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.uniform_(0.5, 1.5)
    return model


MODELS = {"llama": _llama, "qwen3": _qwen3}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _ids(n=S, seed=1):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids, cache):
    """One prefill forward into ``cache`` (the cache keyword is named per transformers version)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), use_cache=True, **{name: cache})
    return cache


def _full(model, ids):
    return _forward(model, ids, DynamicCache(config=model.config))


def _theirs(model, ids, press):
    with press(model):
        return _full(model, ids)


def _ours(model, ids, spec_name, params=(), keep_ratio=0.5, skip=()):
    cfg = PressConfig(press=spec_name, params=tuple(params), keep_ratio=keep_ratio, prune_after=0,
                      skip_layers=tuple(skip), mode="prefill").validate()
    comp = Compressor(cfg, model.config.num_hidden_layers, model=model)
    try:
        cache = _full_with_hooks(model, ids)
        comp.after_forward(cache, prefill=True)
    finally:
        comp.close()
    return cache


_full_with_hooks = _full  # the compressor's hooks are on the model: the same forward


def _kept_index(kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The prefill position of every kept key, (b, h, n): each kept key is matched to the one
    full-cache key it equals (keys carry RoPE, so equal tokens at other positions differ)."""
    eq = (kept[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)  # (b, h, n, s)
    assert (eq.sum(-1) == 1).all(), "a kept key is not exactly one of the prefill keys"
    return eq.float().argmax(-1)


def _positions(kept: torch.Tensor, full: torch.Tensor, live: torch.Tensor | None = None) -> list[list[set]]:
    """Which prefill positions each (batch, head) kept; ``live``: only the live slots."""
    pos = _kept_index(kept, full)
    return [[{int(p) for j, p in enumerate(pos[b, h]) if live is None or live[b, h, j]}
             for h in range(pos.shape[1])] for b in range(pos.shape[0])]


def _same_kept(ours, theirs, full, *, lengths=None):
    for i, (a, b, f) in enumerate(zip(ours.layers, theirs.layers, full.layers)):
        if lengths is not None:
            assert a.keys.shape[-2] == lengths[i]
        assert a.keys.shape == b.keys.shape, f"layer {i}: kept counts differ"
        pa, pb = _positions(a.keys, f.keys), _positions(b.keys, f.keys)
        assert pa == pb, f"layer {i}: kept sets differ"
        idx = _kept_index(a.keys, f.keys)
        assert torch.equal(a.values, f.values.gather(2, idx.unsqueeze(-1).expand_as(a.values))), \
            f"layer {i}: values do not follow their keys"
        assert len(pa[0][0]) < f.keys.shape[-2], "nothing was evicted: the test could not fail"


# ----------------------------------------------------------------------------- same kept sets

CASES = {  # knormctl spec -> kvpress press (compression_ratio set by the test)
    "knorm": ("knorm", (), lambda kv: kv.KnormPress()),
    "streaming": ("streaming", (), lambda kv: kv.StreamingLLMPress(n_sink=4)),
    "keydiff": ("keydiff", (), lambda kv: kv.KeyDiffPress()),
    "snapkv": ("snapkv", (("window_size", 8),), lambda kv: kv.SnapKVPress(window_size=8)),
    "snapkv-k3": ("snapkv", (("window_size", 8), ("kernel_size", 3)),
                  lambda kv: kv.SnapKVPress(window_size=8, kernel_size=3)),
    "tova": ("tova", (), lambda kv: kv.TOVAPress()),
    "expected-attention": ("expected-attention", (("n_future_positions", 32),),
                           lambda kv: kv.ExpectedAttentionPress(n_future_positions=32)),
    "expected-attention-mean": ("expected-attention", (("use_covariance", False), ("use_vnorm", False)),
                                lambda kv: kv.ExpectedAttentionPress(use_covariance=False, use_vnorm=False)),
    "criticalkv": ("criticalkv", (("base", "snapkv(window_size=8)"),),
                   lambda kv: kv.CriticalKVPress(kv.SnapKVPress(window_size=8))),
}


@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_kept_sets_as_kvpress(kvpress, model, case, keep_ratio):
    name, params, build = CASES[case]
    ids = _ids()
    press = build(kvpress)
    press.compression_ratio = 1 - keep_ratio
    assert n_keep_for(S, keep_ratio) == kvpress.utils.compute_n_kept(S, 1 - keep_ratio), "same kept count"
    _same_kept(_ours(model, ids, name, params, keep_ratio), _theirs(model, ids, press), _full(model, ids))


def test_pyramidkv_same_per_layer_budgets_and_kept_sets(kvpress, model):
    ids = _ids()
    press = kvpress.PyramidKVPress(window_size=8, beta=2, compression_ratio=0.5)
    ours = _ours(model, ids, "pyramidkv", (("window_size", 8), ("beta", 2)))
    lengths = [layer.keys.shape[-2] for layer in ours.layers]
    assert lengths == [48, 32, 16], "the pyramid, not the uniform fallback, was tested"
    _same_kept(ours, _theirs(model, ids, press), _full(model, ids), lengths=lengths)


def test_adakv_same_per_head_kept_sets(kvpress, model):
    """kvpress's AdaKV masks the evicted entries (module.masked_key_indices); knormctl holds the
    largest per-head count and marks the surplus dead. The live sets are the same."""
    ids = _ids()
    full = _full(model, ids)
    press = kvpress.AdaKVPress(kvpress.SnapKVPress(window_size=8, compression_ratio=0.5))
    _theirs(model, ids, press)
    # kvpress's attention patch clears these at the next prefill: read them now
    masked = [layer.self_attn.masked_key_indices for layer in model.model.layers]
    ours = _ours(model, ids, "adakv", (("base", "snapkv(window_size=8)"),))
    uneven = False
    for i, layer in enumerate(ours.layers):
        f = full.layers[i].keys
        b_idx, h_idx, s_idx = masked[i]
        pruned = [{int(s) for bb, hh, s in zip(b_idx, h_idx, s_idx) if int(hh) == h} for h in range(f.shape[1])]
        theirs = [set(range(f.shape[-2])) - p for p in pruned]
        live = _positions(layer.keys, f, layer.live_mask)[0]
        assert live == theirs, f"layer {i}: per-head kept sets differ"
        assert sum(map(len, live)) == f.shape[1] * n_keep_for(S, 0.5)
        uneven |= len({len(h) for h in live}) > 1
    assert uneven, "every head kept the same count: per-head budgets were not exercised"


@pytest.mark.parametrize("cls, params, ours", [
    ("SnapKVPress", (("window_size", 8),), ("snapkv", (("window_size", 8),))),
    ("KnormPress", (), ("knorm", ())),
    ("ExpectedAttentionPress", (), ("expected-attention", ())),
])
def test_kvpress_backend_keeps_what_kvpress_keeps(kvpress, model, cls, params, ours):
    """`--presses kvpress:Name(...)` runs kvpress's own hook inside knormctl: the cache is
    kvpress's, entry for entry (order included), and the kept sets are knormctl's own press's."""
    ids = _ids()
    backend = _ours(model, ids, f"kvpress:{cls}", params)
    reference = _theirs(model, ids, getattr(kvpress, cls)(compression_ratio=0.5, **dict(params)))
    for a, b in zip(backend.layers, reference.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    _same_kept(_ours(model, ids, *ours), backend, _full(model, ids))


def test_kvpress_backend_in_the_loop_counts_and_times_the_cut(kvpress, model):
    from knormctl.engine.loop import run_generation

    cfg = PressConfig(press="kvpress:SnapKVPress", params=(("window_size", 8),), keep_ratio=0.5, prune_after=0,
                      skip_layers=(0,), mode="prefill").validate()
    # (kvpress's own context manager leaves rotary_emb on the modules; ours must leave them as found)
    before = [(hasattr(layer.self_attn, "rotary_emb"), len(layer.self_attn._forward_hooks),
               len(layer.self_attn._forward_pre_hooks)) for layer in model.model.layers]
    res = run_generation(model, _ids(), cfg, 4)
    assert res.compress_events == 1 and res.compress_time_s > 0
    # layer 0 skipped (knormctl's rule), the others cut to 32, then 3 decoded tokens each
    assert res.kv_entries_final == (S + 3) + (LAYERS - 1) * (32 + 3)
    after = [(hasattr(layer.self_attn, "rotary_emb"), len(layer.self_attn._forward_hooks),
              len(layer.self_attn._forward_pre_hooks)) for layer in model.model.layers]
    assert after == before, "hooks or attributes left behind"


def test_kvpress_backend_scores_perplexity_like_its_knormctl_twin(kvpress, model):
    """The teacher-forced perplexity (every lm sweep's --eval-tokens) runs kvpress's cut inside
    the prefill forward too: it used to be refused there as a cache transformers had not used.
    kvpress:KnormPress keeps what knorm keeps, so the two score the same continuation alike."""
    from knormctl.engine.quality import compressed_perplexity

    ids, eval_ids = _ids(), _ids(8, seed=2)[0].tolist()
    kv = PressConfig(press="kvpress:KnormPress", keep_ratio=0.5, prune_after=0, mode="prefill").validate()
    ours = PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, mode="prefill").validate()
    full = compressed_perplexity(model, ids, eval_ids, PressConfig())
    theirs = compressed_perplexity(model, ids, eval_ids, kv)
    assert theirs == pytest.approx(compressed_perplexity(model, ids, eval_ids, ours), rel=1e-5)
    assert theirs != pytest.approx(full, rel=1e-6), "the cut changed nothing: it did not run"


# ----------------------------------------------------------------------------- intended differences

def test_difference_kept_count_is_a_ceiling_kvpress_truncates(kvpress):
    """knormctl keeps ceil(keep_ratio x n), float noise removed; kvpress int(n x (1 - ratio)) with
    ratio = 1 - keep_ratio: 1024 x 0.7 = 716.8 -> 717 vs 716; 100 x 0.1 -> 10 vs 9 (float noise:
    1 - (1 - 0.1) < 0.1)."""
    assert (n_keep_for(1024, 0.7), kvpress.utils.compute_n_kept(1024, 1 - 0.7)) == (717, 716)
    assert (n_keep_for(100, 0.1), kvpress.utils.compute_n_kept(100, 1 - 0.1)) == (10, 9)
    assert n_keep_for(64, 0.5) == kvpress.utils.compute_n_kept(64, 0.5) == 32  # the parity tests' counts


def test_difference_ties_go_to_the_most_recent_entries(kvpress, model):
    """Equal scores at the boundary: knormctl keeps the most recent (deterministic); kvpress
    leaves it to top-k. The scores are the same, so the kept SCORES are too."""
    from knormctl.engine.compress import keep_indices
    from knormctl.engine.presses import make_press

    keys = torch.ones(1, 1, 10, 4)
    keys[0, 0, 3] = 5.0  # one high norm: dropped; the rest tie
    ours = make_press("knorm").score(keys, keys, 0)
    theirs = kvpress.KnormPress().score(None, None, keys, keys, None, {})
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert keep_indices(ours, 5)[0, 0].tolist() == [5, 6, 7, 8, 9]
    kept_theirs = theirs.topk(5, dim=-1).indices
    assert sorted(theirs[0, 0, kept_theirs[0, 0]].tolist()) == sorted(ours[0, 0, [5, 6, 7, 8, 9]].tolist())


def test_difference_skipped_layers_stay_whole(kvpress, model):
    """knormctl's --skip-layers (default: layer 0) leaves layers whole; kvpress cuts every layer.
    The other layers keep the same sets."""
    ids = _ids()
    full = _full(model, ids)
    ours = _ours(model, ids, "snapkv", (("window_size", 8),), skip=(0,))
    theirs = _theirs(model, ids, kvpress.SnapKVPress(window_size=8, compression_ratio=0.5))
    assert torch.equal(ours.layers[0].keys, full.layers[0].keys)
    assert theirs.layers[0].keys.shape[-2] == S // 2
    for i in range(1, LAYERS):
        assert _positions(ours.layers[i].keys, full.layers[i].keys) == \
            _positions(theirs.layers[i].keys, full.layers[i].keys)


def test_difference_pyramid_fallback_rounds_up(kvpress, model):
    """Where the pyramid does not fit (its smallest layer budget would be under the window),
    kvpress keeps round(n x keep) in every layer (61 x 0.25 -> 15), knormctl its uniform
    ceiling (16)."""
    ids = _ids(61)
    ours = _ours(model, ids, "pyramidkv", (("window_size", 8),), keep_ratio=0.25)
    theirs = _theirs(model, ids, kvpress.PyramidKVPress(window_size=8, compression_ratio=0.75))
    assert [layer.keys.shape[-2] for layer in ours.layers] == [16] * LAYERS
    assert [layer.keys.shape[-2] for layer in theirs.layers] == [15] * LAYERS


def test_difference_window_longer_than_the_prompt_is_clamped(kvpress, model):
    """kvpress refuses a prompt not longer than SnapKV's window (assert); knormctl scores with
    the window clamped to the prompt (every entry but the last window is scored)."""
    ids = _ids(40)
    ours = _ours(model, ids, "snapkv")  # window_size 64 > 40 tokens
    assert all(layer.keys.shape[-2] == 20 for layer in ours.layers)
    with pytest.raises(AssertionError, match="window size"):
        _theirs(model, ids, kvpress.SnapKVPress(compression_ratio=0.5))


def test_difference_adakv_frees_memory_kvpress_masks_only(kvpress, model):
    """kvpress's AdaKV keeps every entry (masked): the bytes held are the full cache's. knormctl
    holds the largest per-head count (+ the mask), and says so in kv_size."""
    ids = _ids()
    full_bytes = kv_size(_full(model, ids))[1]
    theirs = _ours(model, ids, "kvpress:AdaKVPress", (("press", "SnapKVPress(window_size=8)"),))
    assert kv_size(theirs)[1] == full_bytes
    ours = _ours(model, ids, "adakv", (("base", "snapkv(window_size=8)"),))
    held = sum(layer.keys.numel() * 4 * 2 + layer.live_mask.numel() for layer in ours.layers)
    assert kv_size(ours)[1] == held < full_bytes


def test_kvpress_presses_on_an_attention_without_past_key_values_are_refused_with_one_line(tiny_neox_dir, tmp_path):
    """kvpress reads the cache from the attention's `past_key_values`; GPT-NeoX's attention takes
    `layer_past`. Refused before any row is written, not an AttributeError in the first prefill."""
    from typer.testing import CliRunner

    from knormctl.cli import app

    db = tmp_path / "r.db"
    res = CliRunner().invoke(app, ["sweep", "--model", str(tiny_neox_dir), "--presses", "kvpress:KnormPress",
                                   "--keep-ratios", "0.5", "--compress-mode", "prefill", "--num-pg19-samples", "0",
                                   "--num-wikitext-samples", "1", "--db", str(db)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1] == (
        "Error: press 'kvpress:KnormPress' cannot run on GPTNeoXAttention: kvpress reads the KV cache from the "
        "attention's `past_key_values` argument, which this attention does not take")
    if db.exists():
        import sqlite3

        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return model_cls(config_cls(**(base | kw))).eval()


@pytest.mark.parametrize("name, build, why", [
    # Cohere rotates interleaved pairs; kvpress rotates halves
    ("cohere", lambda T: _tiny(T.CohereConfig, T.CohereForCausalLM, num_key_value_heads=2),
     "kvpress cannot recompute for CohereAttention: its rotary embedding rotates the query dimensions another way"),
    # OLMo-2 normalises the whole projection; kvpress knows the q-norms of Qwen3 and Gemma3 only
    ("olmo2", lambda T: _tiny(T.Olmo2Config, T.Olmo2ForCausalLM, num_key_value_heads=2),
     "kvpress cannot recompute for Olmo2Attention: its queries before the rotation are not the projection kvpress "
     "rebuilds"),
    # partial rotary: kvpress rotates whole heads (a RuntimeError in every cell before)
    ("phi3-partial", lambda T: _tiny(T.Phi3Config, T.Phi3ForCausalLM, num_key_value_heads=2,
                                     partial_rotary_factor=0.5),
     "kvpress cannot recompute for Phi3Attention: its rotation covers 4 of the 8 query dimensions"),
    ("olmo-clip", lambda T: _tiny(T.OlmoConfig, T.OlmoForCausalLM, num_key_value_heads=2, clip_qkv=8.0),
     "kvpress cannot recompute for OlmoForCausalLM: the model clamps them \\(clip_qkv=8\\), kvpress does not"),
])
def test_kvpress_presses_that_rebuild_queries_are_refused_where_kvpress_rebuilds_them_wrong(kvpress, name, build, why):
    """knormctl refused its own query-aware presses on these models, but ran kvpress's with the
    wrong queries (relative error 0.57 on Cohere, 0.995 on OLMo-2) or failed every cell. A
    kvpress press that reads no queries still runs there."""
    import transformers as T

    from knormctl.engine.presses import check_model_support

    model = build(T)
    for spec, params in (("kvpress:SnapKVPress", ()), ("kvpress:TOVAPress", ()),
                         ("kvpress:ExpectedAttentionPress", ()), ("kvpress:AdaKVPress", (("press", "SnapKVPress"),))):
        with pytest.raises(UsageError, match=why) as err:
            check_model_support(model, [PressConfig(press=spec, keep_ratio=0.5, mode="prefill",
                                                    params=params).validate()])
        assert "\n" not in str(err.value)
    check_model_support(model, [PressConfig(press="kvpress:KnormPress", keep_ratio=0.5, mode="prefill").validate()])


def test_kvpress_presses_where_knormctl_finds_no_decoder_layers_are_refused_in_one_line(kvpress):
    """GPT-2: 'unexpected ValueError: cannot find the decoder layers' (exit 1) before."""
    import transformers as T

    from knormctl.engine.presses import check_model_support

    model = _tiny(T.GPT2Config, T.GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=4)
    with pytest.raises(UsageError, match="press 'kvpress:KnormPress' cannot run on GPT2LMHeadModel: cannot find the "
                                         "decoder layers of GPT2LMHeadModel"):
        check_model_support(model, [PressConfig(press="kvpress:KnormPress", keep_ratio=0.5, mode="prefill").validate()])
