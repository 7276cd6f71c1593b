"""The KV cache as transformers holds it: how to hand it to the model, what the cut can
handle, and a ledger that checks after every forward that the cache holds what it should.

Why a ledger: transformers renamed the forward's ``past_key_values`` to ``cache`` (5.24
accepts both, with a deprecation warning until 5.40); a version that does not know the
name we pass swallows it into ``**kwargs`` and runs WITHOUT a cache -- garbage tokens,
fast timings, no error. Comparing tensor shapes after each forward costs microseconds
(no device sync) and turns any such mismatch into one clear error.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from knormctl.engine.timing import model_device
from knormctl.errors import KnormctlError, UsageError

TESTED_TRANSFORMERS = "5.2.0, 5.17.0 and 5.24.0"  # what CI runs (scripts/test.sh); pyproject allows >=5.2,<6


class CacheMismatchError(KnormctlError):
    """The model did not fill the cache knormctl passed (a transformers version it does not
    handle): a runtime failure of the whole run, never one failed cell among good ones."""

    exit_code = 1


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def cache_kwarg(model) -> str:
    """The name under which this model's forward reads the cache: ``cache`` (transformers
    >= 5.24) or ``past_key_values`` (older 5.x). Decided from the forward's signature, so
    the deprecated spelling is never used where the new one exists."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise CacheMismatchError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values` "
                             f"(transformers {_transformers_version()}): knormctl cannot pass it a KV cache")


def cache_kwargs(model, cache) -> dict:
    """Keyword arguments that make ``model(...)`` read and fill ``cache``."""
    return {cache_kwarg(model): cache, "use_cache": True}


def new_cache(model, capacity: int = 0, buffered: bool = True, holds: list | None = None) -> DynamicCache:
    """An empty cache laid out for this model (sliding-window layers where its config says so).

    ``buffered`` (the engine's path): every plain full-attention layer is a ``BufferLayer``
    (engine/kvbuffer.py: in-place append into a buffer of ``capacity`` entries, the tokens the
    caller will feed; in-place compaction after a cut). ``buffered=False``: transformers' own
    ``DynamicCache``, appending with ``torch.cat`` -- the reference path the tests compare to.
    Other layer kinds (sliding windows) stay transformers' own either way. ``holds``: per layer,
    the most entries it holds at once (None: every token fed), for a chunked prefill that cuts.
    """
    cache = DynamicCache(config=model.config)
    if buffered:
        from knormctl.engine.kvbuffer import BufferLayer

        holds = holds or [None] * len(cache.layers)
        cache.layers = [BufferLayer(capacity, h) if type(layer) is DynamicLayer else layer
                        for layer, h in zip(cache.layers, holds)]
    return cache


# ----------------------------------------------------------------------------- families

def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def num_layers(model) -> int:
    """Decoder layers (of the text model, for configs that nest one)."""
    return int(_text_config(model).num_hidden_layers)


def cut_refusal(model) -> str | None:
    """Why the cut cannot be exact for this model, in one clause; None when it can.

    The cut reassigns each layer's key/value tensors and relies on the model to build its
    mask from the cache length and its positions from ``position_ids``. That holds for
    plain full-attention layers (``DynamicLayer``). It does not hold for sliding-window or
    chunked layers (the cache layer drops old entries itself and counts positions in its
    own ``cumulative_length``; the window mask counts cache slots, which a cut reorders),
    nor where layers share one KV cache (one cut would act on several layers), nor for
    recurrent/convolution states.
    """
    cfg = _text_config(model)
    family = str(getattr(model.config, "model_type", type(model).__name__))
    n_layers = num_layers(model)
    alibi = getattr(cfg, "alibi", False) or family == "bloom" or (getattr(cfg, "attn_config", None) or {}).get("alibi")
    if alibi:
        return (f"{family}: ALiBi position biases are built from the cache's length, which a cut shortens, so "
                "every later token would be placed at a wrong distance -- not supported")
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{family}: encoder-decoder models are not supported (the cut handles decoder-only caches)"
    shared = getattr(cfg, "num_kv_shared_layers", 0) or 0
    if shared or any(m == "reuse" for m in (getattr(cfg, "kv_sharing_modes", None) or ())):
        return (f"{family}: layers share one KV cache, so a cut of one layer would silently cut the others; "
                "KV-sharing models are not supported")
    layers = new_cache(model, buffered=False).layers
    if len(layers) != n_layers:
        return (f"{family}: its cache has {len(layers)} layers for {n_layers} decoder layers "
                "(shared or missing KV layers); the cut needs one plain KV layer per decoder layer")
    sliding = [i for i, layer in enumerate(layers) if getattr(layer, "is_sliding", False)]
    if sliding:
        window = getattr(layers[sliding[0]], "sliding_window", None)
        which = "every layer" if len(sliding) == n_layers else f"layers {_ranges(sliding)} of {n_layers}"
        return (f"{family}: sliding-window attention (window {window}) in {which}; those cache layers evict on "
                "their own and their mask counts cache slots, so a cut would shift the window -- not supported")
    other = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if other:
        return f"{family}: cache layers of type {', '.join(other)}; the cut handles plain full-attention layers only"
    return None


def check_cut_supported(model) -> None:
    """Raise UsageError (one line naming the family and why) where the cut cannot be exact."""
    why = cut_refusal(model)
    if why is not None:
        raise UsageError(f"cannot compress the KV cache of this model: {why}")


def probe_uneven_layers(model, skip_layers) -> None:
    """``--skip-layers`` leaves the skipped layers whole while a cut shortens the others; a model
    that builds one mask from the first layer's length for all of them (Falcon) fails on every
    step after the cut. One decode step over such a cache (8 tokens, the others cut to 4) finds
    it before a run writes anything: one line, with the way out."""
    if not skip_layers:
        return
    device = model_device(model)
    cache = new_cache(model, buffered=False)
    kw = cache_kwargs(model, cache)
    ids = torch.zeros(1, 9, dtype=torch.long, device=device)
    pos = torch.arange(9, device=device).unsqueeze(0)
    with torch.inference_mode():
        model(input_ids=ids[:, :8], position_ids=pos[:, :8], **kw)
        for i, layer in enumerate(cache.layers):
            if i not in skip_layers:
                layer.keys, layer.values = layer.keys[..., 4:, :], layer.values[..., 4:, :]
        try:
            model(input_ids=ids[:, 8:], position_ids=pos[:, 8:], **kw)
        except (RuntimeError, ValueError, IndexError) as exc:
            family = getattr(model.config, "model_type", type(model).__name__)
            skipped = ",".join(map(str, sorted(skip_layers)))
            raise UsageError(f"--skip-layers {skipped}: {family} cannot attend over layers cut to different "
                             f"lengths (a decode step over such a cache raised {type(exc).__name__}); use "
                             "--skip-layers none") from None


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (short enough for one line)."""
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


# ----------------------------------------------------------------------------- the ledger

def _held(layer) -> int:
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.dim() < 2 else int(keys.shape[-2])


class CacheLedger:
    """Knows how many entries each cache layer must hold; ``grew(n)`` after every forward
    checks it (shapes only: no device sync), ``rebase()`` after a cut takes the cut lengths.

    Sliding-window layers (baseline runs only: the cut refuses them) hold at most
    ``sliding_window - 1`` entries, as transformers' ``DynamicSlidingWindowLayer`` does.
    """

    def __init__(self, model, cache):
        self.model_name = type(model).__name__
        self.kwarg = cache_kwarg(model)
        self.cache = cache
        self.seen = [0] * len(cache.layers)  # tokens each layer was fed (positions)
        self.held = [0] * len(cache.layers)  # entries each layer holds

    def grew(self, n_new: int, may_shrink: bool = False) -> None:
        """``may_shrink``: a press cut inside this forward (the kvpress backend), so a layer may
        hold fewer entries than it was fed -- but never more, and never none."""
        layers = self.cache.layers
        for i, layer in enumerate(layers):
            self.seen[i] += n_new
            expected = self.held[i] + n_new
            window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
            if window is not None:
                expected = min(expected, window - 1)
            actual = _held(layer)
            if actual != expected and not (may_shrink and 0 < actual < expected):
                raise CacheMismatchError(
                    f"after a forward of {n_new} token(s) layer {i} of the KV cache holds {actual} entries where "
                    f"{expected} were expected: {self.model_name} in transformers {_transformers_version()} did not "
                    f"use the cache passed as `{self.kwarg}=` (knormctl is tested with transformers "
                    f"{TESTED_TRANSFORMERS})")
            self.held[i] = actual

    def rebase(self) -> None:
        """After a cut: the lengths the cut left are the new baseline."""
        self.held = [_held(layer) for layer in self.cache.layers]


def probe_cache(model) -> None:
    """Three tokens of prefill and one decode step through the engine's own forward: raises
    CacheMismatchError at once (before a run writes anything) where the cache is not used."""
    device = model_device(model)
    cache = new_cache(model)
    ledger = CacheLedger(model, cache)
    kw = cache_kwargs(model, cache)
    ids = torch.zeros(1, 4, dtype=torch.long, device=device)
    pos = torch.arange(4, device=device).unsqueeze(0)
    with torch.inference_mode():
        model(input_ids=ids[:, :3], position_ids=pos[:, :3], **kw)
        ledger.grew(3)
        model(input_ids=ids[:, 3:], position_ids=pos[:, 3:], **kw)
        ledger.grew(1)
