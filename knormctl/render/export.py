"""Machine- and paste-friendly output: json, csv, markdown (pure Python, no rich).

Column names are stable; json and csv carry unrounded numbers, markdown the same
formatting as the rich tables. Every number comes from the ``Summary``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from knormctl.render.compare import Comparison
from knormctl.render.format import (DELTA, fmt_accuracy, fmt_change, fmt_duration, fmt_interval, fmt_pct_interval,
                                    fmt_pp, fmt_value)
from knormctl.render.header import Machine
from knormctl.render.metrics import METRIC, METRICS
from knormctl.render.summary import SAMPLE_FIELDS, Summary, run_datasets, sample_rows
from knormctl.render.tasks import TaskRow

ROW_FIELDS = ("dataset", "config_key", "label", "press", "keep_ratio", "prune_after", "skip_layers",
              "compress_mode", "keep_recent", "n_samples", "n_failed", "n_prompts", "n_repeats")


def metric_columns(name: str) -> tuple[str, ...]:
    """The csv columns of one metric: value, its interval, change, its interval, verdict, prompts needed."""
    m = METRIC[name]
    return (name, f"{name}_ci_lo", f"{name}_ci_hi", m.change_column, f"{name}_change_ci_lo", f"{name}_change_ci_hi",
            f"{name}_verdict", f"{name}_n_needed")


CONFIG_COLUMNS = (
    ROW_FIELDS
    + tuple(c for m in METRICS for c in metric_columns(m.name))
    + ("peak_mem_kind", "peak_mem_reason", "na_reasons", "compressed_samples", "max_context_tokens", "paired")
)
TASK_COLUMNS = ("task", "subtask", "context_length", "config_key", "label", "press", "keep_ratio", "is_reference",
                "score_metric", "n", "n_subtasks", "correct", "accuracy", "accuracy_ci_lo", "accuracy_ci_hi",
                "interval_method", "reference_accuracy", "change_pp", "change_ci_lo", "change_ci_hi", "verdict",
                "n_needed", "near_chance")
RUN_COLUMNS = ("id", "command", "task", "model", "datasets", "status", "samples_done", "samples_failed",
               "samples_planned", "started_utc", "group_name")
COMPARE_COLUMNS = ("dataset", "config_key", "label", "only_in") + tuple(
    c for m in METRICS for c in (f"{m.name}_a", f"{m.name}_b", f"{m.name}_ratio"))


def _lo_hi(interval) -> tuple[float | None, float | None]:
    return (None, None) if interval is None else (interval[0], interval[1])


def config_records(summary: Summary) -> list[dict[str, Any]]:
    out = []
    for r in summary.rows:
        rec = {c: getattr(r, c) for c in ROW_FIELDS}
        for m in METRICS:
            n = m.name
            lo, hi = _lo_hi(r.intervals[n])
            clo, chi = _lo_hi(r.change_intervals[n])
            rec.update({n: r.values[n], f"{n}_ci_lo": lo, f"{n}_ci_hi": hi, m.change_column: r.changes[n],
                        f"{n}_change_ci_lo": clo, f"{n}_change_ci_hi": chi, f"{n}_verdict": r.verdicts[n],
                        f"{n}_n_needed": r.n_needed[n]})
        rec.update(peak_mem_kind=r.peak_mem_kind, peak_mem_reason=r.peak_mem_reason,
                   na_reasons="; ".join(f"{k}: {v}" for k, v in r.na_reasons.items()) or None,
                   compressed_samples=r.compressed_samples, max_context_tokens=r.max_context_tokens, paired=r.paired)
        out.append(rec)
    return out


def task_records(summary: Summary) -> list[dict[str, Any]]:
    out = []
    for t in summary.tasks:
        rec = {c: getattr(t, c, None) for c in TASK_COLUMNS}
        rec["accuracy_ci_lo"], rec["accuracy_ci_hi"] = _lo_hi(t.interval)
        rec["change_ci_lo"], rec["change_ci_hi"] = _lo_hi(t.change_interval)
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
    # configurations only one run measured: a row each, empty but for which run has them (the
    # table and json list them; a csv that dropped them read as if both runs held the same set)
    out += [dict(config_key=k, only_in=side) for side, keys in (("A", cmp.only_in_a), ("B", cmp.only_in_b))
            for k in keys]
    return out


def csv_text(columns: Sequence[str], records: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for rec in records:
        w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in rec.items()})
    return buf.getvalue()


def md_escape(text: Any) -> str:
    """Text for markdown, where a model path or group name is data, not markup: '&' and '<'
    escaped (a group named '<script>...' passed through a CommonMark renderer as HTML)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return md_escape("" if v is None else v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
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


def _machine_text(m: Machine) -> str:
    device = m.device or "?"
    threads = f"{m.threads} thread{'s' if m.threads != 1 else ''}" if m.threads else ""
    if m.device_name:
        device += f" ({m.device_name}" + (f", {threads}" if threads else "") + ")"
    elif threads:
        device += f" ({threads})"
    commit = f" (commit {m.git_commit[:12]}{'+dirty' if m.git_dirty else ''})" if m.git_commit else ""
    return (f"{m.dtype or '?'} on {device}; torch {m.torch_version or '?'}, transformers "
            f"{m.transformers_version or '?'}, knormctl {m.knormctl_version or '?'}{commit}")


DECODE_STEP_NOTE = {  # what the timings measure, when it is not the model's own attention launched step by step
    "static": ", decode step static (knormctl's attention)",
    "graph": ", decode steps replayed from CUDA graphs",
    None: ", decode steps differ between runs",
}


def header_lines(summary: Summary) -> list[str]:
    """The run header as short 'name: value' lines (markdown, figure titles, rich panel)."""
    h = summary.header
    cells = h.cells_text
    lines = [
        f"{h.title} ({h.command}, task {h.task}): {h.status}" + (f", group {h.group_name}" if h.group_name else "")
        + (f", shard {h.shard}" if h.shard else "")
        + (f", batch {h.batch_size} (throughput per row; x{h.batch_size} per batch)" if h.batch_size > 1 else "")
        + (f", prefill in chunks of {h.prefill_chunk} tokens (cut after each)" if h.prefill_chunk else "")
        + (", prefill chunks differ between runs" if h.prefill_chunk is None else "")
        + DECODE_STEP_NOTE.get(h.decode_step, ""),
        f"model: {h.model}" + (f" ({h.model_resolved})" if h.model_resolved and h.model_resolved != h.model else ""),
    ]
    if h.task_settings:
        lines.append(f"{h.task}: {h.task_settings}")
    if len(h.machines) == 1:
        m = h.machines[0]
        lines.append(f"machine: {m.hostname + ': ' if m.hostname else ''}{_machine_text(m)}")
    else:
        lines.append(f"machines: {len(h.machines)} (they differ: see the flags)")
        for m in h.machines:
            runs = ",".join(map(str, m.run_ids))
            lines.append(f"  runs {runs}: {m.hostname + ': ' if m.hostname else ''}{_machine_text(m)}")
    lines += [
        f"date: {(h.started_utc or '?').replace('T', ' ').rstrip('Z')} UTC"
        + (f", took {fmt_duration(h.duration_s)}" if h.duration_s is not None else ", not finished")
        + _stopped_text(h) + f"; {cells}",
        f"timing noise: \u00b1{summary.noise_pct:.1f}% ({summary.noise_source})",
    ]
    return lines


def _stopped_text(h) -> str:
    if not h.stopped_s:
        return ""
    if len(h.run_ids) == 1:
        return f" (and sat stopped {fmt_duration(h.stopped_s)} before a resume, not counted)"
    return f" (first start to last end; runs sat stopped {fmt_duration(h.stopped_s)} before resumes)"


LEGEND = (f"Each cell: the median over prompts (mean for fractions); {DELTA} paired = the median over prompts of "
          f"each prompt's change against the full cache on the same prompt (so it need not equal the change "
          f"between the two medians shown), fractions in percentage points; [low, high] = its 95% bootstrap "
          f"interval.")


def legend_lines(summary: Summary) -> list[str]:
    return [LEGEND, f"Colours: green better, red worse, grey no detectable difference (the interval contains 0, "
                    f"or a timing change within this run's noise \u00b1{summary.noise_pct:.1f}%), yellow a TTFT "
                    f"timing artifact (see below)."]


def cell_text(row: Any, name: str, sep: str = " ", verdict: bool = False) -> str:
    """'123.4 ms (Δ −3.1% [−5.0, −1.2])' or 'N/A (reason)'; with ``verdict`` the word
    the colours say elsewhere ('..., better'): plain text has no colours."""
    value = row.values[name]
    if value is None and row.na_reasons.get(name):
        return f"N/A ({row.na_reasons[name]})"
    change = fmt_change(name, row.changes[name])
    if not change:
        return fmt_value(name, value)
    ci = fmt_interval(row.change_intervals[name])
    word = row.verdicts.get(name) if verdict else None
    return f"{fmt_value(name, value)}{sep}({DELTA} {change}" + (f" {ci}" if ci else "") + (
        f", {word}" if word else "") + ")"


def verdict_legend(summary: Summary) -> str:
    """What the verdict words of the plain-text tables mean (their colours' legend)."""
    return (f"After a change: better or worse; noise: no detectable difference (the interval contains 0, or a "
            f"timing change within this run's noise \u00b1{summary.noise_pct:.1f}%); same: every prompt's change "
            f"is exactly 0; artifact: a TTFT timing artifact (see below).")


def na_notes(summary: Summary, names: Sequence[str]) -> list[str]:
    """Why cells of these metrics read N/A, a line per metric and reason ('TPOT N/A for knorm
    0.5: one new token per answer: no decode step to time'). Peak memory says its reason in
    its cell; a configuration whose every cell failed says so in its own cell."""
    by: dict[tuple[str, str], list[str]] = {}
    for r in summary.rows:
        for n in names:
            why = r.na_reasons.get(n)
            if why and n != "peak_mem_bytes" and r.n_prompts:
                by.setdefault((n, why), []).append(r.label)
    return [f"{METRIC[n].label} N/A for {', '.join(labels)}: {why}" for (n, why), labels in by.items()]


def shown_metrics(summary: Summary) -> list[str]:
    """Metrics worth a column: those with a value somewhere (peak memory also when only its reason is known)."""
    def any_value(n: str) -> bool:
        return any(r.values[n] is not None for r in summary.rows)
    return [m.name for m in METRICS if any_value(m.name)
            or (m.name == "peak_mem_bytes" and any(r.peak_mem_reason for r in summary.rows))]


def task_label(t: TaskRow, rows: Sequence[TaskRow] = ()) -> str:
    """'ruler: niah_single_1', or for a mean row 'ruler: mean of 4 subtasks'; given all ``rows``
    of a table over lengths whose means average different numbers of subtasks, the range."""
    if t.subtask is None:
        counts = sorted({r.n_subtasks for r in rows if r.subtask is None} | {t.n_subtasks})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return f"{t.task}: mean of {n} subtasks"
    return t.task if t.subtask == t.task else f"{t.task}: {t.subtask}"


def accuracy_text(t: TaskRow, verdict: bool = False) -> str:
    """'83% [44, 97] (5/6)', and for a compressed row its paired change (``verdict``: and its word)."""
    text = fmt_accuracy(t.accuracy)
    if t.interval:
        text += f" {fmt_pct_interval(t.interval)}"
    if t.correct is not None:
        text += f" ({t.correct}/{t.n})"
    if t.change_pp is not None:
        text += f" {DELTA} {fmt_pp(t.change_pp)} {fmt_interval(t.change_interval, 0)}"
        if verdict and t.verdict:
            text += f", {t.verdict}"
    return text


def to_json(summary: Summary, samples: Sequence[Any] | None = None) -> str:
    d = summary.to_dict()
    if samples is not None:
        d["samples"] = sample_rows(samples)
    return _json(d)


def to_csv(summary: Summary, samples: Sequence[Any] | None = None, tasks: bool = False) -> str:
    """Every row starts with ``run_status``: a csv of an interrupted or still running run must not
    read as a finished one (the other views say it in their header)."""
    if samples is not None:
        columns, records = SAMPLE_FIELDS, sample_rows(samples)
    elif tasks:
        columns, records = TASK_COLUMNS, task_records(summary)
    else:
        columns, records = CONFIG_COLUMNS, config_records(summary)
    status = summary.header.status
    return csv_text(("run_status", *columns), [{"run_status": status, **r} for r in records])


def to_markdown(summary: Summary, samples: Sequence[Any] | None = None, tasks: bool = False) -> str:
    names = shown_metrics(summary)
    lead = ["dataset"] if summary.by_dataset else []
    out = ["\n".join(f"- {md_escape(line)}" for line in header_lines(summary)), ""]
    out.append(markdown_table(
        lead + ["configuration", "prompts", "failed"] + [METRIC[n].label for n in names],
        [([r.dataset] if summary.by_dataset else []) + [r.label, r.n_prompts, r.n_failed]
         + [cell_text(r, n, verdict=True) for n in names] for r in summary.rows]))
    out.append(" ".join(legend_lines(summary)[:1]) + " " + verdict_legend(summary) + "\n")
    if summary.tasks:
        out.append(markdown_table(
            ["task", "length", "configuration", "accuracy [95% CI] (correct/n), Δ paired [95% CI]", "full cache near chance"],
            [[task_label(t), t.context_length or "", t.label, accuracy_text(t, verdict=True),
              "yes" if t.near_chance else ""]
             for t in summary.tasks]))
    if summary.flags:
        out.append("\n".join(f"- **{f.kind.replace('_', ' ')}**: {md_escape(f.message)}" for f in summary.flags)
                   + "\n")
    if samples is not None:
        recs = sample_rows(samples)
        out.append(markdown_table(SAMPLE_FIELDS, [[rec[c] for c in SAMPLE_FIELDS] for rec in recs]))
    return "\n".join(out)


def summary_text(summary: Summary, fmt: str, samples: Sequence[Any] | None = None, tasks: bool = False) -> str:
    if fmt == "json":
        return to_json(summary, samples)
    return {"csv": to_csv, "markdown": to_markdown}[fmt](summary, samples, tasks)


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
    only = "".join(f"\n- only in {side}: {md_escape(', '.join(keys))}" for side, keys in
                   (("A", cmp.only_in_a), ("B", cmp.only_in_b)) if keys)
    notes = "".join(f"\n- note: {md_escape(note)}." for note in cmp.notes)
    return title + markdown_table(["configuration"] + [METRIC[n].label for n in names], rows) + only + notes + (
        "\n" if only or notes else "")
