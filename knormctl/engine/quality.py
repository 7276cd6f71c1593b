"""Perplexity: of the prompt under the full model, and of the following text under a press.

``ppl_context`` cannot change with compression (the old scripts reported only this).
``ppl_compressed`` is the number that matters: the prompt is prefilled, then the next
``eval_ids`` are fed ONE token at a time (teacher forcing) while the same press acts
on the cache after every forward, exactly as during generation.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from knormctl.config import PressConfig
from knormctl.engine.compress import Compressor
from knormctl.engine.kvcache import check_cut_supported, new_cache, num_layers
from knormctl.engine.loop import CachedForward, as_input_ids, cutter, prefill
from knormctl.engine.timing import model_device


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood, in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _perplexity(nll: float, n: int, what: str) -> float:
    """exp(mean NLL). A mean that is not finite (NaN or inf logits: an overflow under this
    configuration, a broken model) or beyond exp's range fails the sample with that reason
    (RuntimeError: stored as the cell's error) instead of storing NaN, which SQLite turns into
    NULL: the prompt would silently leave that one metric."""
    mean = nll / n
    if not math.isfinite(mean) or mean > 700.0:
        raise RuntimeError(f"the {what} perplexity is not finite (mean NLL {mean:.4g} over {n} tokens): "
                           f"the model's logits held NaN or inf")
    return math.exp(mean)


@torch.inference_mode()
def context_perplexity(model, input_ids, chunk: int = 512) -> float:
    """Perplexity of the prompt (tokens 1..S-1) under the full cache, in chunks so the
    full-vocabulary logits of a long prompt never sit in memory at once."""
    device = model_device(model)
    ids = as_input_ids(input_ids, device)
    s = ids.shape[1]
    if s < 2:
        raise ValueError("context perplexity needs at least 2 tokens")
    fwd = CachedForward(model, new_cache(model, capacity=s), last_logits_only=False)
    positions = torch.arange(s, device=device).unsqueeze(0)
    total = 0.0
    for start in range(0, s - 1, chunk):
        end = min(start + chunk, s - 1)
        out = fwd(ids[:, start:end], positions[:, start:end])
        total += float(_nll(out.logits, ids[:, start + 1:end + 1]))
    return _perplexity(total, s - 1, "prompt's")


@torch.inference_mode()
def compressed_perplexity(model, input_ids, eval_ids, cfg: PressConfig, seed: int | None = None,
                          prefill_chunk: int = 0) -> float | None:
    """Teacher-forced perplexity of ``eval_ids`` (the text after the prompt) while
    ``cfg``'s press acts on the cache. None when there is nothing to score.
    ``seed``: the sample's seed (the random press's draws, as in ``run_generation``);
    ``prefill_chunk``: the prompt prefilled in chunks, cut after each (``loop.prefill``)."""
    eval_ids = list(eval_ids)
    if not eval_ids:
        return None
    device = model_device(model)
    ids = as_input_ids(input_ids, device)
    s = ids.shape[1]
    targets = torch.tensor(eval_ids, dtype=torch.long, device=device)
    positions = torch.arange(s + len(eval_ids), device=device).unsqueeze(0)
    if not cfg.is_baseline and cfg.keep_ratio < 1.0:
        check_cut_supported(model)
    fwd = CachedForward(model, new_cache(model, capacity=s + len(eval_ids) - 1))
    comp = Compressor(cfg, num_layers(model), model=model, seed=seed)
    cut = cutter(comp, fwd, s, prefill_chunk)
    try:
        if prefill_chunk and s > prefill_chunk:
            out = prefill(fwd, ids, positions[:, :s], prefill_chunk, lambda: None, cut)
        else:
            out = fwd(ids, positions[:, :s], may_shrink=comp.cuts_in_forward)  # kvpress cuts inside it
        total = _nll(out.logits[:, -1:], targets[:1])
        for j in range(len(eval_ids) - 1):
            cut(prefill=(j == 0))  # never after the last forward: nothing reads it
            out = fwd(targets[j:j + 1].view(1, 1), positions[:, s + j:s + j + 1])
            total = total + _nll(out.logits, targets[j + 1:j + 2])
    finally:
        comp.close()
    return _perplexity(float(total), len(eval_ids), "compressed")


@torch.inference_mode()
def stream_perplexity(model, ids, cfg: PressConfig, skip_first: int = 0, seed: int | None = None) -> float | None:
    """The original l2compress LM evaluation: stream a whole chunk ONE token at a time from
    its start with the press active after every forward (``prune_after`` acts as the cache
    budget, decode semantics whatever ``cfg.mode`` says: there is no prefill), and report
    the perplexity of the tokens after the first ``skip_first``. None if none are left."""
    ids = list(ids)
    scored = len(ids) - 1 - skip_first
    if scored < 1:
        return None
    device = model_device(model)
    tokens = torch.tensor(ids, dtype=torch.long, device=device).view(1, -1)
    decode_cfg = dataclasses.replace(cfg, mode="decode")
    if not cfg.is_baseline and cfg.keep_ratio < 1.0:
        check_cut_supported(model)
    fwd = CachedForward(model, new_cache(model, capacity=len(ids) - 1))
    positions = torch.arange(len(ids), device=device).unsqueeze(0)
    comp = Compressor(decode_cfg, num_layers(model), model=model, seed=seed)
    total = 0.0
    try:
        for j in range(len(ids) - 1):
            if j and comp.after_forward(fwd.cache, prefill=False):  # the cut after the previous forward
                fwd.cut_done()
            out = fwd(tokens[:, j:j + 1], positions[:, j:j + 1])
            if j >= skip_first:
                total += float(_nll(out.logits, tokens[:, j + 1:j + 2]))
    finally:
        comp.close()
    return _perplexity(total, scored, "streamed")
