"""Chunked prefill with compression (`--prefill-chunk`, issue 16 item 2): the press cuts after
every chunk, so the cache never holds more than its budget plus one chunk."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.config import PressConfig, RunConfig
from knormctl.engine import loop
from knormctl.engine.loop import run_generation
from knormctl.engine.quality import compressed_perplexity
from knormctl.errors import UsageError
from knormctl.press_spec import parse_press_spec
from tests.test_kvbuffer import MODELS, VOCAB, _ids

PROMPT, CHUNK, NEW = 100, 16, 8


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _cfg(spec="knorm", mode="prefill", kr=0.5, prune_after=0, skip=()):
    name, params = parse_press_spec(spec)
    return PressConfig(press=name, params=params, keep_ratio=kr, prune_after=prune_after, skip_layers=skip,
                       mode=mode).validate()


@pytest.mark.parametrize("spec", ["knorm", "streaming", "snapkv(window_size=8)", "pyramidkv(window_size=4)"])
def test_the_cache_never_holds_more_than_the_budget_plus_a_chunk(model, spec):
    cfg = _cfg(spec)
    layers = model.config.num_hidden_layers
    whole = run_generation(model, _ids(PROMPT), cfg, NEW)
    chunked = run_generation(model, _ids(PROMPT), cfg, NEW, prefill_chunk=CHUNK)
    budget = math.ceil(0.5 * PROMPT)
    per_layer_max = max(budget, whole.kv_entries_final // layers - (NEW - 1))  # pyramidkv: budgets per layer
    assert whole.kv_entries_peak == layers * PROMPT  # one forward: the whole prompt before the cut
    assert chunked.kv_entries_peak <= layers * (per_layer_max + CHUNK)
    assert chunked.kv_bytes_peak < whole.kv_bytes_peak
    # every cut keeps what the cut of the whole prompt keeps: the same counts at the end
    assert chunked.kv_entries_final == whole.kv_entries_final
    assert chunked.new_tokens == NEW and all(0 <= t < VOCAB for t in chunked.token_ids)
    assert chunked.compress_events > whole.compress_events == 1


@pytest.mark.parametrize("prune_after", [48, 60, PROMPT])
def test_prune_after_between_the_budget_and_the_prompt_is_read_on_the_whole_prompt(model, prune_after):
    """prune_after above the budget: a layer cut to 30 entries grew back under prune_after with
    the next chunks and was never cut again (34 kept where one forward keeps 30). The whole
    prompt decides whether a cut is due, as in one forward; a prompt within prune_after: no cut."""
    cfg = _cfg(kr=0.3, prune_after=prune_after)
    layers = model.config.num_hidden_layers
    whole = run_generation(model, _ids(PROMPT), cfg, NEW)
    chunked = run_generation(model, _ids(PROMPT), cfg, NEW, prefill_chunk=CHUNK)
    assert chunked.kv_entries_final == whole.kv_entries_final
    if prune_after < PROMPT:
        assert whole.kv_entries_final == layers * (math.ceil(0.3 * PROMPT) + NEW - 1)
        assert chunked.kv_entries_peak <= layers * (math.ceil(0.3 * PROMPT) + CHUNK)
    else:
        assert chunked.compress_events == whole.compress_events == 0


def test_without_a_press_chunking_changes_nothing_but_the_forwards(model):
    whole = run_generation(model, _ids(PROMPT), PressConfig().validate(), NEW)
    chunked = run_generation(model, _ids(PROMPT), PressConfig().validate(), NEW, prefill_chunk=CHUNK)
    assert chunked.token_ids == whole.token_ids
    assert chunked.kv_entries_peak == whole.kv_entries_peak and chunked.compress_events == 0


def test_streaming_keeps_the_same_positions_chunked_or_not(model, monkeypatch):
    """Sinks + the newest entries: the same positions whatever the chunks. Layer 0's keys depend
    on the token and its position alone, so equal keys there mean equal kept positions."""
    made = []
    real = loop.new_cache
    monkeypatch.setattr(loop, "new_cache", lambda m, **kw: made.append(real(m, **kw)) or made[-1])
    cfg = _cfg("streaming")
    run_generation(model, _ids(PROMPT), cfg, 2)
    run_generation(model, _ids(PROMPT), cfg, 2, prefill_chunk=CHUNK)
    a, b = made[0].layers[0], made[1].layers[0]
    kept = math.ceil(0.5 * PROMPT)  # the prompt's kept entries (the generated token after them may differ)
    assert a.keys.shape == b.keys.shape and a.keys.shape[-2] == kept + 1
    torch.testing.assert_close(a.keys[:, :, :kept], b.keys[:, :, :kept], rtol=1e-5, atol=1e-5)


def test_decode_mode_cuts_between_chunks_by_its_own_rule(model):
    cfg = _cfg("knorm", mode="decode", kr=0.5, prune_after=24)
    layers = model.config.num_hidden_layers
    chunked = run_generation(model, _ids(PROMPT), cfg, NEW, prefill_chunk=CHUNK)
    # a layer over 24 entries is halved after each chunk: it never holds more than 24 + 16
    assert chunked.kv_entries_peak <= layers * (24 + CHUNK)
    assert chunked.compress_events >= PROMPT // CHUNK


def test_quality_uses_the_same_chunked_prefill(model):
    cfg = _cfg("knorm")
    ids, ev = _ids(PROMPT), _ids(12, seed=4)[0].tolist()
    whole = compressed_perplexity(model, ids, ev, cfg)
    chunked = compressed_perplexity(model, ids, ev, cfg, prefill_chunk=CHUNK)
    assert math.isfinite(chunked) and chunked != whole  # later chunks attend to a cut cache


@pytest.mark.parametrize("spec", ["adakv(base=knorm)",
                                  pytest.param("kvpress:KnormPress", marks=pytest.mark.kvpress)])
def test_presses_that_cannot_cut_between_chunks_are_refused(spec):
    with pytest.raises(UsageError, match="--prefill-chunk cannot be used with press"):
        RunConfig(presses=[spec], keep_ratios=[0.5], compress_mode="prefill", prefill_chunk=16).validate()


def test_the_paper_protocol_is_refused_with_chunks():
    """Its first answer token comes from an uncut prefill; chunks are cut between them, so the
    first token differed from the full cache's in 2 of 6 passkey samples, stored as 'paper'."""
    with pytest.raises(UsageError, match="^--prefill-chunk cannot be used with --protocol paper: that protocol "
                                         "takes the first answer token from an uncompressed prefill"):
        RunConfig(task="passkey", protocol="paper", keep_ratios=[0.5], prefill_chunk=16).validate()
    RunConfig(task="passkey", protocol="context", keep_ratios=[0.5], prefill_chunk=16).validate()


def test_the_engine_refuses_them_too(model):
    with pytest.raises(UsageError, match="--prefill-chunk: adakv sets per-head budgets"):
        run_generation(model, _ids(PROMPT), _cfg("adakv(base=knorm)"), 2, prefill_chunk=CHUNK)
    with pytest.raises(UsageError, match="must be >= 0"):
        RunConfig(prefill_chunk=-1).validate()


def test_sweep_stores_the_option_and_bounds_the_peak(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    args = ["--model", str(tiny_llama_dir), "--wikitext-source", f"text:{books_dir}", "--pg19-source",
            f"text:{books_dir}", "--num-wikitext-samples", "1", "--num-pg19-samples", "0",
            "--wikitext-prompt-tokens", "64", "--max-new-tokens", "4", "--eval-tokens", "4", "--threads", "1",
            "--db", str(db), "--keep-ratios", "0.5", "--prune-after", "0", "--skip-layers", "",
            "--compress-mode", "prefill", "--no-warmup"]
    res = CliRunner().invoke(app, ["sweep", *args, "--prefill-chunk", "16"])
    assert res.exit_code == 0, res.output
    con = sqlite3.connect(db)
    cfg = json.loads(con.execute("SELECT config_json FROM runs").fetchone()[0])
    assert cfg["prefill_chunk"] == 16
    rows = dict(con.execute("SELECT config_key, kv_bytes_peak FROM samples").fetchall())
    knorm = [k for k in rows if k.startswith("knorm|")]
    assert len(rows) == 2 and len(knorm) == 1, rows
    assert 0 < rows[knorm[0]] < rows["none"]


def test_chunks_into_layers_of_different_lengths_go_as_chunks_with_a_mask_per_layer(model, monkeypatch):
    """A skipped layer keeps everything after a cut, so the layers differ in length and one
    mask fits none but one; the chunks went one token at a time (7-26x the TTFT of chunks with
    the default --skip-layers 0). Each layer now gets its own causal mask: the same tokens and
    kept counts as the token-by-token feed, in chunk-sized forwards."""
    from knormctl.engine import uneven

    assert model.config._attn_implementation == "sdpa"
    forwards = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        cfg = _cfg("knorm", skip=(0,))
        masked = run_generation(model, _ids(PROMPT), cfg, NEW, prefill_chunk=CHUNK)
        chunked_forwards, forwards[:] = list(forwards), []
        monkeypatch.setattr(uneven, "layer_mask_hooks", lambda *a, **k: None)  # the token-by-token feed
        stepwise = run_generation(model, _ids(PROMPT), cfg, NEW, prefill_chunk=CHUNK)
    finally:
        handle.remove()
    assert masked.token_ids == stepwise.token_ids
    assert (masked.kv_entries_peak, masked.kv_entries_final) == (stepwise.kv_entries_peak, stepwise.kv_entries_final)
    chunks = [min(CHUNK, PROMPT - s) for s in range(0, PROMPT, CHUNK)]
    assert chunked_forwards == chunks + [1] * (NEW - 1)  # chunks, then the decode steps
    assert sum(forwards) == sum(chunked_forwards) and forwards.count(1) > NEW - 1  # token by token once uneven


def test_the_per_layer_masks_give_the_logits_of_token_by_token_feeding():
    """Layers of different lengths (a skipped layer after a cut): one multi-token forward under the
    per-layer causal masks gives, for EVERY new token, the logits of feeding them one at a time."""
    from knormctl.engine.kvcache import cache_kwargs, new_cache
    from knormctl.engine.uneven import layer_mask_hooks

    model = MODELS["llama"]()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    new = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))

    def cut_cache():
        cache = new_cache(model, buffered=False)
        with torch.inference_mode():
            model(input_ids=ids, position_ids=torch.arange(40).unsqueeze(0), **cache_kwargs(model, cache))
        for layer in cache.layers[1:]:  # layer 0 "skipped": keeps all 40, the others keep every other one
            layer.keys, layer.values = layer.keys[..., ::2, :].clone(), layer.values[..., ::2, :].clone()
        return cache

    pos = torch.arange(40, 48).unsqueeze(0)
    cache = cut_cache()
    hooks = layer_mask_hooks(model, cache, 8)
    assert hooks is not None
    try:
        with torch.inference_mode():
            together = model(input_ids=new, position_ids=pos, **cache_kwargs(model, cache)).logits[0]
    finally:
        for h in hooks:
            h.remove()
    cache = cut_cache()
    with torch.inference_mode():
        steps = torch.cat([model(input_ids=new[:, j:j + 1], position_ids=pos[:, j:j + 1],
                                 **cache_kwargs(model, cache)).logits[0] for j in range(8)])
    torch.testing.assert_close(together, steps, atol=2e-6, rtol=1e-5)
