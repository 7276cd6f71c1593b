"""Eviction policies ("presses"): each is one scoring method; the cut is shared.

A press scores every cached entry of one layer, per batch row and KV head:
``score(keys, values) -> (batch, kv_heads, seq)``, HIGHER = KEEP. The cut keeps the
``n_keep`` best-scored entries per head, in their original order (kvpress's
ScorerPress idea: the top-k and the gather live once, in ``cut_layers``).

Adding a policy = one class here + one line in ``PRESSES``.
"""

from __future__ import annotations

import torch

from knormctl.errors import UsageError


class BasePress:
    """Scores cache entries; higher scores are kept."""

    name = "base"

    def score(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class KnormPress(BasePress):
    """Devoto et al. 2024: keys with a LOW L2 norm get HIGH attention, so keep them."""

    name = "knorm"

    def score(self, keys, values):
        # float32 accumulation: bf16/fp16 norms tie often and would make the kept set arbitrary.
        return -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)


class KnormInversePress(BasePress):
    """Keep the HIGHEST-norm keys: the direct check of KnormPress's hypothesis."""

    name = "knorm-inverse"

    def score(self, keys, values):
        return torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)


class RandomPress(BasePress):
    """Keep a random subset of the same size (seeded): the control every paper uses."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def score(self, keys, values):
        gen = self._generators.get(keys.device)
        if gen is None:
            gen = self._generators[keys.device] = torch.Generator(device=keys.device).manual_seed(self.seed)
        return torch.rand(keys.shape[:-1], generator=gen, device=keys.device)


class StreamingPress(BasePress):
    """StreamingLLM: the first ``n_sink`` entries plus the most recent ones.

    Kept entries stay in order, so cache index order is recency order and the
    first ``n_sink`` cache slots remain the original sink tokens.
    """

    name = "streaming"

    def __init__(self, n_sink: int = 4):
        self.n_sink = n_sink

    def score(self, keys, values):
        shape = keys.shape[:-1]  # (..., seq): any leading dims, so layers can be scored stacked
        scores = torch.arange(shape[-1], device=keys.device, dtype=torch.float32).expand(shape).clone()
        scores[..., : self.n_sink] = float("inf")
        return scores


PRESSES: dict[str, type[BasePress] | None] = {
    "none": None,
    "knorm": KnormPress,
    "knorm-inverse": KnormInversePress,
    "random": RandomPress,
    "streaming": StreamingPress,
}


def make_press(name: str, *, seed: int = 0, n_sink: int = 4) -> BasePress | None:
    """Instantiate a press by registry name (None for the full-cache reference)."""
    if name not in PRESSES:
        raise UsageError(f"unknown press {name!r} (choose from {', '.join(PRESSES)})")
    cls = PRESSES[name]
    if cls is None:
        return None
    if cls is RandomPress:
        return cls(seed=seed)
    if cls is StreamingPress:
        return cls(n_sink=n_sink)
    return cls()


def keep_indices(scores: torch.Tensor, n_keep: int, keep_recent: int = 0) -> torch.Tensor:
    """Indices of the ``n_keep`` best scores along the last dim, in ascending (original) order.

    Ties at the boundary are broken toward the MOST RECENT entries, so the kept set is
    deterministic (RoPE preserves norms: a repeated token has the same key norm at every
    position, so exact ties are common). ``keep_recent`` newest entries get +inf scores.
    """
    if keep_recent:
        scores = scores.clone()
        scores[..., -keep_recent:] = float("inf")
    seq = scores.shape[-1]
    n_drop = seq - n_keep
    # Find the (usually few) entries to DROP rather than the many to keep: top-k cost grows with k.
    threshold = scores.topk(n_drop, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
    below = scores < threshold
    tied = scores == threshold
    ties_to_drop = n_drop - below.sum(-1, keepdim=True)
    drop = below | (tied & (tied.cumsum(-1) <= ties_to_drop))  # the oldest tied entries go first
    # A mask read in row-major order yields the kept indices already sorted; nonzero_static
    # knows the count in advance, so there is no device-to-host sync on GPUs.
    keep = ~drop
    flat = torch.nonzero_static(keep.view(-1, seq), size=keep.numel() // seq * n_keep)
    return flat[:, 1].view(*scores.shape[:-1], n_keep)


def row_indices(idx: torch.Tensor, seq: int) -> torch.Tensor:
    """Kept indices (..., b, h, n_keep) -> row numbers in a (b*h*seq, d) view of each layer,
    flattened per leading index. Computed once for all layers, shared by keys and values."""
    b, h = idx.shape[-3:-1]
    base = torch.arange(b * h, device=idx.device).view(b, h, 1) * seq
    return (idx + base).flatten(-3)


def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t: (b, h, seq, d), rows from ``row_indices`` -> (b, h, n_keep, d).

    One ``index_select`` over the rows of the flattened tensor: about the cost of a copy,
    where ``gather`` with an expanded index costs ~3x on CPU.
    """
    b, h, s, d = t.shape
    return t.reshape(b * h * s, d).index_select(0, rows).view(b, h, -1, d)
