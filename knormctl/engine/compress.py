"""Applies a press to a transformers ``DynamicCache`` by the KnormPress rule.

decode mode: after EVERY forward (prefill included), each layer not in
``skip_layers`` that holds more than ``prune_after`` entries is cut to
``ceil(keep_ratio * length)`` entries. prefill mode: the same cut, once, right
after the prefill forward. Skipped layers cost nothing (no score, no sort).

Memory: a cut never holds a second copy of the cache. Each layer is gathered on its
own into a compact tensor it alone owns (the old one is freed as soon as it is
replaced). What a cut allocates besides -- a stacked copy of a few layers for scoring
(fewer kernel launches, which is what a cut of small layers on a GPU is bound by) and
the selection's temporaries -- is sized to fit below the peak the sample has already
reached (``Compressor.budget``), so on CUDA a cut never raises the sample's peak.
"""

from __future__ import annotations

import hashlib
import math
import time

import torch

from knormctl.config import PressConfig
from knormctl.engine.kvbuffer import keep_entries
from knormctl.engine.presses import BasePress, make_press
from knormctl.errors import UsageError
from knormctl.options import check_skip_layers

# Stacked scoring copies the keys and values of a group of layers. It pays where layers are
# small (launch-bound: ~2 launches per layer saved, each ~5-10 us on a GPU) and costs where
# they are large (the copy is memory traffic): at most this many bytes per group.
STACK_GROUP_CAP_BYTES = 64 << 20
# What the selection allocates per (layer, head, entry): the score (4), top-k values and
# indices (12), four bool masks (4), the int64 cumsum of ties (8), nonzero_static's output
# and the row numbers (24): 52, rounded up.
SELECT_BYTES_PER_ENTRY = 64


def n_keep_for(length: int, keep_ratio: float) -> int:
    """ceil(keep_ratio * length), immune to float noise (0.7 * 10 is 7.000000000000001)."""
    return max(1, math.ceil(round(keep_ratio * length, 9)))


def layer_budget(press: BasePress, layer: int, length: int, num_layers: int, keep_ratio: float) -> int:
    """Entries layer ``layer`` keeps of ``length`` (at least 1): ``ceil(keep_ratio x length)``,
    or the press's own per-layer budget (PyramidKV). The cut and the chunked-prefill buffer
    sizing (``loop.chunk_holds``) both read it here."""
    return max(1, press.layer_keep(n_keep_for(length, keep_ratio), length, layer, num_layers, keep_ratio))


def press_seed(cfg: PressConfig, sample_seed: int | None) -> int:
    """The seed of a press for one (sample, configuration): a stable hash of the run's seed,
    the sample's seed and the configuration key, so no two prompts or configurations share
    draws and a resumed run draws what the first attempt drew. None: the run's seed."""
    if sample_seed is None:
        return cfg.seed
    digest = hashlib.sha256(f"{cfg.seed}|{sample_seed}|{cfg.key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Compressor:
    """Owns one generation's compression state: press, counters, time spent.

    ``model``: needed only by presses that hook the attention modules -- observers
    (``press.observes``), per-head budgets (``press.head_keep``), the kvpress backend
    (``press.cuts_in_forward``). In prefill mode the observers go right after the cut; the
    rest stay until ``close()`` (the loop calls it).
    ``seed``: the sample's seed (see ``press_seed``), or one per batch row (a list).
    ``budget_bytes``: what a cut may allocate besides the cache (None: automatic, see
    ``budget``); tests set it to exercise the bounded paths on a CPU.
    """

    def __init__(self, cfg: PressConfig, num_layers: int, sync=None, *, model=None, seed: int | None = None,
                 budget_bytes: int | None = None):
        check_skip_layers(cfg.skip_layers, num_layers)
        self.budget_bytes = budget_bytes
        self.cfg = cfg
        self.num_layers = num_layers
        self.press: BasePress | None = self._make(cfg, seed)
        self.active_layers = [i for i in range(num_layers) if i not in set(cfg.skip_layers)]
        self.events = 0  # forwards after which at least one layer was cut
        self.seconds = 0.0
        self._sync = sync or (lambda: None)
        self._hooks: list = []  # observers, or the kvpress backend's hooks: gone after a prefill cut
        self._mask_hooks: list = []  # per-head masks: as long as the generation
        # --- presses that need the model (issue 12): observers, per-head masks, kvpress's own hooks
        self._per_head = self.press is not None and self.press.per_head
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

    @staticmethod
    def _make(cfg: PressConfig, seed) -> BasePress | None:
        """The press; ``seed`` a list (one per batch row): a seeded press is built once per row
        (engine/batch.py ``RowPress``), so row j draws what it draws alone."""
        from knormctl.engine.batch import row_press, takes_seed

        seeds = [seed] if seed is None or isinstance(seed, int) else list(seed)

        def build(s):
            return make_press(cfg.press, seed=press_seed(cfg, s), n_sink=cfg.n_sink, keep_ratio=cfg.keep_ratio,
                              params=dict(cfg.params))

        first = build(seeds[0])
        if len(seeds) > 1 and takes_seed(first):
            return row_press([first] + [build(s) for s in seeds[1:]])
        return first

    @property
    def cuts_in_forward(self) -> bool:
        """The press cuts inside the prefill forward (the kvpress backend), not after it."""
        return self.evicts and self.press.cuts_in_forward

    @property
    def evicts(self) -> bool:
        """False when this configuration can never cut (no press, or keep_ratio 1.0)."""
        return self.press is not None and self.cfg.keep_ratio < 1.0

    @property
    def observing(self) -> bool:
        """Hooks still run Python in every forward (observers, the kvpress backend's hooks)."""
        return bool(self._hooks)

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

    def after_forward(self, cache, prefill: bool, *, of_length: int | None = None, last_chunk: bool = True) -> bool:
        """Cut the cache if the rule says so. Returns True when something was evicted.

        Chunked prefill (``loop.prefill``): ``of_length`` is the whole prompt's length, so in
        prefill mode every cut keeps what a one-forward prefill of the whole prompt would keep
        (``ceil(keep_ratio x of_length)`` per layer, the press's per-layer budgets taken at that
        length); ``last_chunk=False`` keeps the observers for the chunks still to come.
        """
        if not self.evicts or (self.cfg.mode == "prefill" and not prefill):
            return False  # keep_ratio 1.0 keeps ceil(1.0 x length) = everything: nothing to do, every step
        if self.press.cuts_in_forward:  # the kvpress backend cut inside the forward, timed there
            cut = self.press.take_cut()
            self.events += cut
            self._done_observing()
            return cut
        layers = cache.layers
        kr, budget = self.cfg.keep_ratio, self.cfg.prune_after
        # Group the layers to cut by (device, length, kept count): all equal unless layers were
        # skipped, the press sets per-layer budgets, or a device map spreads the layers over
        # several devices (a group's scores are stacked: one device per group).
        groups: dict[tuple[torch.device, int, int], list[int]] = {}
        for i in self.active_layers:
            keys = layers[i].keys
            length = keys.shape[-2]
            whole = length if of_length is None else of_length
            if whole <= budget:  # a chunked prefill: the whole prompt decides, as one forward's would
                continue
            n_keep = min(length, layer_budget(self.press, i, whole, self.num_layers, kr))
            if n_keep < length:
                groups.setdefault((keys.device, length, n_keep), []).append(i)
        if not groups:
            if self.cfg.mode == "prefill" and last_chunk:
                self._done_observing()
            return False  # nothing to evict costs nothing: no norm, no sort
        self._sync()
        t0 = time.perf_counter()
        rooms = {device: self.budget(device) for device, _, _ in groups}
        scored = [(self._scores(layers, ids, rooms[dev]), ids, n_keep, dev) for (dev, _, n_keep), ids in groups.items()]
        check_scores([s for s, *_ in scored], self.cfg.press)  # before anything is cut: one host sync per device
        for scores, ids, n_keep, dev in scored:
            if self._per_head:
                self._cut_per_head(layers, ids, scores, n_keep)
            else:
                self._cut(layers, ids, scores, n_keep, rooms[dev])
        if self.cfg.mode == "prefill" and last_chunk:
            self._done_observing()
        self._sync()
        self.seconds += time.perf_counter() - t0
        self.events += 1
        return True

    def _cut_per_head(self, layers, ids: list[int], scores: torch.Tensor, n_keep: int) -> None:
        """Heads keep different counts (issue 12, engine/headmask.py): each layer is held at its
        largest per-head count, the other slots masked out of attention."""
        from knormctl.engine.headmask import cut_per_head

        for j, i in enumerate(ids):
            s = scores[j]
            if self.cfg.keep_recent:
                s = s.float().clone()
                s[..., -self.cfg.keep_recent:] = float("inf")
            cut_per_head(layers[i], s, self.press.head_keep(s, n_keep))

    def budget(self, device: torch.device) -> int | None:
        """Bytes a cut may allocate besides the cache (None: unbounded).

        On CUDA: the peak this sample already reached (``max_memory_allocated``, which the
        memory probe resets per sample) minus what is allocated now -- allocator counters,
        no device sync. Half goes to a stacked group, half to a chunk of the selection
        (they never overlap). Outside the budget, because they cannot be made smaller:
        the scores (4 bytes per entry and head, under 1% of the cache) and one layer's
        kept entries during its gather. On CPU there are no launches to save and the
        selection's temporaries are small next to the prefill's: unbounded, no stacking.
        """
        if self.budget_bytes is not None:
            return self.budget_bytes
        if device.type == "cuda":
            return max(0, torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device))
        return None

    def _scores(self, layers, ids: list[int], room: int | None) -> torch.Tensor:
        """(len(ids), b, h, s) scores: stacked in groups that fit half the budget (and
        ``STACK_GROUP_CAP_BYTES``), else layer by layer."""
        keys = layers[ids[0]].keys
        per_layer = 2 * keys.numel() * keys.element_size()  # keys + values of one layer
        size = 0 if room is None or not self.press.stackable else min(STACK_GROUP_CAP_BYTES, room // 2) // per_layer
        if size < 2:
            return torch.stack([self.press.score(layers[i].keys, layers[i].values, i) for i in ids])
        parts = []
        for start in range(0, len(ids), size):
            group = ids[start:start + size]
            stacked_k = torch.stack([layers[i].keys for i in group])  # (G, b, h, s, d): a bounded copy
            stacked_v = torch.stack([layers[i].values for i in group])
            parts.append(self.press.score(stacked_k, stacked_v))
            del stacked_k, stacked_v  # freed before the next group is stacked
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _cut(self, layers, ids: list[int], scores: torch.Tensor, n_keep: int, room: int | None) -> None:
        """One selection per chunk of layers (all layers at once where the budget allows: the
        fewest launches), then each layer cut on its own (``kvbuffer.keep_entries``): a
        ``BufferLayer`` compacts in place; a reference ``DynamicLayer`` gets a compact tensor it
        owns (no views of a shared stack), the old one freed as soon as it is replaced. Either
        way the cut holds at most one extra layer's kept entries."""
        per_layer = scores[0].numel() * SELECT_BYTES_PER_ENTRY
        chunk = len(ids) if room is None else max(1, (room // 2) // per_layer)
        for start in range(0, len(ids), chunk):
            idx = keep_indices(scores[start:start + chunk], n_keep, self.cfg.keep_recent)
            for j, i in enumerate(ids[start:start + chunk]):
                keep_entries(layers[i], idx[j])  # in place in a BufferLayer, a compact gather otherwise


def check_scores(scores: list[torch.Tensor], press: str) -> None:
    """Refuse NaN scores: the selection keeps exactly ``n_keep`` entries per head only when
    every score compares (NaN compares false to everything, so heads would silently get
    different counts and their rows misalign). +-inf are fine and deliberate (streaming's
    sinks and ``keep_recent`` use +inf for "always keep"); ties among them are broken like
    any tie. One ``.item()`` per device for the whole event: on a GPU, one host sync per event,
    where the event already synchronises for its timing."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for s in scores:
        by_device.setdefault(s.device, []).append(torch.isnan(s).any())
    if any(torch.stack(flags).any().item() for flags in by_device.values()):
        raise ValueError(f"press {press!r} gave NaN scores (e.g. a float16 overflow in its arithmetic): "
                         "the cut needs every entry ordered")


def _nbytes(*tensors) -> int:
    """Bytes of the tensors given (None counts nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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
        nbytes += _nbytes(k, v, getattr(layer, "live_mask", None))
    return entries, nbytes


def kv_held_bytes(cache) -> int:
    """Bytes the cache's layers hold: a ``BufferLayer``'s whole buffers (room for the tokens to
    come included), else the tensors themselves -- what a memory budget must hold."""
    total = 0
    for layer in cache.layers:
        held = getattr(layer, "held_bytes", None)
        total += held() if held is not None else _nbytes(layer.keys, layer.values)
        total += _nbytes(getattr(layer, "live_mask", None))
    return total


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
