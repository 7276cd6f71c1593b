"""Plain result objects returned by the engine (no torch tensors inside)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class MemoryPeak:
    """Peak memory of one sample. ``bytes`` is None when the device cannot say; ``reason`` says why."""

    bytes: int | None
    kind: str  # e.g. "cuda_max_memory_allocated", "cpu_rss_hwm", "n/a"
    reason: str | None = None


@dataclass
class GenerationResult:
    """Everything measured for one prompt -- or one batch of equal-length prompts -- under one
    press configuration.

    A batch (``batch_size`` B > 1): ``rows``/``row_texts`` hold every row's tokens, and
    ``token_ids``/``text`` are row 0 (so B = 1 reads as before). Times are the batch step's
    (what each row's user waits): TTFT, TPOT, latencies; ``throughput_tps`` is the batch's,
    B x new_tokens / total_s. ``kv_bytes_*`` are the whole batch's bytes; ``kv_entries_*`` count
    positions summed over layers, the same for every row. ``split()`` gives one result per row.
    """

    token_ids: list[int]
    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    step_latencies_s: list[float]  # one per decode step after the first token
    total_s: float
    tpot_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    itl_p99_s: float | None
    throughput_tps: float
    memory: MemoryPeak
    kv_bytes_peak: int
    kv_bytes_final: int
    kv_entries_peak: int
    kv_entries_final: int
    compress_events: int
    compress_time_s: float
    ppl_compressed: float | None = None
    eval_tokens: int = 0
    extra: dict = field(default_factory=dict)
    kv_bytes_held_peak: int = 0  # bytes the cache's buffers held at the peak (room for later tokens included)
    batch_size: int = 1
    rows: list[list[int]] = field(default_factory=list)  # every row's token ids (B = 1: [token_ids])
    row_texts: list[str] = field(default_factory=list)
    static_steps: int = 0  # decode steps run as the static step (engine/graphstep.py), replayed or not
    graph_captures: int = 0  # CUDA graphs recorded

    def split(self) -> list[GenerationResult]:
        """One result per row, ``batch_size`` kept at B: the row's tokens and text; the batch's
        timing and memory peak (shared: the rows ran together); KV bytes = the batch's / B (each
        row holds the same count of entries of the same size); ``throughput_tps`` = the row's
        tokens / total_s (per-row tokens/s: B times it is the batch's)."""
        rows = self.rows or [self.token_ids]
        texts = self.row_texts or [self.text]
        b = len(rows)
        return [replace(self, token_ids=list(r), text=t, new_tokens=len(r), rows=[list(r)], row_texts=[t],
                        step_latencies_s=list(self.step_latencies_s), extra=dict(self.extra),
                        memory=replace(self.memory),
                        throughput_tps=len(r) / self.total_s if self.total_s > 0 else 0.0,
                        kv_bytes_peak=self.kv_bytes_peak // b, kv_bytes_final=self.kv_bytes_final // b,
                        kv_bytes_held_peak=self.kv_bytes_held_peak // b)
                for r, t in zip(rows, texts)]

    def to_dict(self) -> dict:
        return asdict(self)
