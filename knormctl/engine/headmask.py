"""Per-head budgets (AdaKV) in a cache that holds one length per layer.

A ``DynamicCache`` layer is one (b, heads, seq, d) tensor: every head holds the same count.
When a press gives heads different budgets, the layer is cut to the LARGEST per-head count;
a head that keeps fewer fills its surplus slots with its next-best entries and marks them
dead in ``layer.live_mask`` (b, heads, seq). A forward pre-hook on the attention module then
hands SDPA a mask that hides the dead slots (the attention path stays SDPA).

So a per-head budget frees less memory than its nominal ratio: ``kv_size`` counts the bytes
held (dead slots and the mask included), never the nominal ratio. kvpress's AdaKV keeps
EVERY entry and masks the evicted ones (its ``attention_patch.py``): it frees nothing.
"""

from __future__ import annotations

import torch

from knormctl.engine.observe import attention_modules


def cut_per_head(layer, scores: torch.Tensor, live: torch.Tensor) -> None:
    """Cut ``layer`` to the largest per-head count of ``live`` (bool (b, h, s), the entries each
    head keeps); the surplus slots hold the next-best entries, dead. Kept slots stay in order."""
    from knormctl.engine.compress import keep_indices
    from knormctl.engine.kvbuffer import keep_entries

    n_max = int(live.sum(-1).max())
    if n_max == scores.shape[-1]:  # a head keeps everything: nothing leaves the layer, only masks
        layer.live_mask = live.clone()
        return
    idx = keep_indices(scores.float().masked_fill(live, float("inf")), n_max)  # live first, then the best dead
    keep_entries(layer, idx)
    layer.live_mask = live.gather(-1, idx)


def _cache_of(kwargs):
    for name in ("cache", "past_key_values", "layer_past"):  # transformers >= 5.2x, 5.2, GPT-NeoX
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _mask_hook(module, args, kwargs, layer_idx: int):
    """Replace the layer's attention mask: dead slots hidden from every query, new tokens causal.

    The model's own mask is dropped, not combined: knormctl runs batches without padding (every row causal), and
    after a per-head cut this layer's length differs from the one the model built its mask for.
    """
    cache = _cache_of(kwargs)
    if cache is None:
        return None
    layer = cache.layers[layer_idx]
    live = getattr(layer, "live_mask", None)
    if live is None:
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    q = hidden.shape[1]
    b, kv, s = live.shape
    live = torch.cat([live, live.new_ones(b, kv, q)], dim=-1)  # this forward's tokens are live
    layer.live_mask = live
    heads = module.config.num_attention_heads
    g = heads // kv
    mask = live[:, :, None, None, :].expand(b, kv, g, q, s + q).reshape(b, heads, q, s + q).clone()
    mask[..., s:] &= torch.ones(q, q, dtype=torch.bool, device=live.device).tril()
    if module.config._attn_implementation != "sdpa":  # eager and others add a float mask
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~mask, torch.finfo(hidden.dtype).min)
    kwargs["attention_mask"] = mask
    return args, kwargs


def install_mask_hooks(model, layer_ids) -> list:
    """Pre-hooks on the attention modules of ``layer_ids``; idle until a cut sets ``live_mask``."""
    mods = attention_modules(model)
    return [mods[i].register_forward_pre_hook(lambda m, a, k, _i=i: _mask_hook(m, a, k, _i), with_kwargs=True)
            for i in layer_ids]
