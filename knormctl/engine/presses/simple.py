"""Presses that look at nothing but the cached keys (or at positions): KnormPress, its
inverse, random, StreamingLLM and KeyDiff. Each is one scoring method; all work in both
modes and on stacked layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from knormctl.engine.presses.base import BasePress, register


@register
class KnormPress(BasePress):
    """Devoto et al. 2024: keys with a LOW L2 norm get HIGH attention, so keep them."""

    name = "knorm"
    description = "drop the keys with the highest L2 norm (Devoto et al., EMNLP 2024)"

    def score(self, keys, values, layer_idx=None):
        # float32 accumulation: bf16/fp16 norms tie often and would make the kept set arbitrary.
        return -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)


@register
class KnormInversePress(BasePress):
    """Keep the HIGHEST-norm keys: the direct check of KnormPress's hypothesis."""

    name = "knorm-inverse"
    description = "keep the highest-norm keys instead: the direct check of KnormPress's hypothesis"

    def score(self, keys, values, layer_idx=None):
        return torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)


@register
class RandomPress(BasePress):
    """Keep a random subset of the same size (seeded): the control every paper uses."""

    name = "random"
    description = "keep a seeded random subset of the same size (the control every paper uses)"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def score(self, keys, values, layer_idx=None):
        gen = self._generators.get(keys.device)
        if gen is None:
            gen = self._generators[keys.device] = torch.Generator(device=keys.device).manual_seed(self.seed)
        return torch.rand(keys.shape[:-1], generator=gen, device=keys.device)


@register
class StreamingPress(BasePress):
    """StreamingLLM: the first ``n_sink`` entries plus the most recent ones.

    Kept entries stay in order, so cache index order is recency order and the
    first ``n_sink`` cache slots remain the original sink tokens.
    """

    name = "streaming"
    description = "StreamingLLM (Xiao et al., 2024): the first n_sink entries plus the most recent ones"

    def __init__(self, n_sink: int = 4):
        self.n_sink = n_sink

    def score(self, keys, values, layer_idx=None):
        shape = keys.shape[:-1]  # (..., seq): any leading dims, so layers can be scored stacked
        scores = torch.arange(shape[-1], device=keys.device, dtype=torch.float32).expand(shape).clone()
        scores[..., : self.n_sink] = float("inf")
        return scores


@register
class KeyDiffPress(BasePress):
    """KeyDiff (Park et al., 2025): keep the keys LEAST similar to the layer's mean key direction.

    One-shot, as kvpress scores it (the paper evicts block by block; kvpress's BlockPress does that).
    """

    name = "keydiff"
    description = "KeyDiff (Park et al., 2025): keep the keys least cosine-similar to the mean key direction"

    def score(self, keys, values, layer_idx=None):
        keys = keys.float()  # float32 like knorm: low-precision similarities tie
        anchor = F.normalize(keys, p=2, dim=-1).mean(dim=-2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)
