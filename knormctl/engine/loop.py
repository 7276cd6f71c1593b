"""The ONE generation loop: prefill, then one token per step, every configuration alike.

"No press" is the baseline: the same code path with nothing evicted, so the
timing of the reference and of every press is measured the same way. Every
forward gets explicit absolute ``position_ids`` -- after eviction the cache length
no longer tells the position, and without them RoPE would be applied wrongly --
and is followed by a check that the cache grew by exactly the tokens fed
(``kvcache.CacheLedger``: a transformers version that ignores the cache fails
loudly instead of generating garbage).
"""

from __future__ import annotations

import inspect

import torch

from knormctl.config import PressConfig
from knormctl.engine.batch import RowPicker, as_batch_ids, batch_refusal, question_block, row_seeds
from knormctl.engine.compress import Compressor, kv_held_bytes, kv_size, layer_budget
from knormctl.engine.presses.base import chunked_prefill_refusal
from knormctl.engine.kvcache import CacheLedger, cache_kwargs, check_cut_supported, new_cache, num_layers
from knormctl.engine.result import GenerationResult, MemoryPeak
from knormctl.engine.timing import MemoryProbe, StepClock, model_device, model_devices, synchronizer
from knormctl.errors import UsageError
from knormctl.stats import Latency


def as_input_ids(input_ids, device: torch.device) -> torch.Tensor:
    """One sequence (a list of ids or a (1, S) / (S,) tensor) as (1, S) long on ``device``: the
    perplexity paths, which run one prompt at a time (``batch.as_batch_ids``, one row)."""
    ids = as_batch_ids(input_ids, device)
    if ids.shape[0] != 1:
        raise UsageError(f"input_ids must be one sequence (batch size 1), got shape {tuple(ids.shape)}")
    return ids


def forward_kwargs(model) -> dict:
    """Only the last position's logits are needed while generating (as generate() does)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


class CachedForward:
    """``model(...)`` reading and filling one cache, with the cache checked after every call.

    ``fwd(ids, positions)`` runs a forward of ``ids`` at absolute ``positions``;
    ``fwd.cut_done()`` tells the ledger that the compressor changed the lengths.
    """

    def __init__(self, model, cache, last_logits_only: bool = True):
        self.model, self.cache = model, cache
        self.kwargs = {**cache_kwargs(model, cache), **(forward_kwargs(model) if last_logits_only else {})}
        self.ledger = CacheLedger(model, cache)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, may_shrink: bool = False):
        out = self.model(input_ids=ids, position_ids=positions, **self.kwargs)
        self.ledger.grew(ids.shape[1], may_shrink)  # may_shrink: a press cut inside this forward
        return out

    def cut_done(self) -> None:
        self.ledger.rebase()


def cutter(comp: Compressor, fwd: CachedForward, prompt_len: int, prefill_chunk: int):
    """``cut(prefill, last_chunk=True)``: the press's cut after a forward, the ledger told when
    something was evicted. With a chunked prefill in prefill mode every prefill cut keeps what a
    cut of the whole prompt would (``of_length``)."""
    whole = prompt_len if prefill_chunk and comp.cfg.mode == "prefill" else None

    def cut(prefill: bool, last_chunk: bool = True) -> None:
        if comp.after_forward(fwd.cache, prefill=prefill, of_length=whole if prefill else None,
                              last_chunk=last_chunk):
            fwd.cut_done()

    return cut


@torch.inference_mode()
def run_generation(model, input_ids, cfg: PressConfig, max_new_tokens: int, *, sampling: bool = False,
                   temperature: float = 1.0, seed: int | list[int] = 0, tokenizer=None,
                   question_ids=None, kv_buffer: bool = True, prefill_chunk: int = 0,
                   stop_ids=None, decode_step: str = "launched") -> GenerationResult:
    """Generate ``max_new_tokens`` tokens (EOS does not stop: every configuration
    generates the same count, so timings compare) under the press ``cfg``.

    ``stop_ids``: stop after the first token among them (it is kept in ``token_ids``).
    For runs that only score answers: an answer is scored up to its first EOS anyway
    (``tasks.scoring.answer_text``), so the tokens after it cost time and change nothing;
    the latency fields then cover fewer tokens and do not compare across configurations.

    Without ``question_ids``: TTFT = start of the prefill forward until the first token
    id is known. The post-prefill cut (if any) happens after that, and its time counts in
    the first inter-token latency -- compression cannot change prefill time. On one CUDA
    device every time comes from CUDA events, with no host sync between steps
    (``timing.StepClock``); elsewhere from the host clock after a device sync.

    With ``question_ids`` (question tasks, kvpress's protocol): ``input_ids`` is the part
    that may be compressed; after its prefill and the cut, ``question_ids`` are fed in one
    forward (never cut before they are seen) and the first token comes from that forward,
    so every answer token sees the compressed cache. TTFT then spans prefill, cut and
    question forward.

    ``seed``: the sample's seed -- seeds sampling, and (hashed with the configuration,
    ``compress.press_seed``) the random press. The cut after the last forward is skipped:
    no token reads it. Models whose cache the cut cannot handle exactly are refused
    (``kvcache.cut_refusal``) when ``cfg`` can evict.

    ``kv_buffer``: the cache appends and compacts in place in a buffer sized to the tokens
    this generation feeds (engine/kvbuffer.py); False: transformers' ``DynamicCache``, which
    copies the whole cache every step -- kept as the reference the tests compare tokens and
    kept sets with.

    Batches (issue 16 item 3; engine/batch.py): ``input_ids`` (B, S) -- a tensor or B equal-length
    lists -- runs B prompts together under the same press; ``question_ids`` one sequence (every
    row's) or B equal-length rows; ``seed`` an int (every row's) or one per row. Row j generates
    what prompt j generates alone with its seed. ``stop_ids`` with B > 1: the loop stops once EVERY
    row has produced a stop id; a row that stopped earlier keeps generating (its tokens after the
    stop are kept in ``rows``; scoring cuts an answer at its first EOS anyway).

    ``prefill_chunk`` (> 0): ``input_ids`` is prefilled ``prefill_chunk`` tokens at a time and
    the press cuts after every chunk once a layer holds more than its budget (see ``prefill``),
    so the cache never holds more than the budget plus one chunk. TTFT then includes those cuts.

    ``decode_step`` (engine/graphstep.py): "launched" -- each decode step a plain forward, the
    model's own attention over the valid entries; "static" -- a fixed-shape step over the whole
    (right-sized) buffer with knormctl's grouped attention under a length mask, any device;
    "graph" -- that static step recorded once as a CUDA graph and replayed (recorded again
    after a cut moved the buffers; the step that records also pays for it). Steps the static
    step cannot take (observing presses, per-head masks) run launched; ``static_steps`` and
    ``graph_captures`` in the result count what ran where.
    """
    if max_new_tokens < 1:
        raise UsageError("max_new_tokens must be >= 1")
    device = model_device(model)
    ids = as_batch_ids(input_ids, device)
    batch, prompt_len = ids.shape
    q_ids = question_block(question_ids, batch, device)
    q_len = 0 if q_ids is None else q_ids.shape[1]
    seeds = row_seeds(seed, batch)
    if not cfg.is_baseline and cfg.keep_ratio < 1.0:
        check_cut_supported(model)
    if prefill_chunk < 0:
        raise UsageError(f"prefill_chunk must be >= 0, got {prefill_chunk}")
    devices = model_devices(model)
    sync = synchronizer(devices)
    pick = RowPicker(sampling, temperature, seeds)
    positions = torch.arange(prompt_len + q_len + max_new_tokens, device=device).unsqueeze(0).expand(batch, -1)
    rest = q_len + max_new_tokens - 1  # tokens fed after the prompt
    holds = chunk_holds(cfg, model, prompt_len, prefill_chunk, rest) if prefill_chunk else None
    cache = new_cache(model, capacity=prompt_len + rest, buffered=kv_buffer, holds=holds)
    fwd = CachedForward(model, cache)
    static = static_step_for(decode_step, fwd, batch, devices, kv_buffer)
    probe = MemoryProbe(devices)
    clock = StepClock(devices)
    comp = Compressor(cfg, num_layers(model), sync=sync, model=model,  # last: it may hook the model
                      seed=seeds[0] if batch == 1 else seeds)
    if batch > 1 and comp.evicts and (why := batch_refusal(comp.press)) is not None:
        comp.close()
        raise UsageError(f"batch size {batch}: {why}")
    if prefill_chunk and comp.evicts and (why := chunked_prefill_refusal(comp.press)) is not None:
        comp.close()
        raise UsageError(f"--prefill-chunk: {why}")
    cut = cutter(comp, fwd, prompt_len, prefill_chunk)
    kv_entries_peak = kv_bytes_peak = held_peak = 0

    def account() -> None:  # the cache as it stands after a forward, before any cut: that is the peak
        nonlocal kv_entries_peak, kv_bytes_peak, held_peak
        held_peak = max(held_peak, kv_held_bytes(cache))
        entries, nbytes = kv_size(cache)
        kv_entries_peak, kv_bytes_peak = max(kv_entries_peak, entries), max(kv_bytes_peak, nbytes)

    try:
        probe.start()
        clock.start()
        if prefill_chunk and prompt_len > prefill_chunk:
            out = prefill(fwd, ids, positions[:, :prompt_len], prefill_chunk, account, cut)
        else:
            out = fwd(ids, positions[:, :prompt_len], may_shrink=comp.cuts_in_forward)
        if q_ids is not None:
            account()
            cut(prefill=True)  # the question is read through the compressed cache
            out = feed(fwd, q_ids, positions[:, prompt_len:prompt_len + q_len])
        token = pick(out.logits)
        clock.mark()  # the first token is known: TTFT
        tokens = [token]
        start = prompt_len + q_len
        # on the tokens' device (a mapped model's last device may not be its first)
        stops = torch.tensor(sorted({int(i) for i in stop_ids}), device=token.device) if stop_ids else None
        stopped = torch.zeros(batch, dtype=torch.bool, device=token.device)
        for step in range(1, max_new_tokens):
            if stops is not None:  # bool(): a device sync, paid only when asked to stop
                stopped |= torch.isin(token[:, 0], stops)
                if bool(stopped.all()):
                    break
            account()
            cut(prefill=(step == 1 and q_ids is None))
            pos = start + step - 1
            if static is not None and not comp.observing and static.why_not() is None:
                logits = static(token, positions[:, pos:pos + 1])
            else:
                logits = fwd(token, positions[:, pos:pos + 1]).logits
            token = pick(logits)
            tokens.append(token)
            clock.mark()
        # No cut after the last forward: no token would ever read it, so it would only add
        # an event, compress time and a smaller "final" cache that nothing used.
        account()
        marks = clock.offsets()
        memory = probe.stop()
    finally:
        comp.close()
    kv_entries_final, kv_bytes_final = kv_size(cache)
    ttft, total = marks[0], marks[-1]
    steps = [b - a for a, b in zip(marks, marks[1:])]
    res = _result(tokens, tokenizer, prompt_len, ttft, steps, total, memory, kv_bytes_peak, kv_bytes_final,
                  kv_entries_peak, kv_entries_final, comp)
    res.kv_bytes_held_peak = held_peak
    if static is not None:
        res.static_steps, res.graph_captures = static.steps, static.captures
    return res


def static_step_for(mode: str, fwd: CachedForward, batch: int, devices, kv_buffer: bool):
    """The static decode step ``mode`` asks for (None: "launched"); a usage error where it cannot run."""
    from knormctl.options import DECODE_STEPS

    if mode not in DECODE_STEPS:
        raise UsageError(f"decode_step must be one of {', '.join(DECODE_STEPS)}, got {mode!r}")
    if mode == "launched":
        return None
    why = None
    where = "+".join(str(d) for d in devices)
    if not kv_buffer:
        why = "the reference DynamicCache path has no fixed buffer"
    elif len(devices) != 1:
        why = f"it needs the model on one device (it is on {where})"
    elif mode == "graph" and devices[0].type != "cuda":
        why = f"a CUDA graph needs the model on one CUDA device (it is on {where})"
    if why is not None:
        raise UsageError(f"--decode-step {mode}: {why}")
    from knormctl.engine.graphstep import StaticStep

    return StaticStep(fwd, batch, devices[0], capture=mode == "graph")


def chunk_holds(cfg: PressConfig, model, prompt_len: int, chunk: int, rest: int) -> list[int | None] | None:
    """Per layer, the most entries it holds at once when a chunked prefill cuts after every chunk
    (prefill mode): its budget + one chunk (a prompt within ``prune_after``: the whole prompt, never cut) + the
    tokens after the prompt. The buffer is sized to that rather than to the whole prompt, so the
    chunked prefill's bound holds for the memory allocated, not only for the entries counted.
    None where a layer is never cut (skipped) or the mode cuts by another rule (decode)."""
    if cfg.is_baseline or cfg.keep_ratio >= 1.0 or cfg.mode != "prefill" or prompt_len <= chunk:
        return None
    from knormctl.engine.presses import make_press

    press = make_press(cfg.press, n_sink=cfg.n_sink, keep_ratio=cfg.keep_ratio, params=dict(cfg.params))
    if press is None or press.cuts_in_forward:
        return None
    n_layers = num_layers(model)
    holds: list[int | None] = []
    for i in range(n_layers):
        if i in cfg.skip_layers:
            holds.append(None)
            continue
        budget = layer_budget(press, i, prompt_len, n_layers, cfg.keep_ratio)
        # a prompt within prune_after is never cut; a longer one is cut after every chunk
        most = prompt_len if prompt_len <= cfg.prune_after else budget + chunk
        holds.append(min(prompt_len, most) + rest)
    return holds


def prefill(fwd: CachedForward, ids: torch.Tensor, positions: torch.Tensor, chunk: int, account, cut):
    """Prefill ``ids`` ``chunk`` tokens at a time, the press cutting after every chunk but the last
    (the loop's own post-prefill cut follows it), so a layer never holds more than its budget
    plus one chunk: the peak KV memory is bounded by the budget, not by the prompt (issue 16
    item 2; kvpress issue #178). ``account`` records the cache before each cut (the peak).

    A query-aware press scores each chunk's entries with that chunk's own queries, and later
    chunks attend to a cache already cut: chunked prefill keeps what the press picks with the
    information it has at each chunk, not necessarily the set a one-forward prefill keeps.
    """
    n = ids.shape[1]
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        out = feed(fwd, ids[:, start:end], positions[:, start:end])
        if end < n:
            account()
            cut(prefill=True, last_chunk=False)
    return out


def uniform_lengths(cache) -> bool:
    """True when every layer holds the same number of entries (no skipped layers after a cut)."""
    return len({layer.keys.shape[-2] for layer in cache.layers if layer.keys is not None}) <= 1


def feed(fwd: CachedForward, ids: torch.Tensor, positions: torch.Tensor, stepwise: bool | None = None):
    """Feed ``ids`` into the cache in one forward. Layers of different lengths (skip_layers after
    a cut) get a causal mask each (``uneven.layer_mask_hooks``); where they cannot, or with
    ``stepwise=True``, the tokens go one at a time, which needs no mask and gives the same
    logits (tests/test_protocols.py)."""
    if stepwise is None:
        stepwise = not uniform_lengths(fwd.cache)
        if stepwise and ids.shape[1] > 1:
            from knormctl.engine.uneven import layer_mask_hooks

            hooks = layer_mask_hooks(fwd.model, fwd.cache, ids.shape[1])
            if hooks is not None:
                try:
                    return fwd(ids, positions)
                finally:
                    for h in hooks:
                        h.remove()
    if not stepwise:
        return fwd(ids, positions)
    for k in range(ids.shape[1]):
        out = fwd(ids[:, k:k + 1], positions[:, k:k + 1])
    return out


def _result(tokens, tokenizer, prompt_len, ttft, steps, total, memory: MemoryPeak, kvb_peak, kvb_final, kve_peak,
            kve_final, comp) -> GenerationResult:
    """The batch's result: row 0 in ``token_ids``/``text``, every row in ``rows``/``row_texts``;
    times are the batch step's; KV bytes the whole batch's (``GenerationResult.split``)."""
    rows = torch.cat(tokens, dim=1).tolist()
    texts = [tokenizer.decode(r, skip_special_tokens=True) if tokenizer is not None else "" for r in rows]
    lat = Latency.from_values(steps)
    n = len(rows[0])
    return GenerationResult(
        token_ids=rows[0],
        text=texts[0],
        prompt_tokens=prompt_len,
        new_tokens=n,
        ttft_s=ttft,
        step_latencies_s=steps,
        total_s=total,
        tpot_s=lat.mean,
        itl_p50_s=lat.p50,
        itl_p90_s=lat.p90,
        itl_p99_s=lat.p99,
        throughput_tps=len(rows) * n / total if total > 0 else 0.0,
        memory=memory,
        kv_bytes_peak=kvb_peak,
        kv_bytes_final=kvb_final,
        kv_entries_peak=kve_peak,
        kv_entries_final=kve_final,
        compress_events=comp.events,
        compress_time_s=comp.seconds,
        batch_size=len(rows),
        rows=rows,
        row_texts=texts,
    )
