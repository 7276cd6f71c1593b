"""Machine- and paste-friendly output: json, csv, markdown (pure Python, no rich).

Column names are stable; json and csv carry unrounded numbers, markdown the same
formatting as the rich tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from knormctl.render.summary import (
    METRIC, METRICS, SAMPLE_FIELDS, Comparison, Summary, fmt_change, fmt_value, run_datasets, sample_rows)

ROW_FIELDS = ("dataset", "config_key", "label", "press", "keep_ratio", "prune_after", "skip_layers",
              "compress_mode", "keep_recent", "n_samples", "n_failed")
CONFIG_COLUMNS = (
    ROW_FIELDS
    + tuple(c for m in METRICS for c in (m.name, m.change_column))
    + ("peak_mem_kind", "peak_mem_reason", "compressed_samples", "max_context_tokens", "paired")
)
RUN_COLUMNS = ("id", "command", "task", "model", "datasets", "status", "samples_done", "samples_failed",
               "samples_planned", "started_utc", "group_name")
COMPARE_COLUMNS = ("dataset", "config_key", "label") + tuple(
    c for m in METRICS for c in (f"{m.name}_a", f"{m.name}_b", f"{m.name}_ratio"))


def config_records(summary: Summary) -> list[dict[str, Any]]:
    out = []
    for r in summary.rows:
        rec = {c: getattr(r, c) for c in ROW_FIELDS}
        for m in METRICS:
            rec[m.name] = r.values[m.name]
            rec[m.change_column] = r.changes[m.name]
        rec.update(peak_mem_kind=r.peak_mem_kind, peak_mem_reason=r.peak_mem_reason,
                   compressed_samples=r.compressed_samples, max_context_tokens=r.max_context_tokens, paired=r.paired)
        out.append(rec)
    return out


def run_records(runs: Sequence[Any]) -> list[dict[str, Any]]:
    return [dict(id=r.id, command=r.command, task=r.task, model=r.model_requested, datasets=run_datasets(r),
                 status=r.status, samples_done=r.samples_done, samples_failed=r.samples_failed,
                 samples_planned=r.samples_planned,
                 started_utc=r.started_utc.isoformat(timespec="seconds") if r.started_utc else None,
                 group_name=r.group_name) for r in runs]


def compare_records(cmp: Comparison) -> list[dict[str, Any]]:
    out = []
    for r in cmp.rows:
        rec: dict[str, Any] = dict(dataset=r.dataset, config_key=r.config_key, label=r.label)
        for m in METRICS:
            rec.update({f"{m.name}_a": r.a[m.name], f"{m.name}_b": r.b[m.name], f"{m.name}_ratio": r.ratio[m.name]})
        out.append(rec)
    return out


def csv_text(columns: Sequence[str], records: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for rec in records:
        w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in rec.items()})
    return buf.getvalue()


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return ("" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _finite(obj: Any) -> Any:
    """NaN and inf have no JSON spelling: they become null (strict parsers reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def header_lines(summary: Summary) -> list[str]:
    """The run header as short 'name: value' lines (markdown, figure titles, rich panel)."""
    h = summary.header
    device = h.device or "?"
    if h.device_name:
        device += f" ({h.device_name}" + (f", {h.threads} threads" if h.threads else "") + ")"
    elif h.threads:
        device += f" ({h.threads} threads)"
    cells = (f"{h.samples_done} of {h.samples_planned} planned cells" if h.samples_planned is not None
             else f"{h.samples_done} cells") + (f", {h.samples_failed} failed" if h.samples_failed else "")
    lines = [
        f"{h.title} ({h.command}, task {h.task}): {h.status}" + (f", group {h.group_name}" if h.group_name else "")
        + (f", shard {h.shard}" if h.shard else ""),
        f"model: {h.model}" + (f" ({h.model_resolved})" if h.model_resolved and h.model_resolved != h.model else ""),
        f"dtype / device: {h.dtype or '?'} on {device}",
        f"versions: torch {h.torch_version or '?'}, transformers {h.transformers_version or '?'}, "
        f"knormctl {h.knormctl_version or '?'}" + (f" (commit {h.git_commit[:12]}{'+dirty' if h.git_dirty else ''})" if h.git_commit else ""),
        f"date: {(h.started_utc or '?').replace('T', ' ').rstrip('Z')} UTC"
        + (f", took {_duration(h.duration_s)}" if h.duration_s is not None else ", not finished") + f"; {cells}",
        f"timing noise: \u00b1{summary.noise_pct:.1f}% ({summary.noise_source})",
    ]
    return lines


def cell_text(row: Any, name: str) -> str:
    """'123.4 ms (-3.1%)' or 'N/A (reason)' for memory."""
    value = row.values[name]
    if value is None and name == "peak_mem_bytes" and row.peak_mem_reason:
        return f"N/A ({row.peak_mem_reason})"
    change = fmt_change(name, row.changes[name])
    return fmt_value(name, value) + (f" ({change})" if change else "")


def shown_metrics(summary: Summary) -> list[str]:
    """Metrics worth a column: passkey accuracy only for passkey runs; token match only when stored."""
    skip = set()
    if summary.header.task != "passkey":
        skip.add("accuracy")
    if all(r.values["token_match"] is None for r in summary.rows):
        skip.add("token_match")
    return [m.name for m in METRICS if m.name not in skip]


def to_json(summary: Summary, samples: Sequence[Any] | None = None) -> str:
    d = summary.to_dict()
    if samples is not None:
        d["samples"] = sample_rows(samples)
    return _json(d)


def to_csv(summary: Summary, samples: Sequence[Any] | None = None) -> str:
    if samples is not None:
        return csv_text(SAMPLE_FIELDS, sample_rows(samples))
    return csv_text(CONFIG_COLUMNS, config_records(summary))


def to_markdown(summary: Summary, samples: Sequence[Any] | None = None) -> str:
    names = shown_metrics(summary)
    lead = ["dataset"] if summary.by_dataset else []
    out = ["\n".join(f"- {line}" for line in header_lines(summary)), ""]
    out.append(markdown_table(
        lead + ["configuration", "samples", "failed"] + [METRIC[n].label for n in names],
        [([r.dataset] if summary.by_dataset else []) + [r.label, r.n_samples, r.n_failed] + [cell_text(r, n) for n in names]
         for r in summary.rows]))
    if summary.passkey:
        out.append(markdown_table(
            ["configuration", "length", "correct", "accuracy"],
            [[p.label, p.passkey_length, f"{p.correct}/{p.n}",
              fmt_value("accuracy", p.accuracy) + (f" ({fmt_change('accuracy', p.change_pp)})" if p.change_pp is not None else "")]
             for p in summary.passkey]))
    if summary.flags:
        out.append("\n".join(f"- **{f.kind.replace('_', ' ')}**: {f.message}" for f in summary.flags) + "\n")
    if samples is not None:
        recs = sample_rows(samples)
        out.append(markdown_table(SAMPLE_FIELDS, [[rec[c] for c in SAMPLE_FIELDS] for rec in recs]))
    return "\n".join(out)


def summary_text(summary: Summary, fmt: str, samples: Sequence[Any] | None = None) -> str:
    return {"json": to_json, "csv": to_csv, "markdown": to_markdown}[fmt](summary, samples)


def runs_text(runs: Sequence[Any], fmt: str) -> str:
    recs = run_records(runs)
    if fmt == "json":
        return _json(recs)
    if fmt == "csv":
        return csv_text(RUN_COLUMNS, recs)
    return markdown_table(RUN_COLUMNS, [[rec[c] for c in RUN_COLUMNS] for rec in recs])


def comparison_text(cmp: Comparison, fmt: str) -> str:
    if fmt == "json":
        return _json(cmp.to_dict())
    recs = compare_records(cmp)
    if fmt == "csv":
        return csv_text(COMPARE_COLUMNS, recs)
    names = [m.name for m in METRICS if any(r.a[m.name] is not None or r.b[m.name] is not None for r in cmp.rows)]
    rows = [[r.label] + [f"{fmt_value(n, r.a[n])} / {fmt_value(n, r.b[n])}"
                         + (f" (x{r.ratio[n]:.3f})" if r.ratio[n] is not None else "") for n in names]
            for r in cmp.rows]
    title = f"A = {cmp.a.title}, B = {cmp.b.title} (cells: A / B (B/A))\n\n"
    return title + markdown_table(["configuration"] + [METRIC[n].label for n in names], rows)
