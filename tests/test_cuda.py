"""CUDA only (skipped without a GPU): a compression event never raises the sample's peak
memory above the full cache's; the bounded cut and the random press keep the same entries
on the GPU as on the CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from knormctl.config import PressConfig
from knormctl.engine.compress import Compressor
from knormctl.engine.kvcache import cache_kwargs, new_cache
from knormctl.engine.loop import run_generation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model():
    """Llama-shaped, bf16, big enough that the KV cache (4 MiB a layer at 4096 tokens) is
    visible next to the weights and the prefill's activations."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def _ids(n, seed=0):
    return torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


ALLOCATOR_SLACK = 2 << 20  # bytes: see benchmarks/gpu_check.py's (e)

CONFIGS = [
    PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill"),
    PressConfig(press="streaming", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill"),
    PressConfig(press="random", keep_ratio=0.5, prune_after=0, skip_layers=(), mode="prefill"),
    PressConfig(press="knorm", keep_ratio=0.9, prune_after=512, skip_layers=(0,), mode="decode"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.key)
def test_compression_never_raises_the_peak_above_the_full_cache(model, cfg):
    ids = _ids(4096)
    run_generation(model, ids, PressConfig(), 4)  # warm both paths (allocator, kernels)
    run_generation(model, ids, cfg, 4)
    torch.cuda.empty_cache()  # both from the same allocator state: the same blocks for the same prefill
    full = run_generation(model, ids, PressConfig(), 16)
    torch.cuda.empty_cache()
    cut = run_generation(model, ids, cfg, 16)
    assert cut.compress_events >= 1 and cut.kv_bytes_final < full.kv_bytes_final
    assert full.memory.kind == cut.memory.kind == "cuda_max_memory_allocated"
    # ALLOCATOR_SLACK: an unsplit block is charged whole, up to 1 MiB past the request; a cut
    # that copied the cache would be 16 MiB over here
    over = cut.memory.bytes - full.memory.bytes
    assert over <= ALLOCATOR_SLACK, over / 2**20


def _prefilled(model, n=1024):
    cache = new_cache(model)
    model(input_ids=_ids(n).cuda(), position_ids=torch.arange(n, device="cuda").unsqueeze(0),
          **cache_kwargs(model, cache))
    return cache


def _copy(model, cache, device):
    out = new_cache(model)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.to(device, copy=True), layer.values.to(device, copy=True), i)
    return out


@torch.inference_mode()
def test_the_gpu_budget_stacks_groups_and_keeps_what_the_layer_by_layer_cut_keeps(model):
    # The budget is this sample's peak minus what is allocated: measured from this prefill alone
    # (not an earlier test's peak), and read before the reference copy takes memory of its own.
    torch.cuda.reset_peak_memory_stats()
    cache = _prefilled(model)
    cfg = PressConfig(press="knorm", keep_ratio=0.5, prune_after=0, skip_layers=(0,), mode="prefill")
    room = Compressor(cfg, 8).budget(torch.device("cuda"))
    layer_bytes = 2 * cache.layers[1].keys.numel() * cache.layers[1].keys.element_size()
    assert room // 2 >= 2 * layer_bytes, "after a 1024-token prefill the budget fits a stacked pair"
    per_layer = _copy(model, cache, "cuda")
    Compressor(cfg, 8, budget_bytes=room).after_forward(cache, prefill=True)
    Compressor(cfg, 8, budget_bytes=0).after_forward(per_layer, prefill=True)
    for a, b in zip(cache.layers, per_layer.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@torch.inference_mode()
def test_the_random_press_keeps_the_same_entries_on_the_gpu_as_on_the_cpu(model):
    """Its draws come from a CPU generator, so the same seed cuts alike on both devices."""
    gpu = _prefilled(model)
    cpu = _copy(model, gpu, "cpu")
    cfg = PressConfig(press="random", keep_ratio=0.5, prune_after=0, skip_layers=(0,), mode="prefill")
    Compressor(cfg, 8, seed=3).after_forward(gpu, prefill=True)
    Compressor(cfg, 8, seed=3).after_forward(cpu, prefill=True)
    for g, c in zip(gpu.layers, cpu.layers):
        assert torch.equal(g.keys.cpu(), c.keys) and torch.equal(g.values.cpu(), c.values)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: c.key)
def test_a_model_split_over_two_gpus_cuts_each_layer_on_its_own_gpu(model, cfg, tmp_path):
    """--device-map: layers 0-3 on cuda:0, 4-7 on cuda:1; each cache layer lives (and is cut) on
    its layer's GPU, tokens and kept counts equal the one-GPU model's, and the peak is summed
    over both GPUs."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    placed = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
              **{f"model.layers.{i}": 0 if i < 4 else 1 for i in range(8)}}
    split = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map=placed).eval()
    ids = _ids(1024, seed=5)
    a = run_generation(model, ids, cfg, 16)
    b = run_generation(split, ids, cfg, 16)
    assert a.token_ids == b.token_ids and a.kv_entries_final == b.kv_entries_final
    assert b.memory.kind == "cuda_max_memory_allocated_sum_2_gpus"
    cache = new_cache(split, capacity=64)
    with torch.inference_mode():
        split(input_ids=ids[:, :32].to("cuda:0"), position_ids=torch.arange(32, device="cuda:0").view(1, -1),
              **cache_kwargs(split, cache))
    assert [layer.keys.device.index for layer in cache.layers] == [0] * 4 + [1] * 4
    comp = Compressor(cfg, 8, model=split)
    assert comp.after_forward(cache, prefill=True)
    assert all(layer.keys.shape[-2] == 16 and layer.keys.device.index == (0 if i < 4 else 1)
               for i, layer in enumerate(cache.layers))


def test_steps_are_timed_by_cuda_events_within_the_host_wall_time(model):
    """On one GPU the loop stamps tokens with CUDA events (no host sync per step): every step
    takes some time, and the event-timed whole fits inside the host's wall clock around it."""
    import time

    from knormctl.engine.timing import StepClock

    assert StepClock([torch.device("cuda:0")]).kind == "cuda_events"
    assert StepClock([torch.device("cpu")]).kind == "host_clock"
    run_generation(model, _ids(512), CONFIGS[0], 8)  # warm
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = run_generation(model, _ids(512), CONFIGS[0], 32)
    wall = time.perf_counter() - t0
    assert len(res.step_latencies_s) == 31 and min(res.step_latencies_s) > 0
    assert 0 < res.ttft_s < res.total_s <= wall


def _prefill_cut_and_step(model, path: str) -> torch.Tensor:
    """The logits of a 512-token prefill, a knorm cut and 8 decode steps on the same tokens, on
    ``path``: "reference" (transformers' DynamicCache), "buffer" (the in-place buffer) or "graph"
    (the buffer's static step recorded as a CUDA graph and replayed)."""
    from knormctl.engine.graphstep import StaticStep
    from knormctl.engine.loop import CachedForward

    ids = _ids(520).cuda()
    pos = torch.arange(520, device="cuda").view(1, -1)
    cache = new_cache(model, capacity=520, buffered=path != "reference")
    fwd = CachedForward(model, cache)
    comp = Compressor(CONFIGS[0], 8, model=model)
    graph = StaticStep(fwd, 1, torch.device("cuda"), capture=True) if path == "graph" else None
    steps = []
    with torch.inference_mode():
        steps.append(fwd(ids[:, :512], pos[:, :512]).logits.float())
        assert comp.after_forward(cache, prefill=True)
        fwd.cut_done()
        for k in range(512, 520):
            step = graph if graph is not None else (lambda t, p: fwd(t, p).logits)
            steps.append(step(ids[:, k:k + 1], pos[:, k:k + 1]).float().clone())
    if graph is not None:
        assert (graph.steps, graph.captures) == (8, 1)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("path", ["buffer", "graph"])
def test_logits_equal_the_reference_path_within_bf16_tolerance(model, path):
    """The in-place buffer (strided views of a preallocated cache) and its static step replayed
    from a CUDA graph (engine/graphstep.py: the whole right-sized buffer under a length mask,
    knormctl's own attention) against transformers' DynamicCache, through a prefill, a knorm
    cut and 8 decode steps: the logits agree within bf16's tolerance (torch.testing's rtol for
    bf16, atol 2e-2), since the attention kernels differ."""
    torch.testing.assert_close(_prefill_cut_and_step(model, path), _prefill_cut_and_step(model, "reference"),
                               rtol=1.6e-2, atol=2e-2)


DECODE_IN_PLACE = PressConfig(press="knorm", keep_ratio=0.9, prune_after=512, skip_layers=(), mode="decode")


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3], DECODE_IN_PLACE, PressConfig()], ids=lambda c: c.key)
def test_a_graphed_generation_replays_the_static_step(model, cfg):
    """run_generation with decode_step="graph": the tokens of the same static step run eagerly,
    every decode step after the cut replayed, a graph recorded once per buffer layout (a
    prefill cut gathers into a new buffer once; a decode-mode cut compacts in place)."""
    ids = _ids(1024)
    eager = run_generation(model, ids, cfg, 32, decode_step="static")
    graphed = run_generation(model, ids, cfg, 32, decode_step="graph")
    assert graphed.token_ids == eager.token_ids
    assert graphed.static_steps == 31  # a skipped layer (CONFIGS[3]) gets its own mask
    if cfg.mode == "prefill" or cfg.is_baseline:
        assert graphed.graph_captures == 1
    else:  # decode mode: recorded again each time a cut gathered into a smaller buffer
        assert 1 <= graphed.graph_captures < 31
