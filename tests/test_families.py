"""Model families beyond Llama and GPT-NeoX: the cut is exact (kept sets, logits, positions)
for Qwen2, Qwen3 (q/k norm), Mistral, Phi-3 (fused qkv) and Gemma; families whose cache the
cut cannot handle (sliding-window and alternating local/global layers) are refused with one
line that names the family and why, before a run writes anything."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

from knormctl.config import PressConfig
from knormctl.engine.compress import Compressor, n_keep_for
from knormctl.engine.kvcache import CacheLedger, cache_kwargs, cut_refusal, new_cache
from knormctl.engine.loop import run_generation
from knormctl.errors import UsageError

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, max_position_embeddings=4096,
              pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.2)  # larger than the default 0.02: peaked attention, so positions show

# name -> (config class, model class, architecture kwargs); every one runs the exact cut
SUPPORTED = {
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 8}),  # q_norm / k_norm before RoPE
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}),  # v0.2+ layout
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),  # fused qkv_proj
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {"head_dim": 8}),
}
# name -> (config class, model class, kwargs, what the refusal must say)
REFUSED = {
    "mistral-sliding": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 16},
                        r"mistral: sliding-window attention \(window 16\) in every layer"),
    "qwen2-sliding": (T.Qwen2Config, T.Qwen2ForCausalLM,
                      {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
                      r"qwen2: sliding-window attention \(window 16\) in layers 2-3 of 4"),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 8, "sliding_window": 16},
               r"gemma2: sliding-window attention \(window 16\) in layers 0,2 of 4"),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"head_dim": 8, "sliding_window": 16},
               r"gemma3_text: sliding-window attention \(window 16\) in"),
}


def _build(config_cls, model_cls, layers=2, kv_heads=2, heads=4, **arch):
    torch.manual_seed(0)
    cfg = config_cls(**COMMON, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     **arch)
    return model_cls(cfg).eval()


@pytest.fixture(scope="module", params=sorted(SUPPORTED))
def family(request):
    config_cls, model_cls, arch = SUPPORTED[request.param]
    return request.param, config_cls, model_cls, arch


def _prompt(n, seed=1):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _lowest_norms(keys: torch.Tensor, n_keep: int) -> list[int]:
    """Brute force: the n_keep lowest float32 norms of one head, ties to the most recent, in order."""
    norms = torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)
    order = sorted(range(len(norms)), key=lambda j: (float(norms[j]), -j))
    return sorted(order[:n_keep])


def _hand_cut(cache, keep_ratio, prune_after, skip):
    """The KnormPress rule written out per layer and head, with a Python sort."""
    for i, layer in enumerate(cache.layers):
        length = layer.keys.shape[-2]
        if i in skip or length <= prune_after:
            continue
        n_keep = n_keep_for(length, keep_ratio)
        idx = torch.tensor([[_lowest_norms(layer.keys[b, h], n_keep) for h in range(layer.keys.shape[1])]
                            for b in range(layer.keys.shape[0])])
        gather = idx.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)


def test_these_families_have_plain_caches(family):
    name, config_cls, model_cls, arch = family
    assert cut_refusal(_build(config_cls, model_cls, **arch)) is None


@torch.inference_mode()
def test_knorm_generation_equals_a_hand_built_cut_step_by_step(family):
    """Decode mode (a cut after every forward, layer 0 skipped): at every step the engine's
    cache holds exactly the hand-cut entries, the logits agree, and run_generation produces
    the tokens of this reference loop."""
    name, config_cls, model_cls, arch = family
    model = _build(config_cls, model_cls, layers=3, **arch)
    cfg = PressConfig(press="knorm", keep_ratio=0.8, prune_after=16, skip_layers=(0,), mode="decode")
    ids, n_new = _prompt(40), 8
    ours, ref = new_cache(model), new_cache(model)
    comp = Compressor(cfg, 3)
    positions = torch.arange(40 + n_new).unsqueeze(0)
    out_a = model(input_ids=ids, position_ids=positions[:, :40], **cache_kwargs(model, ours))
    out_b = model(input_ids=ids, position_ids=positions[:, :40], **cache_kwargs(model, ref))
    tokens = []
    for step in range(n_new):
        torch.testing.assert_close(out_a.logits[:, -1], out_b.logits[:, -1])
        token = out_b.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        if step == n_new - 1:
            break
        comp.after_forward(ours, prefill=(step == 0))
        _hand_cut(ref, 0.8, 16, skip={0})
        for la, lb in zip(ours.layers, ref.layers):  # the kept sets (and their order) agree exactly
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        pos = positions[:, 40 + step:41 + step]
        out_a = model(input_ids=token, position_ids=pos, **cache_kwargs(model, ours))
        out_b = model(input_ids=token, position_ids=pos, **cache_kwargs(model, ref))
    # 40 -> 32, 33 -> 27, 28 -> 23, 24 -> 20, 21 -> 17, 18 -> 15, then 16 <= prune_after: 6 cuts
    assert comp.events == 6 and ours.layers[1].keys.shape[-2] == 17
    assert run_generation(model, ids, cfg, n_new).token_ids == tokens


@torch.inference_mode()
def test_positions_after_pruning_are_the_original_ones(family):
    """One layer, one KV head: the kept cache entries ARE the kept tokens, so the model fed
    only those tokens at their true positions must give the same next-token logits."""
    name, config_cls, model_cls, arch = family
    m = _build(config_cls, model_cls, layers=1, kv_heads=1, **arch)
    ids = _prompt(40)
    cache = new_cache(m)
    m(input_ids=ids, position_ids=torch.arange(40).unsqueeze(0), **cache_kwargs(m, cache))
    kept = torch.tensor(_lowest_norms(cache.layers[0].keys[0, 0], 20))
    Compressor(PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill"),
               1).after_forward(cache, prefill=True)
    nxt = torch.tensor([[5]])
    pruned = m(input_ids=nxt, position_ids=torch.tensor([[40]]), **cache_kwargs(m, cache)).logits[0, -1]
    ref_ids = torch.cat([ids[0, kept], nxt[0]]).unsqueeze(0)
    ref = m(input_ids=ref_ids, position_ids=torch.cat([kept, torch.tensor([40])]).unsqueeze(0)).logits[0, -1]
    wrong = m(input_ids=ref_ids).logits[0, -1]  # positions counted from 0
    torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(wrong, ref, atol=1e-4), "the test must be able to fail without positions"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_sliding_window_families_are_refused_in_one_line(name):
    config_cls, model_cls, arch, why = REFUSED[name]
    model = _build(config_cls, model_cls, layers=4, **arch)
    cfg = PressConfig(press="knorm", keep_ratio=0.5, prune_after=4, skip_layers=())
    with pytest.raises(UsageError, match=why) as err:
        run_generation(model, _prompt(30), cfg, 3)
    assert "\n" not in str(err.value) and str(err.value).startswith("cannot compress the KV cache of this model")
    # keep_ratio 1.0 evicts nothing: allowed, like the full-cache reference
    run_generation(model, _prompt(30), PressConfig(press="knorm", keep_ratio=1.0), 2)


@torch.inference_mode()
@pytest.mark.parametrize("name", ["gemma2", "mistral-sliding"])
def test_full_cache_reference_runs_on_sliding_window_layers(name):
    """No cut, no refusal: the ledger knows a sliding-window layer keeps window - 1 entries,
    and the engine's tokens equal model.generate()'s past the window."""
    config_cls, model_cls, arch, _ = REFUSED[name]
    model = _build(config_cls, model_cls, layers=4, **arch)
    ids = _prompt(30)
    res = run_generation(model, ids, PressConfig(), 6)
    gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert res.token_ids == gen[0, 30:].tolist()
    cache = new_cache(model)
    ledger = CacheLedger(model, cache)
    model(input_ids=ids, position_ids=torch.arange(30).unsqueeze(0), **cache_kwargs(model, cache))
    ledger.grew(30)
    assert 15 in ledger.held  # window 16: the sliding layers hold 15 of the 30 entries


# --- through the CLI: refused before a row exists; the attention implementation is recorded ------

@pytest.fixture(scope="module")
def tiny_gemma2_dir(tmp_path_factory, tiny_tokenizer):
    from conftest import _tiny_model_dir

    return _tiny_model_dir(tmp_path_factory.mktemp("tiny-gemma2"), T.Gemma2Config, T.Gemma2ForCausalLM,
                           tiny_tokenizer, num_key_value_heads=2, head_dim=8, sliding_window=16)


def _args(model_dir, books_dir, db, *extra):
    return ["--model", str(model_dir), "--wikitext-source", f"text:{books_dir}", "--num-wikitext-samples", "1",
            "--num-pg19-samples", "0", "--wikitext-prompt-tokens", "40", "--max-new-tokens", "3",
            "--eval-tokens", "0", "--threads", "1", "--no-warmup", "--db", str(db), *extra]


def test_sweep_refuses_a_sliding_window_family_before_writing(tiny_gemma2_dir, books_dir, tmp_path):
    from knormctl.cli import app

    db = tmp_path / "r.db"
    res = CliRunner().invoke(app, ["sweep", "--keep-ratios", "0.5", *_args(tiny_gemma2_dir, books_dir, db)])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]  # after the progress lines
    assert len(errors) == 1 and "gemma2: sliding-window attention (window 16)" in errors[0]
    assert "Traceback" not in res.output
    if db.exists():
        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_runs_record_the_attention_implementation(tiny_llama_dir, tiny_gemma2_dir, books_dir, tmp_path):
    from knormctl.cli import app
    from knormctl.engine.models import load_model

    db = tmp_path / "r.db"
    for folder, command in ((tiny_llama_dir, ["sweep", "--keep-ratios", "0.5"]), (tiny_gemma2_dir, ["baseline"])):
        res = CliRunner().invoke(app, [*command, "--json", *_args(folder, books_dir, db)])
        assert res.exit_code == 0, res.output
        run_id = json.loads(res.stdout)["run_id"]
        stored = sqlite3.connect(db).execute("SELECT attn_implementation FROM runs WHERE id=?", (run_id,)).fetchone()
        assert stored[0] == load_model(str(folder)).model.config._attn_implementation
        assert stored[0] in ("sdpa", "eager")


# ----------------------------------------------------------------------------- what is refused, and why

def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return model_cls(config_cls(**kw)).eval()


def test_the_rebuilt_queries_are_the_models_own_or_the_press_is_refused(family):
    """A query-aware press rebuilds the queries from the hidden states (kvpress's habit); the
    check compares them with the model's own rotation before any run, on every supported family."""
    from knormctl.engine.observe import check_model_queries

    name, config_cls, model_cls, arch = family
    check_model_queries(_build(config_cls, model_cls, **arch), "snapkv")  # passes: nothing raised


@pytest.mark.parametrize("name, build, why", [
    # Cohere rotates interleaved pairs, not halves: SnapKV kept 26 of the true top 32 there
    ("cohere", lambda: _tiny(T.CohereConfig, T.CohereForCausalLM, vocab_size=VOCAB, hidden_size=32,
                             intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, initializer_range=0.2),
     "CohereAttention: its rotary embedding rotates the query dimensions another way"),
    # OLMo-2 normalises the whole projection before the head split
    ("olmo2", lambda: _tiny(T.Olmo2Config, T.Olmo2ForCausalLM, vocab_size=VOCAB, hidden_size=32,
                            intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2),
     "Olmo2Attention: its query projection or q-norm has a layout knormctl does not rebuild"),
    ("gpt2", lambda: _tiny(T.GPT2Config, T.GPT2LMHeadModel, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4),
     "cannot find the decoder layers of GPT2LMHeadModel"),
])
def test_a_query_press_on_a_model_whose_queries_differ_is_refused_in_one_line(name, build, why):
    from knormctl.engine.presses import check_model_support

    model = build()
    cfgs = [PressConfig(press="snapkv", keep_ratio=0.5).validate()]
    with pytest.raises(UsageError, match=why) as err:
        check_model_support(model, cfgs)
    assert "\n" not in str(err.value)
    check_model_support(model, [PressConfig(press="knorm", keep_ratio=0.5).validate()])  # knorm needs no queries


@pytest.mark.parametrize("name, build", [
    # StableLM-2 and Phi with qk_layernorm: a LayerNorm per head before the rotation
    ("stablelm", lambda: _build(T.StableLmConfig, T.StableLmForCausalLM, kv_heads=4, qk_layernorm=True)),
    ("phi", lambda: _tiny(T.PhiConfig, T.PhiForCausalLM, vocab_size=VOCAB, hidden_size=32, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, qk_layernorm=True, partial_rotary_factor=0.5)),
    # OLMo-1 clamps the projection (0.05: the clamp acts on these random weights)
    ("olmo", lambda: _build(T.OlmoConfig, T.OlmoForCausalLM, clip_qkv=0.05)),
])
def test_queries_normed_per_head_or_clamped_are_rebuilt_as_the_model_computes_them(name, build):
    """The check passed these while the rebuilt queries missed the norm or clamp (tova kept other
    entries: 2 of 12 tokens equal on StableLM); it now compares with the queries the model
    hands its own rotation, and the rebuild applies both."""
    from knormctl.engine.observe import attention_modules, check_model_queries, prerope_queries

    model = build()
    check_model_queries(model, "snapkv")  # nothing raised: the model's own queries
    module = attention_modules(model)[0]
    h = torch.randn(1, 5, model.config.hidden_size)
    plain = module.q_proj(h).view(1, 5, model.config.num_attention_heads, -1).transpose(1, 2)
    assert not torch.allclose(prerope_queries(module, h), plain)  # the norm or clamp does act here


def test_the_query_check_compares_with_the_models_own_queries():
    """A rebuild that is off (here by 10%) is refused, whatever its rotation: the check reads the
    queries the model itself rotates."""
    from knormctl.engine.observe import check_model_queries, prerope_queries

    model = _build(T.LlamaConfig, T.LlamaForCausalLM)
    with pytest.raises(UsageError, match="LlamaAttention: its queries before the rotation are not the projection "
                                         "x rebuilds"):
        check_model_queries(model, "snapkv", rebuild=lambda m, h: prerope_queries(m, h) * 1.1, who="x")
    check_model_queries(model, "snapkv")


def test_a_model_whose_query_check_cannot_run_is_refused_not_crashed():
    """GPT-OSS rotates half-split heads with half-size cos/sin inside its own function: the old
    probe crashed ('size of tensor a (4) must match ... (8)', exit 1) before any refusal."""
    from knormctl.engine.observe import check_model_queries

    if not hasattr(T, "GptOssConfig"):
        pytest.fail("transformers without GPT-OSS: this test needs transformers >= 4.55")
    model = _tiny(T.GptOssConfig, T.GptOssForCausalLM, vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_local_experts=2, num_experts_per_tok=1, sliding_window=16)
    with pytest.raises(UsageError, match="GptOssAttention: its rotary embedding rotates the query dimensions "
                                         "another way") as err:
        check_model_queries(model, "tova")
    assert "\n" not in str(err.value)


def test_alibi_and_uneven_layers_are_refused_where_the_cut_would_break_them():
    from knormctl.engine.kvcache import probe_uneven_layers

    bloom = _tiny(T.BloomConfig, T.BloomForCausalLM, vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    assert "ALiBi position biases are built from the cache's length" in cut_refusal(bloom)
    # Falcon (rotary) runs with every layer cut alike, not with layer 0 kept whole
    falcon = _tiny(T.FalconConfig, T.FalconForCausalLM, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, alibi=False, new_decoder_architecture=False, multi_query=True)
    assert cut_refusal(falcon) is None
    probe_uneven_layers(falcon, ())  # nothing skipped: nothing to probe
    with pytest.raises(UsageError, match=r"--skip-layers 0: falcon cannot attend over layers cut to different "
                                         r"lengths .*; use --skip-layers none"):
        probe_uneven_layers(falcon, (0,))
    llama = _build(T.LlamaConfig, T.LlamaForCausalLM)
    probe_uneven_layers(llama, (0,))  # Llama attends over uneven layers (the engine's default)


def test_a_static_decode_step_on_a_model_without_findable_layers_is_refused():
    from knormctl.engine.support import check_model

    gpt2 = _tiny(T.GPT2Config, T.GPT2LMHeadModel, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
    cfgs = [PressConfig().validate(), PressConfig(press="knorm", keep_ratio=0.5).validate()]
    check_model(gpt2, cfgs, skip_layers=(0,), decode_step="launched", device="cpu")  # knorm runs on GPT-2
    with pytest.raises(UsageError, match=r"--decode-step static: cannot find the decoder layers of GPT2LMHeadModel "
                                         r"\(use --decode-step launched\)"):
        check_model(gpt2, cfgs, skip_layers=(0,), decode_step="static", device="cpu")


def test_a_static_decode_step_on_sliding_window_layers_is_refused_not_run_launched():
    """Mistral with a window: its cache layers stay transformers' own, the static step can read
    none of them, and every step ran launched in a run labelled 'static'."""
    from knormctl.engine.support import check_model

    mistral = _build(T.MistralConfig, T.MistralForCausalLM, sliding_window=16)
    cfgs = [PressConfig().validate()]  # the full cache: it runs on such a model
    check_model(mistral, cfgs, skip_layers=(0,), decode_step="launched", device="cpu")
    with pytest.raises(UsageError, match=r"^--decode-step static: layers 0,1 of 2 keep transformers' own "
                                         r"DynamicSlidingWindowLayer \(sliding-window attention\), which the static "
                                         r"step cannot read; use --decode-step launched$"):
        check_model(mistral, cfgs, skip_layers=(0,), decode_step="static", device="cpu")
    llama = _build(T.LlamaConfig, T.LlamaForCausalLM)
    check_model(llama, cfgs, skip_layers=(0,), decode_step="static", device="cpu")


@pytest.mark.parametrize("name, config_cls, model_cls, arch", [
    ("llama", T.LlamaConfig, T.LlamaForCausalLM, {}),
    # RoPE left out of every 4th layer ("NoPE"): layer 3's queries were rotated all the same
    ("smollm3", T.SmolLM3Config, T.SmolLM3ForCausalLM, {"no_rope_layer_interval": 4}),
    # softmax scale attention_multiplier, not 1/sqrt(head_dim): kvpress's 1/sqrt(d) is another attention
    ("granite", T.GraniteConfig, T.GraniteForCausalLM, {"attention_multiplier": 0.9}),
])
def test_a_window_press_scores_with_the_attention_the_model_computes_in_every_layer(name, config_cls, model_cls,
                                                                                     arch):
    """SnapKV's window attention, rebuilt from the hidden states and the cached keys, equals the
    model's own eager attention weights in every layer, NoPE layers and own scales included."""
    from knormctl.engine.observe import install_observers
    from knormctl.engine.presses.attention import SnapKVPress

    torch.manual_seed(0)
    cfg = config_cls(**COMMON, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, **arch)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    if name == "smollm3":
        assert [m.self_attn.use_rope for m in model.model.layers] == [1, 1, 1, 0]
    press = SnapKVPress(window_size=4)
    handles = install_observers(model, press, list(range(4)))
    try:
        with torch.inference_mode():
            out = model(input_ids=_prompt(12), use_cache=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    for i, attn in enumerate(out.attentions):
        keys = out.past_key_values.layers[i].keys
        mine, w = press._window(keys, i)  # (b, kv, g, w, s - w)
        theirs = attn.view(1, 2, 2, 12, 12)[..., -w:, : 12 - w]
        torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=1e-4, msg=f"{name} layer {i}")


ROPES = {
    # grows: a new inv_freq buffer once positions pass those cached
    "dynamic": (128, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, 200),
    # switches: the long factors are copied INTO the inv_freq buffer (in place, for CUDA graphs)
    # once positions pass the original 128; the prompt stays below, so the model uses the short ones
    "longrope": (512, {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": 128,
                       "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}, 100),
}


@pytest.mark.parametrize("kind", ROPES)
def test_expected_attention_leaves_a_stateful_rope_as_it_found_it(kind):
    """Expected Attention rotates by the RoPE of 512 positions the model never saw; a
    dynamic-NTK embedding grew its frequencies for them, and a LongRoPE one switched its
    buffer to the long factors, so the module no longer held what the model had set."""
    from knormctl.engine.observe import decoder_base, install_observers
    from knormctl.engine.presses.attention import ExpectedAttentionPress

    torch.manual_seed(0)
    max_positions, rope, n = ROPES[kind]
    cfg = T.LlamaConfig(**{**COMMON, "max_position_embeddings": max_positions}, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope)
    model = T.LlamaForCausalLM(cfg).eval()
    rotary = decoder_base(model).rotary_emb
    ids = _prompt(n)
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    state = (rotary.inv_freq.clone(), rotary.max_seq_len_cached)
    press = ExpectedAttentionPress()
    handles = install_observers(model, press, [0, 1])
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
            scores = press.score(out.past_key_values.layers[1].keys, out.past_key_values.layers[1].values, 1)
    finally:
        for h in handles:
            h.remove()
    assert scores.shape[-1] == n and press._rope[0] == n  # it did rotate to positions n..n+511
    assert rotary.max_seq_len_cached == state[1] and torch.equal(rotary.inv_freq, state[0])
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_rope_at_restores_a_buffer_made_in_inference_mode_from_outside_it():
    """A dynamic-NTK embedding's grown inv_freq, made in a forward under inference_mode, is an
    inference tensor: restoring its contents in place outside inference mode (the cut may run
    there) raised 'Inplace update to inference tensor outside InferenceMode'."""
    from knormctl.engine.observe import decoder_base
    from knormctl.engine.presses.attention import rope_at

    cfg = T.LlamaConfig(**{**COMMON, "max_position_embeddings": 128}, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 10000.0})
    model = T.LlamaForCausalLM(cfg).eval()
    rotary = decoder_base(model).rotary_emb
    with torch.inference_mode():
        model(input_ids=_prompt(200))  # grows: a new inv_freq buffer, an inference tensor
    state = rotary.inv_freq.clone()
    with torch.no_grad():
        rope_at(rotary, torch.zeros(1, dtype=torch.float32), torch.arange(300, 900)[None])  # grows further
    assert torch.equal(rotary.inv_freq, state)


def test_expected_attention_does_not_rotate_the_queries_of_a_layer_without_rope():
    """SmolLM3's layer 3 has no RoPE: its future queries are its past ones, so its scores do
    not depend on where the future positions lie; a rotating layer's do."""
    from knormctl.engine.observe import install_observers
    from knormctl.engine.presses.attention import ExpectedAttentionPress

    torch.manual_seed(0)
    cfg = T.SmolLM3Config(**COMMON, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          no_rope_layer_interval=4)
    model = T.SmolLM3ForCausalLM(cfg).eval()
    press = ExpectedAttentionPress(n_future_positions=8)
    handles = install_observers(model, press, list(range(4)))
    try:
        with torch.inference_mode():
            cache = model(input_ids=_prompt(40), use_cache=True).past_key_values
    finally:
        for h in handles:
            h.remove()
    moved = {}
    for shift in (0, 1000):
        for i in (2, 3):
            press._next[i], press._rope = 40 + shift, None
            moved.setdefault(i, []).append(press.score(cache.layers[i].keys, cache.layers[i].values, i))
    assert not torch.allclose(*moved[2])  # RoPE: where the future lies changes the scores
    torch.testing.assert_close(*moved[3])  # NoPE: it does not


@pytest.mark.parametrize("setting", [{"num_kv_shared_layers": 2}, {"kv_sharing_modes": ["new", "reuse"]}])
def test_layers_sharing_one_kv_cache_are_refused(setting):
    """Gemma-3n's last layers read the KV of earlier ones (num_kv_shared_layers), other configs
    say 'reuse': a cut of one layer would cut the others' cache too, unseen."""
    model = _build(T.LlamaConfig, T.LlamaForCausalLM)
    assert cut_refusal(model) is None
    for key, value in setting.items():
        setattr(model.config, key, value)
    assert cut_refusal(model) == ("llama: layers share one KV cache, so a cut of one layer would silently cut the "
                                  "others; KV-sharing models are not supported")


def test_the_query_check_tolerates_rounding_and_nothing_more():
    """The rebuilt queries may differ from the model's by its dtype's rounding (relative to their
    size), not by a norm or clamp the rebuild missed: float32 within 1e-4, bfloat16 within 8 ulps."""
    from knormctl.engine.observe import _beyond_rounding

    q = torch.linspace(-1, 1, 64)
    assert _beyond_rounding(q + 5e-5, q, torch.float32) is None
    assert _beyond_rounding(q + 1e-3, q, torch.float32) == pytest.approx(1e-3, rel=1e-3)
    assert _beyond_rounding(q + 0.03, q, torch.bfloat16) is None  # 8 x 2^-7 = 0.0625
    assert _beyond_rounding(q + 0.1, q, torch.bfloat16) == pytest.approx(0.1, rel=1e-3)
    assert _beyond_rounding(100 * q + 5e-3, 100 * q, torch.float32) is None  # relative to the queries' size
    assert _beyond_rounding(100 * q + 5e-2, 100 * q, torch.float32) is not None
