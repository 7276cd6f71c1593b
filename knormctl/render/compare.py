"""Two runs side by side (``report --compare A B``): the configurations present in both,
their values and the ratio B/A (unpaired: the runs may have measured different prompts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    return Comparison(a=sa.header, b=sb.header, rows=rows,
                      only_in_a=[r.config_key for k, r in index_a.items() if k not in index_b],
                      only_in_b=[r.config_key for k, r in index_b.items() if k not in index_a])
