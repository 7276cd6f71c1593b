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
from knormctl.engine.presses import BasePress, make_press
from knormctl.errors import UsageError


def n_keep_for(length: int, keep_ratio: float) -> int:
    """ceil(keep_ratio * length), immune to float noise (0.7 * 10 is 7.000000000000001)."""
    return max(1, math.ceil(round(keep_ratio * length, 9)))


def check_skip_layers(skip_layers, num_layers: int) -> None:
    bad = [i for i in skip_layers if not 0 <= i < num_layers]
    if bad:
        raise UsageError(f"skip layer(s) {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})")


class Compressor:
    """Owns one generation's compression state: press, counters, time spent.

    ``model``: needed only by presses that hook the attention modules -- observers
    (``press.observes``), per-head budgets (``press.head_keep``), the kvpress backend
    (``press.cuts_in_forward``). In prefill mode the observers go right after the cut; the
    rest stay until ``close()`` (the loop calls it).
    """

    def __init__(self, cfg: PressConfig, num_layers: int, sync=None, stack_layers: bool | None = None, *,
                 model=None):
        """``stack_layers``: cut all layers as one stacked tensor (None: on CUDA only, where a
        cut is bound by kernel launches; on CPU the extra copy costs more than it saves)."""
        check_skip_layers(cfg.skip_layers, num_layers)
        self.stack_layers = stack_layers
        self.cfg = cfg
        self.num_layers = num_layers
        self.press: BasePress | None = make_press(cfg.press, seed=cfg.seed, n_sink=cfg.n_sink,
                                                  keep_ratio=cfg.keep_ratio, params=dict(cfg.params))
        self.active_layers = [i for i in range(num_layers) if i not in set(cfg.skip_layers)]
        self.events = 0  # forwards after which at least one layer was cut
        self.seconds = 0.0
        self._sync = sync or (lambda: None)
        self._hooks: list = []  # observers, or the kvpress backend's hooks: gone after a prefill cut
        self._mask_hooks: list = []  # per-head masks: as long as the generation
        # --- presses that need the model (issue 12): observers, per-head masks, kvpress's own hooks
        self._per_head = self.press is not None and type(self.press).head_keep is not BasePress.head_keep
        if self.press is not None and cfg.keep_ratio < 1.0:
            self._attach(model)

    def _attach(self, model) -> None:
        press, layers = self.press, self.active_layers
        if not (press.observes or self._per_head or press.cuts_in_forward):
            return  # presses that score keys alone cost nothing during the forwards
        if model is None:
            raise ValueError(f"press {self.cfg.press!r} needs the attention layers: pass model= to Compressor")
        if self.cfg.mode not in press.modes:
            raise UsageError(f"press {self.cfg.press!r} does not support {self.cfg.mode} mode")
        if press.cuts_in_forward:
            self._hooks = press.attach(model, layers, self)
            return
        from knormctl.engine.headmask import install_mask_hooks
        from knormctl.engine.observe import install_observers

        if press.observes:
            self._hooks = install_observers(model, press, layers)
        if self._per_head:
            self._mask_hooks = install_mask_hooks(model, layers)

    def close(self) -> None:
        """Remove the hooks (if any)."""
        for h in self._hooks + self._mask_hooks:
            h.remove()
        self._hooks, self._mask_hooks = [], []

    def _done_observing(self) -> None:
        """After a prefill-mode cut nothing more will be cut: the observers and what they kept go
        (decode steps then cost what they cost without a press); per-head masks stay."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.press.reset()
    # --- end issue 12

    def after_forward(self, cache, prefill: bool) -> bool:
        """Cut the cache if the rule says so. Returns True when something was evicted."""
        if self.press is None or self.cfg.keep_ratio >= 1.0 or (self.cfg.mode == "prefill" and not prefill):
            return False  # keep_ratio 1.0 keeps ceil(1.0 x length) = everything: nothing to do, every step
        if self.press.cuts_in_forward:  # the kvpress backend cut inside the forward, timed there
            cut = self.press.take_cut()
            self.events += cut
            self._done_observing()
            return cut
        layers = cache.layers
        kr, budget = self.cfg.keep_ratio, self.cfg.prune_after
        # Group the layers to cut by (length, kept count): all equal unless layers were skipped
        # or the press sets per-layer budgets.
        groups: dict[tuple[int, int], list[int]] = {}
        for i in self.active_layers:
            length = layers[i].keys.shape[-2]
            if length <= budget:
                continue
            n_keep = min(length, max(1, self.press.layer_keep(n_keep_for(length, kr), length, i, self.num_layers, kr)))
            if n_keep < length:
                groups.setdefault((length, n_keep), []).append(i)
        if not groups:
            if self.cfg.mode == "prefill":
                self._done_observing()
            return False  # nothing to evict costs nothing: no norm, no sort
        self._sync()
        t0 = time.perf_counter()
        for (_, n_keep), ids in groups.items():
            self._cut(layers, ids, n_keep)
        if self.cfg.mode == "prefill":
            self._done_observing()
        self._sync()
        self.seconds += time.perf_counter() - t0
        self.events += 1
        return True

    def _cut(self, layers, ids: list[int], n_keep: int) -> None:
        if self._per_head:  # issue 12: heads keep different counts (engine/headmask.py)
            from knormctl.engine.headmask import cut_per_head

            for i in ids:
                scores = self.press.score(layers[i].keys, layers[i].values, i)
                if self.cfg.keep_recent:
                    scores = scores.float().clone()
                    scores[..., -self.cfg.keep_recent:] = float("inf")
                cut_per_head(layers[i], scores, self.press.head_keep(scores, n_keep))
            return
        stack = self.stack_layers
        if stack is None:
            stack = layers[ids[0]].keys.device.type == "cuda"
        if stack and self.press.stackable:
            self._cut_stacked(layers, ids, n_keep)
            return
        # Score each layer, then ONE top-k and ONE sort over all layers at once:
        # at small sizes per-operation overhead dominates, so batch what can be batched.
        scores = torch.stack([self.press.score(layers[i].keys, layers[i].values, i) for i in ids])
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
    """(entries, bytes) actually held: entries = cached positions summed over layers.

    After a per-head cut (engine/headmask.py) a layer holds every head at the largest per-head
    count: the dead slots are held and counted, and so is the mask that hides them."""
    entries = nbytes = 0
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if k is None or k.numel() == 0:
            continue
        entries += k.shape[-2]
        nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        live = getattr(layer, "live_mask", None)
        if live is not None:
            nbytes += live.numel() * live.element_size()
    return entries, nbytes


# ----------------------------------------------------------------------------- selection

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
