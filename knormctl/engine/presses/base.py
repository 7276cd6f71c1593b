"""The press interface and its registry. A press SCORES cache entries; it never cuts.

``score(keys, values, layer_idx) -> (batch, kv_heads, seq)``: HIGHER = KEEP. The cut
(``engine/compress.py``) keeps the best-scored entries per head, in their original order.

Presses that need more than the keys and values (the layer's queries, hidden states)
set ``observes = True``: the engine then calls ``observe()`` from a forward pre-hook on
every attention module during the forwards after which it may cut, so the press can keep
what it needs (e.g. the last window's queries) -- the attention itself stays SDPA, and
presses that do not observe cost nothing extra.

Adding a policy = one class with ``@register`` + one test-matrix entry.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from knormctl.errors import UsageError


class BasePress:
    """Scores cache entries; higher scores are kept."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""  # one line, for `knormctl presses`
    modes: ClassVar[tuple[str, ...]] = ("prefill", "decode")  # compression modes it supports
    observes: ClassVar[bool] = False  # wants observe() from each attention layer's forward
    # Its scores of several layers can be computed at once on a stacked (L, b, h, s, d) tensor:
    # the cut may then batch layers (fewer kernel launches on GPUs).
    stackable: ClassVar[bool] = True

    def observe(self, layer_idx: int, module: torch.nn.Module, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Called before attention layer ``layer_idx`` runs (only when ``observes``)."""

    def score(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int | None = None) -> torch.Tensor:
        """(..., b, h, s, d) keys/values -> (..., b, h, s) scores, higher = keep."""
        raise NotImplementedError

    def layer_keep(self, n_keep: int, length: int, layer_idx: int, num_layers: int) -> int:
        """Entries to keep in ``layer_idx`` when the uniform rule says ``n_keep`` of ``length``
        (PyramidKV-style per-layer budgets override this; the default is uniform)."""
        return n_keep


PRESSES: dict[str, type[BasePress] | None] = {"none": None}


def register(cls: type[BasePress]) -> type[BasePress]:
    """Class decorator: add a press to the registry under ``cls.name``."""
    if cls.name in PRESSES:
        raise ValueError(f"press {cls.name!r} registered twice")
    PRESSES[cls.name] = cls
    return cls


def press_names() -> tuple[str, ...]:
    return tuple(PRESSES)


def make_press(name: str, *, seed: int = 0, n_sink: int = 4, params: dict | None = None) -> BasePress | None:
    """Instantiate a press by registry name (None for the full-cache reference).

    ``params`` are the press's own constructor arguments; ``seed`` and ``n_sink`` are
    passed to presses whose constructor takes them.
    """
    if name not in PRESSES:
        raise UsageError(f"unknown press {name!r} (choose from {', '.join(PRESSES)})")
    cls = PRESSES[name]
    if cls is None:
        return None
    import inspect

    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in (("seed", seed), ("n_sink", n_sink)) if k in accepted}
    for k, v in (params or {}).items():
        if k not in accepted:
            raise UsageError(f"press {name!r} has no parameter {k!r} (it takes: {', '.join(accepted) or 'none'})")
        kwargs[k] = v
    return cls(**kwargs)
