"""Applies a press to a transformers ``DynamicCache`` by the KnormPress rule.

decode mode: after EVERY forward (prefill included), each layer not in
``skip_layers`` that holds more than ``prune_after`` entries is cut to
``ceil(keep_ratio * length)`` entries. prefill mode: the same cut, once, right
after the prefill forward. Skipped layers cost nothing (no score, no sort).
"""

from __future__ import annotations

import math
import time

import torch

from knormctl.config import PressConfig
from knormctl.engine.presses import BasePress, keep_indices, make_press, row_indices, take_rows
from knormctl.errors import UsageError


def n_keep_for(length: int, keep_ratio: float) -> int:
    """ceil(keep_ratio * length), immune to float noise (0.7 * 10 is 7.000000000000001)."""
    return max(1, math.ceil(round(keep_ratio * length, 9)))


def check_skip_layers(skip_layers, num_layers: int) -> None:
    bad = [i for i in skip_layers if not 0 <= i < num_layers]
    if bad:
        raise UsageError(f"skip layer(s) {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})")


class Compressor:
    """Owns one generation's compression state: press, counters, time spent."""

    def __init__(self, cfg: PressConfig, num_layers: int, sync=None, stack_layers: bool | None = None):
        """``stack_layers``: cut all layers as one stacked tensor (None: on CUDA only, where a
        cut is bound by kernel launches; on CPU the extra copy costs more than it saves)."""
        check_skip_layers(cfg.skip_layers, num_layers)
        self.stack_layers = stack_layers
        self.cfg = cfg
        self.press: BasePress | None = make_press(cfg.press, seed=cfg.seed, n_sink=cfg.n_sink)
        self.active_layers = [i for i in range(num_layers) if i not in set(cfg.skip_layers)]
        self.events = 0  # forwards after which at least one layer was cut
        self.seconds = 0.0
        self._sync = sync or (lambda: None)

    def after_forward(self, cache, prefill: bool) -> bool:
        """Cut the cache if the rule says so. Returns True when something was evicted."""
        if self.press is None or self.cfg.keep_ratio >= 1.0 or (self.cfg.mode == "prefill" and not prefill):
            return False  # keep_ratio 1.0 keeps ceil(1.0 x length) = everything: nothing to do, every step
        layers = cache.layers
        kr, budget = self.cfg.keep_ratio, self.cfg.prune_after
        # Group the layers to cut by length (all equal unless layers were skipped).
        groups: dict[int, list[int]] = {}
        for i in self.active_layers:
            length = layers[i].keys.shape[-2]
            if length > budget and n_keep_for(length, kr) < length:
                groups.setdefault(length, []).append(i)
        if not groups:
            return False  # nothing to evict costs nothing: no norm, no sort
        self._sync()
        t0 = time.perf_counter()
        for length, ids in groups.items():
            self._cut(layers, ids, n_keep_for(length, kr))
        self._sync()
        self.seconds += time.perf_counter() - t0
        self.events += 1
        return True

    def _cut(self, layers, ids: list[int], n_keep: int) -> None:
        stack = self.stack_layers
        if stack is None:
            stack = layers[ids[0]].keys.device.type == "cuda"
        if stack:
            self._cut_stacked(layers, ids, n_keep)
            return
        # Score each layer, then ONE top-k and ONE sort over all layers at once:
        # at small sizes per-operation overhead dominates, so batch what can be batched.
        scores = torch.stack([self.press.score(layers[i].keys, layers[i].values) for i in ids])
        rows = row_indices(keep_indices(scores, n_keep, self.cfg.keep_recent), scores.shape[-1])
        for j, i in enumerate(ids):
            layer = layers[i]
            layer.keys = take_rows(layer.keys, rows[j])
            layer.values = take_rows(layer.values, rows[j])

    def _cut_stacked(self, layers, ids: list[int], n_keep: int) -> None:
        """The same cut with ~20 kernel launches instead of ~140: stack the layers once, score,
        select and gather them as one tensor; each layer then holds a view of the result."""
        keys = torch.stack([layers[i].keys for i in ids])  # (L, b, h, s, d)
        values = torch.stack([layers[i].values for i in ids])
        n, b, h, s, d = keys.shape
        rows = row_indices(keep_indices(self.press.score(keys, values), n_keep, self.cfg.keep_recent), s)
        rows = (rows + torch.arange(n, device=rows.device).unsqueeze(1) * (b * h * s)).reshape(-1)
        kept_k = keys.reshape(-1, d).index_select(0, rows).view(n, b, h, n_keep, d)
        kept_v = values.reshape(-1, d).index_select(0, rows).view(n, b, h, n_keep, d)
        for j, i in enumerate(ids):
            layers[i].keys, layers[i].values = kept_k[j], kept_v[j]


def kv_size(cache) -> tuple[int, int]:
    """(entries, bytes) actually held: entries = cached positions summed over layers."""
    entries = nbytes = 0
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if k is None or k.numel() == 0:
            continue
        entries += k.shape[-2]
        nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
    return entries, nbytes
