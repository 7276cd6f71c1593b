"""The engine's public Python API: one call per generation, tokens and metrics back."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from knormctl.config import PressConfig
from knormctl.engine.loop import as_input_ids, run_generation
from knormctl.engine.quality import compressed_perplexity
from knormctl.engine.result import GenerationResult
from knormctl.engine.timing import model_device, model_devices, synchronizer
from knormctl.stats import Latency


def generate_with_compression(model, tokenizer, input_ids, max_new_tokens: int = 100, keep_ratio: float = 0.9,
                              prune_after: int = 512, skip_layers: Sequence[int] = (0,), *, press: str = "knorm",
                              compress_mode: str = "decode", keep_recent: int = 0, eval_ids=None,
                              sampling: bool = False, temperature: float = 1.0, seed: int = 0,
                              decode_step: str = "launched") -> GenerationResult:
    """Generate under KnormPress (or another press) and measure it.

    >>> res = generate_with_compression(model, tok, ids, max_new_tokens=50, keep_ratio=0.8)
    >>> res.text, res.tpot_s, res.kv_bytes_final
    ``eval_ids`` (the tokens that follow the prompt in the source text) adds ``ppl_compressed``.
    ``decode_step``: "launched", "static" or "graph" (``loop.run_generation``; engine/graphstep.py).
    """
    cfg = PressConfig(press=press, keep_ratio=keep_ratio, prune_after=prune_after, skip_layers=tuple(skip_layers),
                      mode=compress_mode, keep_recent=keep_recent, seed=seed).validate()
    res = run_generation(model, input_ids, cfg, max_new_tokens, sampling=sampling, temperature=temperature,
                         seed=seed, tokenizer=tokenizer, decode_step=decode_step)
    if eval_ids is not None:
        res.ppl_compressed = compressed_perplexity(model, input_ids, eval_ids, cfg, seed=seed)
        res.eval_tokens = len(eval_ids)
    return res


class _TokenClock(BaseStreamer):
    """Time-stamps every token generate() emits (the first put() is the prompt)."""

    def __init__(self, sync):
        self.sync, self.stamps, self._seen_prompt = sync, [], False

    def put(self, value):
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.sync()
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def reference_generate(model, input_ids, max_new_tokens: int) -> dict:
    """The same prompt through ``model.generate()`` (full cache, greedy): tokens, TTFT, TPOT.

    Used to check the engine's baseline against what transformers itself does.
    """
    device = model_device(model)
    ids = as_input_ids(input_ids, device)
    sync = synchronizer(model_devices(model))
    clock = _TokenClock(sync)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
                         pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else None)
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    lat = Latency.from_values(steps)
    return {"token_ids": out[0, ids.shape[1]:].tolist(), "ttft_s": clock.stamps[0] - t0, "tpot_s": lat.mean,
            "itl_p50_s": lat.p50, "step_latencies_s": steps, "total_s": clock.stamps[-1] - t0}
