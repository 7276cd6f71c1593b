"""Forward pre-hooks that let a press observe each attention layer's input.

kvpress's habit (``presses/snapkv_press.py``): rather than asking the model for
attention weights (eager attention, slower, another timing path), a press that needs
queries recomputes them from the layer's ``hidden_states`` and ``position_embeddings``.
The hook hands those to ``press.observe()``; what the press keeps is its own business
(typically a small window or running statistics, never the whole prompt per layer).
"""

from __future__ import annotations

import torch


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    base = getattr(model, "model", None) or getattr(model, "gpt_neox", None) or model
    base = getattr(base, "language_model", base)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    mods = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
        if attn is None:
            raise ValueError(f"cannot find the attention module of {type(layer).__name__}")
        mods.append(attn)
    return mods


def install_observers(model, press, layer_ids) -> list:
    """Register a forward pre-hook on the attention modules of ``layer_ids``; returns the handles."""
    mods = attention_modules(model)
    handles = []
    for i in layer_ids:
        def hook(module, args, kwargs, _i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            press.observe(_i, module, hidden, kwargs.get("position_embeddings"))

        handles.append(mods[i].register_forward_pre_hook(hook, with_kwargs=True))
    return handles
