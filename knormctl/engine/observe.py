"""Forward pre-hooks that let a press observe each attention layer's input.

kvpress's habit (``presses/snapkv_press.py``, ``utils.get_prerope_query_states``): rather
than asking the model for attention weights (eager attention, slower, another timing path),
a press that needs queries recomputes them from the layer's ``hidden_states`` and applies
RoPE from ``position_embeddings``. The hook hands a ``LayerInput`` to ``press.observe()``;
what the press keeps is its own business (a window of queries or running statistics, never
the whole prompt's hidden states of every layer at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knormctl.engine.timing import model_device
from knormctl.errors import UsageError


def decoder_base(model):
    """The decoder stack (``model.model``, ``model.gpt_neox``, or a multimodal model's language model)."""
    base = getattr(model, "model", None) or getattr(model, "gpt_neox", None) or model
    return getattr(base, "language_model", base)


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    base = decoder_base(model)
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


def head_dim(module) -> int:
    return getattr(module, "head_dim", None) or module.head_size  # GPT-NeoX calls it head_size


SUPPORTED = "supported: Llama-like q_proj, GPT-NeoX, Phi-3"


def check_queries_supported(module, press_name: str) -> None:
    """One clear line, before any forward, when the queries of ``module`` cannot be recomputed."""
    if not any(hasattr(module, a) for a in ("q_proj", "query_key_value", "qkv_proj")):
        raise UsageError(f"press {press_name!r} needs the layer's queries, which knormctl cannot recompute for "
                         f"{type(module).__name__} ({SUPPORTED})")


def check_model_queries(model, press_name: str, *, rebuild=None, rotate=None, who: str = "knormctl") -> None:
    """``check_queries_supported`` on ``model``, then a check that the queries ``who`` rebuilds
    ARE the model's: one 4-token forward that records, in the first layer, what the model hands
    its own ``apply_rotary_pos_emb`` (its queries before the rotation) and what it gets back.
    The rebuilt queries (``rebuild(module, hidden)``, default ``prerope_queries``) must equal the
    first, and their rotation (``rotate(q, cos, sin)``, default ``apply_rope``) the second.

    A model that normalises its queries where the rebuild does not (OLMo-2: over the whole
    projection), rotates pairs another way (Cohere: interleaved), applies its rotation
    elsewhere, or has no decoder layers where knormctl looks (GPT-2, OPT, Bloom, Falcon) is
    refused in one line: a query-aware press would otherwise keep entries chosen by the wrong
    queries. Once per model and ``who`` (kvpress rebuilds its own way: ``kvpress_backend``)."""
    import sys

    checked = getattr(model, "_knormctl_queries_checked", set())
    if who in checked:
        return
    try:
        module = attention_modules(model)[0]
    except ValueError as exc:
        raise UsageError(f"press {press_name!r} needs the layers' queries: {exc} ({SUPPORTED})") from None

    def refuse(why: str) -> UsageError:
        return UsageError(f"press {press_name!r} needs the layer's queries, which {who} cannot recompute for "
                          f"{type(module).__name__}: {why}" + (f" ({SUPPORTED})" if who == "knormctl" else ""))

    check_queries_supported(module, press_name)
    modeling = sys.modules.get(type(module).__module__)
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is None:
        raise refuse("its modeling code has no apply_rotary_pos_emb to check the rebuilt queries against")
    seen = {}

    def grab(_module, args, kwargs):
        seen.setdefault("h", kwargs.get("hidden_states", args[0] if args else None))
        seen.setdefault("pe", kwargs.get("position_embeddings"))

    def spy(q, k, *args, **kwargs):
        out = rope(q, k, *args, **kwargs)
        seen.setdefault("q_in", q)
        seen.setdefault("q_out", out[0])
        return out

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    modeling.apply_rotary_pos_emb = spy  # looked up at call time by the model's attention
    try:
        device = model_device(model)
        ids = torch.arange(1, 5, device=device).unsqueeze(0)
        with torch.inference_mode():
            model(input_ids=ids, position_ids=torch.arange(4, device=device).unsqueeze(0), use_cache=False)
    except Exception as exc:  # a forward the probe cannot run: refused, not a crash
        raise refuse(f"a 4-token forward to check them failed ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        modeling.apply_rotary_pos_emb = rope
        handle.remove()
    with torch.inference_mode():  # the captured tensors are inference tensors
        why = _queries_mismatch(module, seen, rebuild or prerope_queries, rotate or apply_rope, who)
    if why is not None:
        raise refuse(why)
    model._knormctl_queries_checked = checked | {who}


def _beyond_rounding(mine: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> float | None:
    """The largest difference when it is beyond ``dtype``'s rounding, else None."""
    diff = float((mine - theirs).abs().max())
    tol = max(1e-4, 8 * torch.finfo(dtype).eps) * max(1.0, float(theirs.abs().max()))
    return diff if diff > tol else None


def _queries_mismatch(module, seen: dict, rebuild, rotate, who: str) -> str | None:
    """Why the rebuilt queries differ from the model's (None: they agree). ``seen``: the first
    layer's input (``h``, ``pe``) and the queries the model rotated (``q_in``, ``q_out``; a
    partial-rotary model may hand over only the rotated dims)."""
    hidden, pe = seen.get("h"), seen.get("pe")
    if hidden is None or pe is None:
        return "its attention gets no position_embeddings (no RoPE to apply)"
    if "q_in" not in seen:
        return "its attention does not rotate its queries with apply_rotary_pos_emb"
    try:
        q = rebuild(module, hidden)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):  # e.g. a q-norm over all heads
        return f"its query projection or q-norm has a layout {who} does not rebuild (e.g. a q-norm over all heads)"
    dtype = seen["q_in"].dtype
    q, q_in, q_out = q.float(), seen["q_in"].float(), seen["q_out"].float()
    if q_in.ndim == 4 and q_in.shape[1] != q.shape[1] and q_in.shape[2] == q.shape[1]:
        q_in, q_out = q_in.transpose(1, 2), q_out.transpose(1, 2)  # a (b, n, heads, d) layout
    r_in, r_out = q_in.shape[-1], q_out.shape[-1]
    if q_in.shape != q[..., :r_in].shape:
        return f"its queries have another layout ({tuple(q_in.shape)}; {who} rebuilds {tuple(q.shape)})"
    diff = _beyond_rounding(q[..., :r_in], q_in, dtype)
    if diff is not None:
        return (f"its queries before the rotation are not the projection {who} rebuilds (a norm or clip on "
                f"them; max difference {diff:.3g})")
    cos, sin = (t.float() for t in pe)
    try:
        mine = rotate(q, cos, sin)
    except RuntimeError:
        return (f"its rotation covers {cos.shape[-1]} of the {q.shape[-1]} query dimensions, which {who}'s "
                "rotation does not fit")
    diff = _beyond_rounding(mine[..., :r_out], q_out, dtype)
    if diff is not None:
        return f"its rotary embedding rotates the query dimensions another way (max difference {diff:.3g})"
    return None


def prerope_queries(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(b, n, hidden) -> the layer's queries before RoPE, (b, heads, n, head_dim): the projection,
    OLMo's clamp and a per-head q-norm where the model has them (kvpress's
    ``get_prerope_query_states``, and what ``check_model_queries`` checks against the model)."""
    b, n, _ = hidden_states.shape
    d = head_dim(module)
    heads = module.config.num_attention_heads
    if hasattr(module, "q_proj"):  # Llama, Mistral, Qwen2/3, SmolLM, ...
        q = module.q_proj(hidden_states).view(b, n, heads, d)
    elif hasattr(module, "query_key_value"):  # GPT-NeoX: per head [q | k | v]
        q = module.query_key_value(hidden_states).view(b, n, heads, 3 * d)[..., :d]
    elif hasattr(module, "qkv_proj"):  # Phi-3: [all q | all k | all v]
        q = module.qkv_proj(hidden_states)[..., : heads * d].view(b, n, heads, d)
    else:
        raise UsageError(f"cannot recompute the queries of {type(module).__name__}")
    clip = getattr(module.config, "clip_qkv", None)  # OLMo: the projection clamped
    if clip is not None:
        q = q.clamp(min=-clip, max=clip)
    q = q.transpose(1, 2)
    q_norm = getattr(module, "q_norm", None)  # Qwen3, Gemma3: per head, before RoPE
    if q_norm is None and getattr(module, "qk_layernorm", False):  # StableLM, Phi: the same, another name
        q_norm = module.q_layernorm
    return q_norm(q) if q_norm is not None else q


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (b, h, n, d) with (b, n, r) cos/sin; r < d is partial rotary (GPT-NeoX: the first r dims)."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    rot = q[..., :r] * cos + rotate_half(q[..., :r]) * sin
    return rot if r == q.shape[-1] else torch.cat((rot, q[..., r:]), dim=-1)


@dataclass
class LayerInput:
    """What one attention layer receives in one forward, as a press's observe() sees it."""

    layer_idx: int
    module: torch.nn.Module
    hidden_states: torch.Tensor  # (b, n, hidden): this forward's input to the attention
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin), each (b, n, rotary dims)
    start: int  # absolute position of hidden_states[:, 0] (tokens this layer saw before)
    rotary_emb: torch.nn.Module | None  # the model's rotary embedding: cos/sin of any position

    @property
    def num_heads(self) -> int:
        return self.module.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        cfg = self.module.config
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        return head_dim(self.module)

    @property
    def scaling(self) -> float:
        """The softmax scale of this layer's attention: the module's own where it has one
        (Granite's attention_multiplier, Gemma's query_pre_attn_scalar), else 1/sqrt(head_dim)."""
        return float(getattr(self.module, "scaling", None) or self.head_dim ** -0.5)

    @property
    def rotates(self) -> bool:
        """Whether this layer rotates its queries and keys: SmolLM3 and Llama 4 leave RoPE out
        of some layers ("NoPE", ``use_rope`` False), whose queries must not be rotated."""
        return bool(getattr(self.module, "use_rope", True))

    def queries(self, last: int | None = None, rope: bool = True) -> torch.Tensor:
        """The queries of the last ``last`` tokens of this forward (all when None), (b, heads, n, d),
        recomputed from the hidden states; with ``rope`` rotated as the attention rotates them
        (not at all in a layer without RoPE)."""
        h = self.hidden_states if last is None else self.hidden_states[:, -last:]
        q = prerope_queries(self.module, h)
        if not rope or not self.rotates:
            return q
        if self.position_embeddings is None:
            raise UsageError(f"{type(self.module).__name__} gets no position_embeddings: cannot apply RoPE")
        cos, sin = self.position_embeddings
        n = h.shape[1]
        return apply_rope(q, cos[:, -n:], sin[:, -n:])


def install_observers(model, press, layer_ids) -> list:
    """Register a forward pre-hook on the attention modules of ``layer_ids``; returns the handles.
    Each hook counts the tokens its layer has seen, so ``LayerInput.start`` is the absolute
    position of the forward's first token (every forward of a generation is observed)."""
    mods = attention_modules(model)
    if layer_ids:
        check_queries_supported(mods[layer_ids[0]], press.name)
    rotary = getattr(decoder_base(model), "rotary_emb", None)
    seen = dict.fromkeys(layer_ids, 0)
    handles = []
    for i in layer_ids:
        def hook(module, args, kwargs, _i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            press.observe(LayerInput(_i, module, hidden, kwargs.get("position_embeddings"), seen[_i], rotary))
            seen[_i] += hidden.shape[1]

        handles.append(mods[i].register_forward_pre_hook(hook, with_kwargs=True))
    return handles
