"""Two runs side by side (``report --compare A B``): the configurations present in both,
their values and the ratio B/A (unpaired: the runs may have measured different prompts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from knormctl.render.header import RunHeader
from knormctl.render.metrics import METRICS
from knormctl.render.summary import Summary


@dataclass
class CompareRow:
    config_key: str
    label: str
    dataset: str | None
    a: dict[str, float | None]
    b: dict[str, float | None]
    ratio: dict[str, float | None]  # b / a


@dataclass
class Comparison:
    a: RunHeader
    b: RunHeader
    rows: list[CompareRow]
    only_in_a: list[str]
    only_in_b: list[str]
    notes: list[str] = field(default_factory=list)  # what the ratios cannot say

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def same_model(a: RunHeader, b: RunHeader) -> bool:
    if a.model_hash and b.model_hash:
        return a.model_hash == b.model_hash
    return (a.model_resolved or a.model) == (b.model_resolved or b.model)


def compare(sa: Summary, sb: Summary) -> Comparison:
    """The configurations present in both summaries, side by side, with ratios B/A."""
    index_a = {(r.dataset, r.config_key): r for r in sa.rows}
    index_b = {(r.dataset, r.config_key): r for r in sb.rows}
    rows = []
    for key, ra in index_a.items():
        rb = index_b.get(key)
        if rb is None:
            continue
        ratio = {m.name: (rb.values[m.name] / ra.values[m.name]
                          if ra.values[m.name] not in (None, 0) and rb.values[m.name] is not None else None)
                 for m in METRICS}
        rows.append(CompareRow(config_key=ra.config_key, label=ra.label, dataset=ra.dataset,
                               a=dict(ra.values), b=dict(rb.values), ratio=ratio))
    kinds = {k for r in (*sa.rows, *sb.rows) for k in (r.peak_mem_kind or "").split(", ") if k}
    notes = [CPU_PEAK_NOTE] if "cpu_process_rss_peak" in kinds else []
    return Comparison(a=sa.header, b=sb.header, rows=rows,
                      only_in_a=[r.config_key for k, r in index_a.items() if k not in index_b],
                      only_in_b=[r.config_key for k, r in index_b.items() if k not in index_a], notes=notes)


# glibc keeps freed heap in the process (returning it before each sample would move the page
# faults into the timed prefill), so a CPU peak includes what the process held before the sample
CPU_PEAK_NOTE = ("peak memory on the CPU is the process's RSS high-water mark, which carries what the process "
                 "held before each sample (the model's load, heap freed but kept): across two runs its ratio "
                 "shows their processes' histories as much as the presses; compare KV peak and KV final instead")
