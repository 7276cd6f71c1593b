"""NVIDIA's kvpress as an optional backend: ``--presses kvpress:SnapKVPress(window_size=64)``.

Any kvpress press that compresses in kvpress's forward hook runs inside knormctl's loop,
timing and store, in prefill mode: knormctl registers the press's own ``forward_hook`` on
the attention modules it may cut (as kvpress's ``BasePress.__call__`` does, minus the
``--skip-layers``), so the kept sets are kvpress's own -- its scores, its
``int(n * (1 - ratio))`` count, its tie-breaking. ``compression_ratio`` is ``1 - keep_ratio``.

What differs from knormctl's own presses, by construction:
- the cut happens INSIDE the prefill forward, layer by layer (kvpress's design): its time is
  in TTFT as well as in ``compress_time_s`` (measured around each hook);
- kvpress's head-wise presses (AdaKV, CriticalAdaKV) keep every entry and mask the evicted
  ones: nothing is freed, and the stored bytes say so;
- importing kvpress wraps transformers' attention functions for the whole process (its
  ``attention_patch.py``), also for the other configurations of the same sweep.

Presses that replace kvpress's context manager (``__call__``: KVzip, DecodingPress, Finch,
...) need more than hooks and are refused at validation, with the reason.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import time
from importlib import metadata

from knormctl.engine.presses.base import BasePress
from knormctl.errors import ModeError, UsageError

PREFIX = "kvpress:"
INSTALL_HINT = "pip install 'knormctl[kvpress]'"


def load_kvpress():
    """The kvpress module, or one clear line: not installed, or this transformers is not one it supports."""
    try:
        dist = metadata.distribution("kvpress")
    except metadata.PackageNotFoundError:
        raise UsageError(f"kvpress presses need NVIDIA's kvpress, which is not installed ({INSTALL_HINT})") from None
    from packaging.requirements import Requirement
    from packaging.version import Version

    have = metadata.version("transformers")
    for line in dist.requires or []:
        req = Requirement(line)
        if req.name == "transformers" and req.marker is None and not req.specifier.contains(Version(have),
                                                                                         prereleases=True):
            raise UsageError(f"kvpress {dist.version} supports transformers{req.specifier}, this environment has "
                             f"{have} (install a supported transformers next to kvpress, e.g. in a separate venv)")
    try:
        return importlib.import_module("kvpress")
    except Exception as exc:  # a broken install: say so in one line
        raise UsageError(f"kvpress {dist.version} is installed but does not import: {type(exc).__name__}: {exc}") \
            from None


def _press_class(kvpress, name: str):
    cls = getattr(kvpress, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, kvpress.BasePress)) or cls in (kvpress.BasePress,
                                                                                     kvpress.ScorerPress):
        known = sorted(n for n in dir(kvpress) if n.endswith("Press") and n not in ("BasePress", "ScorerPress"))
        raise UsageError(f"kvpress has no press {name!r} (it has: {', '.join(known)})")
    if cls.__call__ is not kvpress.BasePress.__call__:
        raise UsageError(f"kvpress:{name} sets itself up around the forward (its own __call__), which knormctl "
                         "cannot run inside its loop; presses that compress in kvpress's forward hook work")
    return cls


def _build(kvpress, name: str, params: dict, *, resolve: bool):
    """Build kvpress.<name>(**params) (nested presses given as specs); with ``resolve`` return the
    canonical parameters instead (declaration order, defaults dropped)."""
    from knormctl.press_spec import format_press_spec, parse_press_spec

    cls = _press_class(kvpress, name)
    declared = {p.name: p for p in inspect.signature(cls).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for key in params:
        if key == "compression_ratio":
            raise UsageError(f"kvpress:{name}: compression_ratio is set from --keep-ratios (1 - keep_ratio)")
        if key not in declared:
            raise UsageError(f"kvpress:{name} has no parameter {key!r} (it takes: "
                             f"{', '.join(k for k in declared if k != 'compression_ratio') or 'none'})")
    kwargs, canonical = {}, []
    for key, p in declared.items():
        if key not in params:
            if p.default is p.empty:
                raise UsageError(f"kvpress:{name} needs {key}=... (e.g. {key}=SnapKVPress)")
            continue
        value = params[key]
        if isinstance(value, str) and isinstance(getattr(kvpress, parse_press_spec(value)[0], None), type):
            inner, inner_params = parse_press_spec(value)  # a nested kvpress press
            built = _build(kvpress, inner, dict(inner_params), resolve=resolve)
            value = format_press_spec(inner, built) if resolve else built
        elif isinstance(p.default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
        if p.default is p.empty or value != p.default:
            canonical.append((key, value))
    if resolve:
        _build(kvpress, name, params, resolve=False)  # the constructor's own checks
        return tuple(canonical)
    try:
        return cls(**kwargs)
    except (AssertionError, TypeError, ValueError) as exc:
        raise UsageError(f"kvpress:{name}: {exc or type(exc).__name__}") from None


def resolve_kvpress(name: str, params, mode: str | None) -> tuple:
    """Validate a ``kvpress:Name`` spec without a model; return its canonical parameters."""
    cls_name = name[len(PREFIX):]
    kvpress = load_kvpress()  # installed, and the class exists, before the mode's hint: it is no use without
    canonical = _build(kvpress, cls_name, dict(params), resolve=True)
    if mode is not None and mode != "prefill":
        raise ModeError(name, ("prefill",), mode)  # kvpress's hooks cut in the prefill forward only
    press = _build(kvpress, cls_name, dict(params), resolve=False)
    try:
        press.compression_ratio = 0.5
    except (AttributeError, AssertionError) as exc:
        raise UsageError(f"kvpress:{cls_name} does not take a compression_ratio ({exc}): knormctl sets it from "
                         "--keep-ratios") from None
    return canonical


def make_kvpress(name: str, params: dict, keep_ratio: float = 1.0) -> KvpressPress:
    kvpress = load_kvpress()
    press = _build(kvpress, name[len(PREFIX):], params, resolve=False)
    return KvpressPress(name, press, keep_ratio)


class _Detach:
    """Undo what attach() set on a module (kvpress gives each attention module the rotary embedding)."""

    def __init__(self, module):
        self.module = module

    def remove(self) -> None:
        if "rotary_emb" in getattr(self.module, "_modules", {}):
            del self.module.rotary_emb


class KvpressPress(BasePress):
    """Runs a kvpress press's own forward hook during knormctl's prefill forward."""

    name = "kvpress"
    description = "any kvpress press (kvpress:ClassName(...)), its own hook and kept sets; prefill mode"
    modes = ("prefill",)
    cuts_in_forward = True
    stackable = False

    def __init__(self, spec: str, press, keep_ratio: float):
        self.spec, self.press = spec, press
        if keep_ratio < 1.0:
            press.compression_ratio = 1.0 - keep_ratio
        self._cut = False

    def attach(self, model, layer_ids, compressor) -> list:
        from knormctl.engine.observe import attention_modules, decoder_base

        self.press.post_init_from_model(model)
        mods = attention_modules(model)
        rotary = getattr(decoder_base(model), "rotary_emb", None)
        handles = []
        for i in layer_ids:
            if rotary is not None and not hasattr(mods[i], "rotary_emb"):
                mods[i].rotary_emb = rotary  # what kvpress's __call__ does (ExpectedAttention needs it)
                handles.append(_Detach(mods[i]))
            handles.append(mods[i].register_forward_hook(self._hook(compressor), with_kwargs=True))
        return handles

    def _hook(self, comp):
        def hook(module, args, kwargs, output):
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            layer = cache.layers[module.layer_idx]
            length = layer.keys.shape[-2]
            if length <= comp.cfg.prune_after:
                return output
            comp._sync()
            t0 = time.perf_counter()
            try:
                output = self.press.forward_hook(module, args, kwargs, output)
            except AssertionError as exc:  # kvpress checks its inputs with assert: a failed cell, one line
                raise ValueError(f"{self.spec}: {exc}") from None
            comp._sync()
            comp.seconds += time.perf_counter() - t0
            self._cut |= (layer.keys.shape[-2] < length
                          or getattr(module, "masked_key_indices", None) is not None)
            return output

        return hook

    def take_cut(self) -> bool:
        cut, self._cut = self._cut, False
        return cut

    @property
    def reads_queries(self) -> bool:
        """Whether this press (or a press it wraps) rebuilds the layers' queries, kvpress's way."""
        return _reads_queries(self.press)

    def check_queries(self, model) -> None:
        """One line, before any run, where kvpress's rebuilt queries are not the model's (kvpress
        rotates whole heads and knows q-norms of Qwen3 and Gemma3 only): on Cohere, OLMo-2,
        partial-rotary models (Phi-3 partial, StableLM, Phi-2) its presses would run with the
        wrong queries, or fail in every cell."""
        from knormctl.engine.observe import check_model_queries, rotate_half

        clip = getattr(getattr(model, "config", None), "clip_qkv", None)
        if clip is not None:  # the 4-token probe may not reach the clamp: said from the config
            raise UsageError(f"press {self.spec!r} needs the layer's queries, which kvpress cannot recompute for "
                             f"{type(model).__name__}: the model clamps them (clip_qkv={clip:g}), kvpress does not")
        utils = importlib.import_module("kvpress.utils")

        def rotate(q, cos, sin):  # snapkv_press.py's rotation, whole heads
            return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)

        check_model_queries(model, self.spec, rebuild=utils.get_prerope_query_states, rotate=rotate, who="kvpress")


# kvpress's ways to the queries (kvpress 0.5.5): the rebuild, and SnapKV's window attention on it.
_QUERY_MARKERS = ("get_prerope_query_states", "compute_window_attention")


def _reads_queries(press, seen: set | None = None) -> bool:
    """Whether ``press`` or a press it holds (AdaKVPress(press=...), ...) rebuilds queries; read
    from the source of its kvpress classes. Unreadable source counts as reading them."""
    kvpress = importlib.import_module("kvpress")
    seen = set() if seen is None else seen
    if id(press) in seen:
        return False
    seen.add(id(press))
    if any(_class_reads_queries(cls) for cls in type(press).__mro__
           if cls.__module__.startswith("kvpress.") and cls not in (kvpress.BasePress, kvpress.ScorerPress)):
        return True
    return any(_reads_queries(v, seen) for v in vars(press).values() if isinstance(v, kvpress.BasePress))


@functools.cache
def _class_reads_queries(cls) -> bool:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return True
    return any(marker in source for marker in _QUERY_MARKERS)


def kvpress_catalog() -> list[dict]:
    """kvpress's presses that run inside knormctl (``kvpress:Name``), with their parameters."""
    kvpress = load_kvpress()
    rows = []
    for name in sorted(dir(kvpress)):
        try:
            cls = _press_class(kvpress, name)
        except UsageError:
            continue
        params = {p.name: (p.default if p.default is not p.empty else "(required)")
                  for p in inspect.signature(cls).parameters.values()
                  if p.name != "compression_ratio" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        doc = (inspect.getdoc(cls) or "").strip().splitlines()
        rows.append({"name": PREFIX + name, "description": doc[0] if doc else "", "modes": ["prefill"],
                     "params": params, "run_wide": []})
    return rows
