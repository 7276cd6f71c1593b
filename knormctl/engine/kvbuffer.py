"""A KV cache layer that appends in place: no per-step copy of the whole cache (issue 16).

transformers' ``DynamicLayer.update`` appends with ``torch.cat``: every decode step copies
the layer's whole cache into a new tensor, so a step costs memory traffic proportional to
the cache on top of attention reading it (benchmarks/kv_append.py measures it).
``BufferLayer`` holds each layer in a preallocated (b, h, capacity, d) buffer; a forward
writes its new entries after the valid ones, and ``keys``/``values`` are views of the
valid prefix -- what attention and the presses read, exactly the tensors the reference
path would hold, only strided by the capacity.

Capacity: sized by the caller to the tokens the generation will feed (``new_cache(model,
capacity=...)``); a layer that runs out anyway grows geometrically (doubling: amortised
O(1) copies per token).

A cut (``compact``) moves the kept entries to the front of the buffer, in place, through
one temporary of the kept entries (what the reference path's gather allocates too). When
the kept entries plus the tokens still to come fit in half the capacity, the kept entries
are gathered into a new, right-sized buffer instead -- one copy, and the evicted memory
is given back, so a prefill cut frees what it evicts, as on the reference path.

Anything that assigns ``layer.keys``/``layer.values`` itself (kvpress's forward hook, a
test) still works: the next ``update`` adopts the assigned tensors into the buffer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class BufferLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of a preallocated buffer.

    ``capacity``: entries to reserve at the first update (at least what that update brings);
    it is also the count of tokens this layer expects to be fed in all, which tells a cut
    how much room the rest of the generation needs.
    """

    def __init__(self, capacity: int = 0, holds: int | None = None):
        super().__init__()
        self.capacity_hint = int(capacity)
        # the most entries this layer holds at once, when a chunked prefill cuts it as it goes
        # (loop.chunk_holds): the first buffer is sized to that, not to every token fed
        self.holds = holds
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0  # valid entries at the front of the buffers
        self._fed = 0  # tokens fed in all (positions), to size the room still needed after a cut
        # a device tensor (1,): set by graphstep.StaticStep around its static step -- update() then
        # writes at that slot and returns the whole buffer (fixed shapes); the host count moves
        # only with advance()
        self.static_slot: torch.Tensor | None = None

    # --- what the model calls ------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static_slot is not None:
            self._k.index_copy_(2, self.static_slot, key_states)
            self._v.index_copy_(2, self.static_slot, value_states)
            return self._k, self._v
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self._owns_views():
            self._adopt()
        n_new = key_states.shape[-2]
        if self._k is None or self._n + n_new > self._k.shape[-2]:
            self._grow(key_states, value_states, self._n + n_new)
        self._k[:, :, self._n:self._n + n_new].copy_(key_states)
        self._v[:, :, self._n:self._n + n_new].copy_(value_states)
        self._n += n_new
        self._fed += n_new
        self._set_views()
        return self.keys, self.values

    def reset(self) -> None:
        self._k = self._v = None
        self._n = self._fed = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # leaves shorter views; the next update adopts them

    # --- what the cut calls ----------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else int(self._k.shape[-2])

    @property
    def length(self) -> int:
        """Valid entries at the front of the buffer."""
        return self._n

    def take_assigned(self) -> None:
        """Copy keys/values assigned from outside (kvpress's hook) into the buffer now, not at the
        next update: the static step (graphstep.py) reads the buffer itself."""
        if not self._owns_views():
            self._adopt()

    def buffer_address(self) -> tuple[int, int]:
        return self._k.data_ptr(), self._v.data_ptr()

    def fit(self, slack: float = 0.125) -> bool:
        """Right-size the buffer to the valid entries plus the tokens still to come when it holds
        more than ``slack`` of that in extra slots; True when it moved. For the static decode step
        (graphstep.py), which reads the WHOLE buffer: an in-place compaction keeps the prompt-sized
        buffer, and attention over it would cost what the full cache costs. The slack spares a
        decode-mode cache, cut by a little at a time, a new buffer (and a new graph) per cut."""
        if self._k is None:
            return False
        need = self._n + max(0, self.capacity_hint - self._fed)
        if self.capacity - need <= slack * need:
            return False
        self._move(self._k, self._v, need)
        self._set_views()
        return True

    def clear_tail(self) -> None:
        """Zeros in the slots past the valid entries: the static step reads the whole buffer, and
        a new buffer's unwritten memory may hold NaN (masked out of the scores, but 0 x NaN = NaN)."""
        self._k[:, :, self._n:].zero_()
        self._v[:, :, self._n:].zero_()

    def advance(self, n_new: int) -> None:
        """``n_new`` entries were written after the valid ones by a static step (graphstep.py)."""
        self._n += n_new
        self._fed += n_new
        self._set_views()

    def held_bytes(self) -> int:
        """Bytes the buffers hold (capacity, not only the valid entries)."""
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def compact(self, idx: torch.Tensor) -> None:
        """Keep the entries ``idx`` ((b, h, n_keep) positions, ascending per head), moved to the
        front of the buffer. Every head keeps the same count (the buffer is one length)."""
        if not self._owns_views():
            self._adopt()
        b, h, n_keep = idx.shape
        cap = self._k.shape[-2]
        rows = (idx + torch.arange(b * h, device=idx.device).view(b, h, 1) * cap).flatten()
        room = max(0, self.capacity_hint - self._fed)  # tokens still to come
        if n_keep + room <= cap // 2:  # give the evicted memory back: gather into a right-sized buffer
            new_cap = n_keep + room
            self._k = _gather_into(self._k, rows, b, h, n_keep, new_cap)
            self._v = _gather_into(self._v, rows, b, h, n_keep, new_cap)
        else:
            for buf in (self._k, self._v):  # each its own head size (a value head may differ from a key head)
                d = buf.shape[-1]
                kept = buf.view(b * h * cap, d).index_select(0, rows)  # a temporary: no aliased copy
                buf[:, :, :n_keep].copy_(kept.view(b, h, n_keep, d))
                del kept
        self._n = n_keep
        self._set_views()

    # --- internals ---------------------------------------------------------------------------

    def _owns_views(self) -> bool:
        """keys/values are still the views this layer made (nobody assigned new tensors)."""
        k, v = self.keys, self.values
        if self._k is None:
            return k is None or k.numel() == 0
        return (k is not None and v is not None and k.dim() == 4 and k.shape[-2] == self._n
                and v.shape[-2] == self._n and k.data_ptr() == self._k.data_ptr()
                and v.data_ptr() == self._v.data_ptr() and k.stride() == self._k.stride())

    def _adopt(self) -> None:
        """keys/values were assigned from outside: copy them into the buffer (same count)."""
        k, v = self.keys, self.values
        n = 0 if k is None or k.dim() < 4 else k.shape[-2]
        if n and (self._k is None or n > self._k.shape[-2] or self._k.shape[:2] != k.shape[:2]
                  or self._k.dtype != k.dtype or self._k.shape[-1] != k.shape[-1]):
            self._k = self._v = None
            self._grow(k, v, n)
        if n:
            self._k[:, :, :n].copy_(k)
            self._v[:, :, :n].copy_(v)
        self._n = n
        self._set_views()

    def _grow(self, like_k: torch.Tensor, like_v: torch.Tensor, need: int) -> None:
        """A buffer holding at least ``need`` entries: the hint, else double the old one."""
        if self._k is None and self.holds is not None:
            cap = max(need, min(self.holds, self.capacity_hint - self._fed + self._n))
        else:
            cap = max(need, self.capacity_hint - self._fed + self._n, 2 * self.capacity)
        self._move(like_k, like_v, cap)

    def _move(self, like_k: torch.Tensor, like_v: torch.Tensor, cap: int) -> None:
        """New buffers of ``cap`` entries (shaped and typed like ``like_k``/``like_v``), the valid
        entries of the old ones (if any) copied to their front."""
        b, h, _, dk = like_k.shape
        k = like_k.new_empty(b, h, cap, dk)
        v = like_v.new_empty(b, h, cap, like_v.shape[-1])
        if self._k is not None and self._n:
            k[:, :, :self._n].copy_(self._k[:, :, :self._n])
            v[:, :, :self._n].copy_(self._v[:, :, :self._n])
        self._k, self._v = k, v

    def _set_views(self) -> None:
        if self._k is None:
            return
        self.keys = self._k[:, :, :self._n]
        self.values = self._v[:, :, :self._n]


def _gather_into(buf: torch.Tensor, rows: torch.Tensor, b: int, h: int, n_keep: int, cap: int) -> torch.Tensor:
    d = buf.shape[-1]
    out = buf.new_empty(b, h, cap, d)
    kept = buf.view(-1, d).index_select(0, rows).view(b, h, n_keep, d)
    out[:, :, :n_keep].copy_(kept)
    return out


def keep_entries(layer, idx: torch.Tensor) -> None:
    """Keep positions ``idx`` ((b, h, n_keep), ascending) of ``layer``: compacted in place in a
    ``BufferLayer``; on the reference ``DynamicLayer``, gathered into new compact tensors."""
    if isinstance(layer, BufferLayer):
        layer.compact(idx)
        return
    from knormctl.engine.compress import row_indices, take_rows

    rows = row_indices(idx, layer.keys.shape[-2])
    layer.keys = take_rows(layer.keys, rows)
    layer.values = take_rows(layer.values, rows)
