"""The press interface and its registry. A press SCORES cache entries; it never cuts.

``score(keys, values, layer_idx) -> (batch, kv_heads, seq)``: HIGHER = KEEP. The cut
(``engine/compress.py``) keeps the best-scored entries per head, in their original order.

What a press may ask for, each only when it needs it (the others stay one-liners):

- ``observes = True``: ``observe(layer)`` is called from a forward pre-hook on every
  attention module it may cut (``engine/observe.py``), with a ``LayerInput``: layer index,
  the attention module, this forward's hidden states and position embeddings, and helpers
  that recompute the layer's queries (kvpress's habit: the attention stays SDPA). What the
  press keeps is its own business -- a window of queries, running statistics -- never the
  whole prompt's hidden states of every layer.
- ``layer_keep()``: a per-layer budget (PyramidKV) instead of the uniform one.
- ``head_keep()``: per-head budgets within a layer (AdaKV). The cut then holds every head at
  the largest per-head count and masks the surplus out of attention (``engine/headmask.py``);
  the bytes reported are the bytes held, not the nominal ratio.

Parameters are the constructor's keyword arguments, each with a default (the paper's);
``press_params`` names those that take another press (given as a spec such as
``snapkv(window_size=32)``). ``make_press`` builds every press the same way.

Adding a policy = one class with ``@register`` + one test-matrix entry.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from knormctl.errors import ModeError, UsageError

MODES = ("prefill", "decode")


class BasePress:
    """Scores cache entries; higher scores are kept."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""  # one line, for `knormctl presses`
    modes: tuple[str, ...] = MODES  # compression modes it supports (an instance may narrow it)
    observes: bool = False  # wants observe() from each attention layer's forward
    # Its scores of several layers can be computed at once on a stacked (L, b, h, s, d) tensor:
    # the cut may then batch layers (fewer kernel launches on GPUs).
    stackable: bool = True
    press_params: ClassVar[tuple[str, ...]] = ()  # constructor parameters that take a press spec
    # Cuts the cache itself inside the prefill forward (the kvpress backend): the compressor then
    # calls attach(model, layer_ids, compressor) -> hook handles, and take_cut() -> bool after it.
    cuts_in_forward: ClassVar[bool] = False

    def observe(self, layer) -> None:
        """Called before attention layer ``layer.layer_idx`` runs (only when ``observes``);
        ``layer`` is an ``engine.observe.LayerInput``."""

    def score(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int | None = None) -> torch.Tensor:
        """(..., b, h, s, d) keys/values -> (..., b, h, s) scores, higher = keep."""
        raise NotImplementedError

    def layer_keep(self, n_keep: int, length: int, layer_idx: int, num_layers: int, keep_ratio: float) -> int:
        """Entries to keep in ``layer_idx`` when the uniform rule says ``n_keep`` of ``length``
        (``keep_ratio`` as asked). PyramidKV-style per-layer budgets override this."""
        return n_keep

    def head_keep(self, scores: torch.Tensor, n_keep: int) -> torch.Tensor | None:
        """Per-head kept sets: a bool (b, h, s) mask keeping ``n_keep`` entries per head ON
        AVERAGE (b x h x n_keep in all), or None for exactly ``n_keep`` in every head."""
        return None

    @property
    def per_head(self) -> bool:
        """The press sets per-head budgets (overrides ``head_keep``): engine/headmask.py."""
        return type(self).head_keep is not BasePress.head_keep

    def reset(self) -> None:
        """Drop what observe() kept (after a prefill cut, or between generations)."""


# ----------------------------------------------------------------------------- registry

PRESSES: dict[str, type[BasePress] | None] = {"none": None}


def register(cls: type[BasePress]) -> type[BasePress]:
    """Class decorator: add a press to the registry under ``cls.name``."""
    if cls.name in PRESSES:
        raise ValueError(f"press {cls.name!r} registered twice")
    PRESSES[cls.name] = cls
    return cls


def press_names() -> tuple[str, ...]:
    return tuple(PRESSES)


@dataclass(frozen=True)
class Param:
    """One constructor parameter of a press, as `knormctl presses` lists it."""

    name: str
    default: Any
    is_press: bool = False

    @property
    def kind(self) -> type:
        return str if self.is_press else type(self.default)


# Run-wide settings handed to every press whose constructor takes them (not press parameters).
RUN_WIDE = ("seed", "n_sink", "keep_ratio")


def press_parameters(cls: type[BasePress]) -> list[Param]:
    """The press's own parameters (constructor keywords with defaults), in declaration order."""
    params = []
    for p in inspect.signature(cls).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TypeError(f"press {cls.name!r}: parameter {p.name!r} needs a default (the paper's)")
        params.append(Param(p.name, p.default, p.name in cls.press_params))
    return params


def _coerce(press: str, param: Param, value):
    """A value parsed from a spec, as the parameter's type; UsageError when it does not fit."""
    kind = param.kind
    if param.is_press:
        if not isinstance(value, str):
            raise UsageError(f"press {press!r}: {param.name} takes a press (e.g. {param.default}), got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(value, kind):
        return value
    raise UsageError(f"press {press!r}: {param.name} must be {kind.__name__} (default {param.default!r}), got {value!r}")


def resolve_press(name: str, params=(), mode: str | None = None) -> tuple[tuple[str, Any], ...]:
    """Validate a press spec and return its parameters normalised: typed, in declaration order,
    defaults dropped (``snapkv(window_size=64)`` is ``snapkv``). Nested press specs are resolved
    too. With ``mode``, a press that does not support it is refused. Raises UsageError."""
    if name.startswith("kvpress:"):
        from knormctl.engine.presses.kvpress_backend import resolve_kvpress

        return resolve_kvpress(name, params, mode)
    if name not in PRESSES:
        raise UsageError(f"unknown press {name!r} (choose from {', '.join(n for n in PRESSES if n != 'none')}, "
                         "or kvpress:ClassName)")
    cls = PRESSES[name]
    params = dict(params)
    if cls is None:
        if params:
            raise UsageError("the full-cache reference 'none' takes no parameters")
        return ()
    declared = {p.name: p for p in press_parameters(cls)}
    out = []
    for key in params:
        if key in RUN_WIDE:
            flag = "--keep-ratios" if key == "keep_ratio" else f"--{key.replace('_', '-')}"
            raise UsageError(f"press {name!r}: {key} is set for every press by {flag}")
        if key not in declared:
            raise UsageError(f"press {name!r} has no parameter {key!r} "
                             f"(it takes: {', '.join(declared) or 'none'})")
    for key, param in declared.items():
        if key not in params or key in RUN_WIDE:
            continue
        value = _coerce(name, param, params[key])
        if param.is_press:
            value = canonical_spec(value)
        if value != param.default and not (param.is_press and value == canonical_spec(param.default)):
            out.append((key, value))
    resolved = tuple(out)
    press = make_press(name, params=dict(resolved))  # constructor checks (ranges) + the modes it supports
    if mode is not None and mode not in press.modes:
        raise ModeError(format_spec(name, resolved), press.modes, mode)
    return resolved


def canonical_spec(spec: str) -> str:
    """A nested press spec, validated and written one way (``adakv(base=snapkv)``)."""
    from knormctl.press_spec import parse_press_spec

    name, params = parse_press_spec(spec)
    return format_spec(name, resolve_press(name, params))


def format_spec(name: str, params) -> str:
    from knormctl.press_spec import format_press_spec

    return format_press_spec(name, params)


def make_press(name: str, *, seed: int = 0, n_sink: int = 4, keep_ratio: float = 1.0,
               params: dict | None = None) -> BasePress | None:
    """Instantiate a press by registry name (None for the full-cache reference).

    ``params`` are the press's own constructor arguments (already typed, see ``resolve_press``);
    parameters that take a press get a spec string and receive the built press. ``seed``,
    ``n_sink`` and ``keep_ratio`` are run-wide: passed to every press whose constructor takes them.
    """
    if name.startswith("kvpress:"):
        from knormctl.engine.presses.kvpress_backend import make_kvpress

        return make_kvpress(name, params or {}, keep_ratio=keep_ratio)
    if name not in PRESSES:
        raise UsageError(f"unknown press {name!r} (choose from {', '.join(PRESSES)})")
    cls = PRESSES[name]
    if cls is None:
        return None
    declared = {p.name: p for p in press_parameters(cls)}
    run_wide = {"seed": seed, "n_sink": n_sink, "keep_ratio": keep_ratio}
    kwargs = {k: v for k, v in run_wide.items() if k in declared}
    for k, v in (params or {}).items():
        if k not in declared:
            raise UsageError(f"press {name!r} has no parameter {k!r} (it takes: {', '.join(declared) or 'none'})")
        kwargs[k] = v
    for k in cls.press_params:
        spec = kwargs.get(k, declared[k].default)
        if isinstance(spec, str):
            from knormctl.press_spec import parse_press_spec

            inner, inner_params = parse_press_spec(spec)
            kwargs[k] = make_press(inner, seed=seed, n_sink=n_sink, keep_ratio=keep_ratio, params=dict(inner_params))
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a constructor's range check: bad input, one line
        raise UsageError(f"press {name!r}: {exc}") from None


def catalog() -> list[dict]:
    """Every registered press as `knormctl presses` lists it: name, modes, parameters, description."""
    rows = []
    for name, cls in PRESSES.items():
        if cls is None:
            continue
        params = press_parameters(cls)
        rows.append({
            "name": name,
            "description": cls.description,
            "modes": list(make_press(name).modes),
            "params": {p.name: p.default for p in params if p.name not in RUN_WIDE},
            "run_wide": [p.name for p in params if p.name in RUN_WIDE and p.name != "keep_ratio"],
        })
    return rows


def check_model_support(model, configs) -> None:
    """One clear line, before any run row exists, when a configuration's press cannot run on
    ``model`` (a query-aware press on attention whose queries knormctl cannot recompute)."""
    from knormctl.engine.observe import attention_modules, check_model_queries

    for cfg in configs:
        if cfg.is_baseline:
            continue
        press = make_press(cfg.press, params=dict(cfg.params))
        if press.observes:
            check_model_queries(model, cfg.spec)
        if press.cuts_in_forward:
            try:
                module = attention_modules(model)[0]
            except ValueError as exc:
                raise UsageError(f"press {cfg.spec!r} cannot run on {type(model).__name__}: {exc}") from None
            check_kvpress_supported(module, cfg.spec)
            if press.reads_queries:
                press.check_queries(model)


def check_kvpress_supported(module, spec: str) -> None:
    """kvpress's hook reads the cache from the attention module's ``past_key_values`` keyword
    (kvpress 0.5.5, transformers < 5.3); modules that take it under another name (GPT-NeoX:
    ``layer_past``) would fail inside the first prefill."""
    if "past_key_values" not in inspect.signature(type(module).forward).parameters:
        raise UsageError(f"press {spec!r} cannot run on {type(module).__name__}: kvpress reads the KV cache "
                         "from the attention's `past_key_values` argument, which this attention does not take")


def chunked_prefill_refusal(press) -> str | None:
    """Why ``press`` (a built press, or None for the full cache) cannot cut between the chunks of a
    chunked prefill, in one clause; None when it can.

    The kvpress backend cuts inside kvpress's own prefill hook (it knows no chunks). A per-head
    press leaves dead slots in the cache after a cut (engine/headmask.py); a later cut would
    score them again and could bring an evicted entry back.
    """
    if press is None:
        return None
    if press.cuts_in_forward:
        return "kvpress presses cut inside kvpress's own prefill hook, which knows no chunks"
    if press.per_head:
        return f"{press.name} sets per-head budgets, whose dead slots a later chunk's cut would score again"
    return None


def static_step_refusal(press, mode: str) -> str | None:
    """Why the decode steps of ``press`` in ``mode`` cannot be the static step (engine/graphstep.py,
    ``--decode-step static|graph``), in one clause; None when they can.

    A press that observes the attention in decode mode runs Python hooks in every step, which a
    graph's replay would skip and which read the model's own attention; a per-head press hides
    dead slots with masks that grow every step.
    """
    if press is None:
        return None
    if press.observes and mode == "decode" and not press.cuts_in_forward:
        return f"{press.name} observes the attention at every decode step (Python hooks the static step would skip)"
    if press.per_head:
        return f"{press.name} sets per-head budgets, whose masks grow with every step"
    return None
