"""A decode step at a fixed cache size, captured once as a CUDA graph and replayed (issue 16 item 1).

Why: on a GPU a decode step of an 8B model is a few hundred small kernels. Launched one by one
from Python they cost 2-6x the GPU's own work (issue 16 measured it on an H100); a CUDA graph
launches the whole step at once. A graph replays fixed kernels on fixed addresses, so the
step it records cannot read ``keys[:, :, :n]`` (a new shape every step). Instead:

- every layer's ``BufferLayer`` hands attention its WHOLE buffer (a fixed address and size)
  and writes the step's entry at its slot, held in a device tensor (``index_copy_``, as
  transformers' ``StaticLayer`` does), not at a Python offset; the slots move on the device
  (one ``add_`` after each step) and are written from the host only after a cut changed the
  lengths;
- each layer's attention gets a length mask, ``position < slot + 1``, computed on the device
  inside the step from that layer's slot and handed to its attention module by a pre-hook
  (layers may hold different counts: a skipped layer keeps everything);
- attention is ``static_attention`` (registered with transformers' ``AttentionInterface`` and
  switched on for the step only): two matmuls that read each key and value head ONCE for its
  group of query heads. transformers' SDPA path, given a mask on CUDA, first repeats every key
  and value head for each query head it serves (``repeat_kv``: at Llama-3.1-8B's 4 query heads
  per key head, 4 copies of the cache written and read per step), which would put a masked
  step far above the memory floor;
- the buffer is the compressed cache's: before a step, a buffer holding more than 1/8 extra
  slots beyond the valid entries and the tokens still to come is copied into a right-sized one
  (``BufferLayer.fit``: a prefill cut to keep 0.5 compacts in place, in the prompt-sized
  buffer), so the masked attention reads at most ``max_new_tokens`` (+1/8) hidden slots;
- the slots past the valid entries hold zeros, never a new buffer's uninitialised memory: a
  masked slot weighs exactly 0 in attention, but 0 x NaN is NaN;
- a graph is recorded again whenever a buffer moved or changed size (a cut that gathered into
  a new buffer, a growth); an in-place compaction keeps the addresses, and the masks,
  computed from the slots, follow the new lengths by themselves.

Where the step cannot be static it is run the ordinary way (``StaticStep.why_not``): per-head
masks (AdaKV: they grow with every step), presses that still observe the attention (their
hooks run Python on every step; checked by the loop), caches with other layer kinds.
``steps``/``captures`` count what ran where.

``capture=False`` runs the same static step without recording it: the path the CPU tests
compare with the reference (tokens identical), and the step a graph records.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from knormctl.engine.kvbuffer import BufferLayer

STATIC_ATTENTION = "knormctl_static"  # its name in transformers' AttentionInterface


def static_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """One decode query per row against a whole buffer: ``query`` (B, H, 1, d), ``key``/``value``
    (B, KV, cap, d), ``attention_mask`` (B, 1, 1, cap) boolean, True where an entry is live.
    Query heads are grouped under their key head (H = KV x g), so each key and value is read
    once per step, not once per query head; the scores in the model's dtype (as transformers'
    eager attention: a float32 product would need an upcast copy of the whole buffer, or
    ``bmm(out_dtype=)``, which is CUDA-only), scaled, masked and softmaxed in float32. Returns the
    (B, 1, H, d) output transformers' attention functions return, and no weights. Arguments in
    transformers' order (kvpress's wrapper of every registered function passes ``dropout`` 6th)."""
    if query.shape[2] != 1 or dropout or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise ValueError("the static decode step handles one query per row, without dropout, softcap or sinks")
    b, h, _, d = query.shape
    kv, cap = key.shape[1], key.shape[2]
    scale = d ** -0.5 if scaling is None else scaling
    q = query.reshape(b, kv, h // kv, d)  # the query heads each key head serves
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (B, KV, g, cap)
    scores = scores.masked_fill(~attention_mask.view(b, 1, 1, cap), float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)  # (B, KV, g, d)
    return out.reshape(b, h, 1, d).transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(STATIC_ATTENTION, static_attention)


class StaticStep:
    """One-token decode steps through ``fwd`` (``loop.CachedForward``: its model, cache, keyword
    arguments and ledger) for a batch of ``batch`` rows, recorded as a CUDA graph when ``capture``."""

    def __init__(self, fwd, batch: int, device: torch.device, capture: bool):
        from knormctl.engine.observe import attention_modules

        self.fwd, self.model, self.cache, self.capture = fwd, fwd.model, fwd.cache, capture
        _register()
        self._mods = attention_modules(self.model)
        self._configs = list({id(m.config): m.config for m in self._mods}.values())  # switched for the step
        n_layers = len(self.cache.layers)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slots = torch.zeros(n_layers, dtype=torch.long, device=device)  # each layer's write slot = its count
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._layout: tuple | None = None  # the buffers (addresses, capacities) the step last ran on
        self._lengths: tuple | None = None  # the counts self.slots holds
        self._masks: list[torch.Tensor] = []  # this step's per-layer masks (while it runs)
        self.steps = 0  # decode steps run as the static step, replayed or not
        self.captures = 0  # graphs recorded

    def why_not(self) -> str | None:
        """Why the next step cannot be the static one (None: it can). First copies entries assigned
        from outside (kvpress's hook assigns the cut ones) into the buffers the step reads."""
        layers = self.cache.layers
        if not all(isinstance(layer, BufferLayer) for layer in layers):
            return "a cache layer is not a knormctl buffer"
        for layer in layers:
            layer.take_assigned()
        if any(getattr(layer, "live_mask", None) is not None for layer in layers):
            return "per-head masks (they grow with every step)"
        if any(layer.capacity == 0 or layer.length >= layer.capacity for layer in layers):
            return "a buffer is full"
        return None

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The (B, 1, V) logits of feeding ``token`` at ``position``; every layer grows by one.
        Valid until the next call (a graph's output lives at a fixed address)."""
        layers = self.cache.layers
        self.token.copy_(token)
        self.position.copy_(position)
        for layer in layers:
            layer.fit()  # a buffer kept at the prompt's size by an in-place cut: right-sized, as the step reads it all
        lengths = tuple(layer.length for layer in layers)
        if lengths != self._lengths:  # the first step, or a cut changed the counts
            self.slots.copy_(torch.tensor(lengths, dtype=torch.long))
        layout = tuple((layer.buffer_address(), layer.capacity) for layer in layers)
        if layout != self._layout:  # new buffers: their unwritten slots get zeros, then a new graph
            for layer in layers:
                layer.clear_tail()
            if self.capture:
                self._record()
            self._layout = layout
        if self.capture:
            on = self.slots.device  # replay on that device's stream (cuda:1 too); a test's stand-in: the CPU
            with torch.cuda.device(on) if on.type == "cuda" else nullcontext():
                self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        self.slots.add_(1)
        for layer in layers:
            layer.advance(1)
        self._lengths = tuple(n + 1 for n in lengths)
        self.fwd.ledger.grew(1)
        self.steps += 1
        return logits

    def _forward(self) -> torch.Tensor:
        """The static step, with ``static_attention`` switched on and each layer's mask handed to
        its attention module (host-side set-up: none of it is recorded)."""
        layers, configs = self.cache.layers, self._configs
        before = [cfg._attn_implementation_internal for cfg in configs]
        hooks = [m.register_forward_pre_hook(lambda mod, a, kw, i=i: self._hand_mask(i, a, kw), with_kwargs=True)
                 for i, m in enumerate(self._mods)]
        for i, layer in enumerate(layers):
            layer.static_slot = self.slots[i:i + 1]
        for cfg in configs:  # the attribute itself: the property's setter also rewrites sub-configs
            cfg._attn_implementation_internal = STATIC_ATTENTION
        try:
            return self._step()
        finally:
            for cfg, impl in zip(configs, before):
                cfg._attn_implementation_internal = impl
            for h in hooks:
                h.remove()
            for layer in layers:
                layer.static_slot = None
            self._masks = []

    def _step(self) -> torch.Tensor:
        """What the graph records: every shape fixed by the buffers' capacities, every offset a
        device tensor (tests/test_graphstep.py traces it as one graph)."""
        self._masks = [self._mask(i, layer.capacity) for i, layer in enumerate(self.cache.layers)]
        out = self.model(input_ids=self.token, position_ids=self.position, attention_mask=self._masks[0],
                         **self.fwd.kwargs)  # a 4D mask: transformers builds none of its own
        return out.logits

    def _mask(self, i: int, cap: int) -> torch.Tensor:
        """(B, 1, 1, cap): layer ``i``'s valid entries and this step's, from its slot on the device."""
        live = torch.arange(cap, device=self.slots.device) <= self.slots[i]
        return live.view(1, 1, 1, cap).expand(self.token.shape[0], 1, 1, cap)

    def _hand_mask(self, i: int, args, kwargs):
        kwargs["attention_mask"] = self._masks[i]
        return args, kwargs

    def _record(self) -> None:
        """Warm up on a side stream (lazy initialisations stay out of the graph), then record.
        Both write this step's entries at the slots, the same values the replay writes."""
        self.graph = self.logits = None  # the old graph's memory pool goes before the new one is made
        device = self.slots.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # on the model's device's side stream: torch.cuda.graph's default stream belongs to the
        # current device, which for a model on cuda:1 would record nothing of its kernels
        before = torch.cuda.current_stream(device)
        try:
            with torch.cuda.device(device), torch.cuda.graph(graph, stream=stream):
                self.logits = self._forward()
        except BaseException:
            # a failed recording: torch.cuda.graph's exit raises in capture_end() before it gives
            # the stream back, so the process would go on queueing its work on the side stream
            with torch.cuda.device(device):  # set_stream also makes the stream's device current
                torch.cuda.set_stream(before)
            try:
                torch.cuda.synchronize(device)
            except Exception:  # noqa: BLE001 -- the recording's own error is the one to report
                pass
            raise
        self.graph = graph
        self.captures += 1
