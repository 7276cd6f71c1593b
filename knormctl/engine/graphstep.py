"""A decode step at a fixed cache size, captured once as a CUDA graph and replayed (issue 16 item 1).

Why: on a GPU a decode step of an 8B model is a few hundred small kernels. Launched one by one
from Python they cost 2-6x the GPU's own work (issue 16 measured it on an H100); a CUDA graph
launches the whole step at once. A graph replays fixed kernels on fixed addresses, so the
step it records cannot read ``keys[:, :, :n]`` (a new shape every step). Instead:

- every layer's ``BufferLayer`` hands attention its WHOLE buffer (a fixed address and size)
  and writes the step's entry at a slot held in a device tensor (``index_copy_``, as
  transformers' ``StaticLayer`` does), not at a Python offset;
- attention gets a length mask, ``slot < n + 1``, computed on the device inside the step from
  that same slot tensor: the slots past the valid entries are hidden, and nothing on the host
  changes between steps but three small copies into the step's static inputs;
- the buffer is the compressed cache's: after a prefill cut ``BufferLayer.compact`` gathers
  the kept entries into a buffer of the kept count plus the tokens still to come, so the
  masked attention reads at most ``max_new_tokens`` hidden slots beyond the valid ones;
- the slots past the valid entries hold zeros, never a new buffer's uninitialised memory: a
  masked slot weighs exactly 0 in attention, but 0 x NaN is NaN;
- a graph is recorded again whenever a buffer moved or changed size (a cut that gathered into
  a new buffer, a growth); an in-place compaction keeps the addresses, and the mask, computed
  from the slot, follows the new length by itself.

Where the step cannot be static it is run the ordinary way (``DecodeGraph.why_not``): layers
of different lengths (skipped layers, per-layer budgets) or with per-head masks, since one
mask serves every layer; presses that still observe the attention (their hooks run Python on
every step); caches with other layer kinds. ``steps``/``captures`` count what ran where.

``capture=False`` runs the same static step without recording it: the path the CPU tests
compare with the reference (tokens identical), and the step a graph records.
"""

from __future__ import annotations

import torch

from knormctl.engine.kvbuffer import BufferLayer


class DecodeGraph:
    """One-token decode steps through ``fwd`` (``loop.CachedForward``: its model, cache, keyword
    arguments and ledger) for a batch of ``batch`` rows."""

    def __init__(self, fwd, batch: int, device: torch.device, capture: bool):
        self.fwd, self.model, self.cache, self.capture = fwd, fwd.model, fwd.cache, capture
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the step writes: the valid count
        impl = getattr(self.model.config, "_attn_implementation", "sdpa")
        self.float_mask = impl != "sdpa"  # eager adds a float mask; SDPA takes a boolean one
        self.dtype = next(self.model.parameters()).dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._layout: tuple | None = None  # the buffers (addresses, capacity) the step last ran on
        self.steps = 0  # decode steps run through the static step
        self.captures = 0  # graphs recorded

    def why_not(self) -> str | None:
        """Why the next step cannot be the static one (None: it can)."""
        layers = self.cache.layers
        if not all(isinstance(layer, BufferLayer) for layer in layers):
            return "a cache layer is not a knormctl buffer"
        if any(getattr(layer, "live_mask", None) is not None for layer in layers):
            return "per-head masks (one mask serves every layer)"
        if not all(layer.owns_buffer() for layer in layers):
            return "a layer's entries were assigned from outside"
        if len({layer.length for layer in layers}) != 1 or len({layer.capacity for layer in layers}) != 1:
            return "layers of different lengths (one mask serves every layer)"
        if layers[0].length >= layers[0].capacity:
            return "the buffer is full"
        return None

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The (B, 1, V) logits of feeding ``token`` at ``position``; the cache grows by one.
        Valid until the next call (a graph's output lives at a fixed address)."""
        layers = self.cache.layers
        self.token.copy_(token)
        self.position.copy_(position)
        self.slot.fill_(layers[0].length)
        layout = tuple((layer.buffer_address(), layer.capacity) for layer in layers)
        if layout != self._layout:  # new buffers: their unwritten slots get zeros, then a new graph
            for layer in layers:
                layer.clear_tail()
            if self.capture:
                self._record()
            self._layout = layout
        if self.capture:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        for layer in layers:
            layer.advance(1)
        self.fwd.ledger.grew(1)
        self.steps += 1
        return logits

    def _forward(self) -> torch.Tensor:
        """The static step: every shape fixed by the buffers' capacity, every offset a device tensor."""
        cap = self.cache.layers[0].capacity
        b = self.token.shape[0]
        live = torch.arange(cap, device=self.slot.device) <= self.slot  # the valid entries and this step's
        mask = live.view(1, 1, 1, cap).expand(b, 1, 1, cap)
        if self.float_mask:
            mask = torch.zeros(b, 1, 1, cap, dtype=self.dtype, device=self.slot.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        for layer in self.cache.layers:
            layer.static_slot = self.slot
        try:
            out = self.model(input_ids=self.token, position_ids=self.position, attention_mask=mask,
                             **self.fwd.kwargs)
        finally:
            for layer in self.cache.layers:
                layer.static_slot = None
        return out.logits

    def _record(self) -> None:
        """Warm up on a side stream (lazy initialisations stay out of the graph), then record.
        Both write this step's entry at the slot, the same values the replay writes."""
        self.graph = self.logits = None  # the old graph's memory pool goes before the new one is made
        device = self.slot.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward()
        self.graph = graph
        self.captures += 1
