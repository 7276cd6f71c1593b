"""A multi-token forward into a cache whose layers hold different numbers of entries (a layer
skipped by ``--skip-layers`` keeps everything after a cut, the others are shorter).

transformers builds one attention mask per forward, for one cache length; on the other layers
it would be the wrong size. Each attention module gets its own causal mask instead, handed to
it by a forward pre-hook (as the static decode step and per-head masks hand theirs): row ``j``
of the ``q`` new tokens sees the layer's ``past`` entries and new tokens ``0..j``. Where that
cannot be done (an attention implementation other than sdpa, or per-head masks
already set by a press) the tokens go one at a time, which needs no mask. A chunked prefill
with skipped layers fed that way ran token by token: 7-26x the TTFT of chunks (an audit).
"""

from __future__ import annotations

import torch

# sdpa takes an explicit boolean 4D mask. (eager would take an additive one, but a model on
# eager attention cannot decode layers of different lengths at all: kvcache.probe_uneven_layers
# refuses it before a run.)
MASKED_IMPLEMENTATIONS = ("sdpa",)


def layer_mask_hooks(model, cache, q: int) -> list | None:
    """Pre-hooks handing every attention module a causal mask over its own layer's entries and
    the ``q`` tokens of the next forward; None where they cannot (then feed one at a time)."""
    from knormctl.engine.observe import attention_modules

    try:
        mods = attention_modules(model)
    except ValueError:
        return None
    if len(mods) != len(cache.layers) or any(getattr(layer, "live_mask", None) is not None for layer in cache.layers):
        return None
    if any(m.config._attn_implementation not in MASKED_IMPLEMENTATIONS for m in mods):
        return None

    def hook(module, args, kwargs, i):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        layer = cache.layers[i]
        past = 0 if layer.keys is None else layer.keys.shape[-2]  # before this forward appends
        sees = torch.ones(q, past + q, dtype=torch.bool, device=hidden.device).tril(diagonal=past)
        kwargs["attention_mask"] = sees.view(1, 1, q, past + q).expand(hidden.shape[0], 1, q, past + q)
        return args, kwargs

    return [m.register_forward_pre_hook(lambda mod, a, kw, _i=i: hook(mod, a, kw, _i), with_kwargs=True)
            for i, m in enumerate(mods)]
