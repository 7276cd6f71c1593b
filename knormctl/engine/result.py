"""Plain result objects returned by the engine (no torch tensors inside)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class MemoryPeak:
    """Peak memory of one sample. ``bytes`` is None when the device cannot say; ``reason`` says why."""

    bytes: int | None
    kind: str  # e.g. "cuda_max_memory_allocated", "cpu_rss_hwm", "n/a"
    reason: str | None = None


@dataclass
class GenerationResult:
    """Everything measured for one prompt under one press configuration."""

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

    def to_dict(self) -> dict:
        return asdict(self)
