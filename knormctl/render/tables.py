"""Rich tables for humans: the run header, per-configuration tables with colour-coded
changes, per-sample rows, the run list and a two-run comparison.

Everything here prints to the Console it is given (stdout in ``report``); the numbers
come from ``render.summary`` and the text from ``render.export`` so that table,
markdown and json always agree.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from knormctl.render.export import header_lines, run_records, shown_metrics
from knormctl.render.summary import METRIC, Comparison, Summary, first_line, fmt_change, fmt_value, sample_rows

STYLE = {"better": "green", "worse": "red", "noise": "dim", "same": "dim", "artifact": "yellow"}
# Tables are grouped so that each fits in about 110 columns.
SECTIONS = (
    ("speed", ("ttft_s", "tpot_s", "itl_p90_s", "throughput_tps")),
    ("memory and compression", ("peak_mem_bytes", "kv_bytes_peak", "kv_bytes_final", "compress_events",
                                "compress_time_s")),
    ("quality", ("ppl_context", "ppl_compressed", "token_match", "accuracy")),
)
PIPE_WIDTH = 120  # when stdout is not a terminal (a pipe, CliRunner's 80 columns) tables still get room


def make_console() -> Console:
    """A Console on the *current* sys.stdout (CliRunner swaps it), never narrower than a page."""
    is_tty = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if is_tty else PIPE_WIDTH, highlight=False, soft_wrap=False)


def _shared_mem_reason(summary: Summary) -> str | None:
    """The reason, when every row's peak memory is N/A for the same one (said once, under the table)."""
    reasons = {r.peak_mem_reason for r in summary.rows}
    return reasons.pop() if len(reasons) == 1 and None not in reasons else None


def _cell(row: Any, name: str, shared_reason: str | None = None) -> Text:
    value = row.values[name]
    if value is None and name == "peak_mem_bytes" and row.peak_mem_reason:
        return Text("N/A" if shared_reason else f"N/A ({row.peak_mem_reason})", style="yellow")
    text = Text(fmt_value(name, value), style="dim" if value is None else "")
    change = fmt_change(name, row.changes[name])
    if change:
        text.append("\n" + change, style=STYLE.get(row.verdicts[name] or "", ""))
    return text


def _config_table(summary: Summary, title: str, names: Sequence[str]) -> Table:
    shared = _shared_mem_reason(summary) if "peak_mem_bytes" in names else None
    table = Table(title=title, title_justify="left", show_lines=True, caption_justify="left",
                  caption=f"peak memory N/A: {shared}" if shared else None)
    if summary.by_dataset:
        table.add_column("dataset", no_wrap=True)
    table.add_column("configuration", no_wrap=True)
    if title == "speed":
        table.add_column("samples", justify="right")
        table.add_column("failed", justify="right")
    for name in names:
        unit = METRIC[name].unit
        table.add_column(METRIC[name].label + (f" ({unit})" if unit == "tok/s" else ""), justify="right",
                         no_wrap=name != "peak_mem_bytes", min_width=9, max_width=30)
    for r in summary.rows:
        lead = [r.dataset] if summary.by_dataset else []
        label = Text(r.label, style="bold" if r.is_reference else "")
        counts = [str(r.n_samples), Text(str(r.n_failed), style="red" if r.n_failed else "")] if title == "speed" else []
        table.add_row(*lead, label, *counts, *(_cell(r, n, shared) for n in names))
    return table


def print_summary(summary: Summary, console: Console, samples: Sequence[Any] | None = None) -> None:
    """Header panel, per-configuration tables, passkey accuracy, honesty flags; per-sample rows if given."""
    console.print(Panel("\n".join(header_lines(summary)), title="knormctl report", title_align="left"))
    if summary.rows:
        shown = set(shown_metrics(summary))
        for title, names in SECTIONS:
            names = [n for n in names if n in shown]
            if names:
                console.print(_config_table(summary, title, names))
        console.print(Text("changes: vs the full cache; green better, red worse, dim within timing noise, yellow "
                           "a timing artifact (see below); fractions in percentage points", style="dim"))
    else:
        console.print(Text("no samples stored for this run", style="yellow"))
    if summary.passkey:
        table = Table(title="passkey accuracy", title_justify="left")
        for col in ("configuration", "length (tokens)", "correct", "accuracy", "change"):
            table.add_column(col, justify="left" if col == "configuration" else "right")
        for p in summary.passkey:
            verdict = None if p.change_pp is None or abs(p.change_pp) < 1e-9 else ("better" if p.change_pp > 0 else "worse")
            table.add_row(p.label, str(p.passkey_length), f"{p.correct}/{p.n}", fmt_value("accuracy", p.accuracy),
                          Text(fmt_change("accuracy", p.change_pp), style=STYLE.get(verdict or "", "")))
        console.print(table)
    if summary.flags:
        console.print(Text("Read before quoting these numbers:", style="bold yellow"))
        for f in summary.flags:
            console.print(Text(f"- {f.message}"), soft_wrap=False)
    if samples is not None:
        print_samples(samples, console, {r.config_key: r.label for r in summary.rows})


# (column, header, scale for numbers: cells carry no unit, the header does)
SAMPLE_COLUMNS = (("run_id", "run", None), ("sample_index", "sample", None), ("dataset", "dataset", None),
                  ("config_key", "configuration", None), ("prompt_tokens", "prompt", None), ("new_tokens", "new", None),
                  ("ttft_s", "TTFT ms", 1e3), ("tpot_s", "TPOT ms", 1e3), ("itl_p90_s", "ITL p90 ms", 1e3),
                  ("throughput_tps", "tok/s", 1.0), ("peak_mem_bytes", "peak MiB", 2.0**-20),
                  ("kv_bytes_final", "KV MiB", 2.0**-20), ("compress_events", "cuts", None),
                  ("ppl_compressed", "ppl", 1.0), ("token_match", "match", 1.0), ("context_length", "length", None),
                  ("needle_depth", "depth", None), ("score", "score", 1.0), ("error", "error", None))


def print_samples(samples: Sequence[Any], console: Console, labels: dict[str, str] | None = None) -> None:
    """One line per stored sample; columns that are empty for every sample are left out."""
    table = Table(title="samples", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    recs = sample_rows(samples)
    labels = labels or {}
    single_run = len({rec["run_id"] for rec in recs}) <= 1
    cols = [c for c in SAMPLE_COLUMNS
            if (c[0] in ("sample_index", "dataset", "config_key") or any(rec[c[0]] is not None for rec in recs))
            and not (c[0] == "run_id" and single_run)]
    for key, head, _ in cols:
        # Only the error wraps: every other cell is short and must stay on one line.
        table.add_column(head, justify="left" if key in ("dataset", "config_key", "error") else "right",
                         no_wrap=key != "error", overflow="fold" if key == "error" else "ellipsis",
                         max_width=40 if key == "error" else None)
    for rec in recs:
        cells = []
        for key, _, scale in cols:
            v = rec[key]
            if v is None:
                cells.append("")
            elif scale is not None:
                x = v * scale
                cells.append(f"{x:.2f}" if key in ("token_match", "score") else f"{x:.3f}" if key == "ppl_compressed" else f"{x:.1f}")
            elif key == "config_key":
                cells.append(labels.get(v, v))
            elif key == "error":
                cells.append(Text(first_line(v) or "", style="red"))
            else:
                cells.append(str(v))
        table.add_row(*cells)
    _print_unsquashed(console, table)


def _print_unsquashed(console: Console, table: Table, limit: int = 240) -> None:
    """Print at the table's natural width (up to ``limit``) when the output is not a terminal:
    a file or a pipe has no width to respect, and squeezed columns would cut numbers."""
    if console.is_terminal:
        console.print(table)
        return
    need = Measurement.get(console, console.options.update_width(limit), table).maximum
    width = console.width
    console.width = max(width, min(need, limit))
    try:
        console.print(table)
    finally:
        console.width = width


def print_runs(runs: Sequence[Any], console: Console) -> None:
    table = Table(title="runs (newest first)", title_justify="left")
    for col in ("id", "command", "task", "model", "datasets", "status", "samples", "started (UTC)", "group"):
        table.add_column(col, justify="right" if col in ("id", "samples") else "left", overflow="fold")
    status_style = {"complete": "green", "complete_with_errors": "yellow", "running": "cyan",
                    "interrupted": "red", "failed": "red"}
    for rec in run_records(runs):
        done = f"{rec['samples_done']}" + (f"/{rec['samples_planned']}" if rec["samples_planned"] is not None else "")
        if rec["samples_failed"]:
            done += f" ({rec['samples_failed']} failed)"
        table.add_row(str(rec["id"]), rec["command"], rec["task"], rec["model"], rec["datasets"],
                      Text(rec["status"], style=status_style.get(rec["status"], "")), done,
                      (rec["started_utc"] or "").replace("T", " "), rec["group_name"] or "")
    console.print(table)


def print_comparison(cmp: Comparison, console: Console) -> None:
    def who(h: Any) -> str:
        return f"{h.title} ({h.model}, {h.dtype or '?'} on {h.device or '?'}, started {h.started_utc or '?'})"

    console.print(Panel(f"A = {who(cmp.a)}\nB = {who(cmp.b)}",
                        title="knormctl report --compare", title_align="left"))
    names = [n for n in METRIC if any(r.a[n] is not None or r.b[n] is not None for r in cmp.rows)]
    for title, section in SECTIONS:
        cols = [n for n in section if n in names]
        if not cols:
            continue
        table = Table(title=f"{title}: A, B and B/A", title_justify="left", show_lines=True)
        table.add_column("configuration", no_wrap=True)
        for n in cols:
            table.add_column(METRIC[n].label, justify="right", no_wrap=True)
        for r in cmp.rows:
            cells = []
            for n in cols:
                ratio = r.ratio[n]
                t = Text(f"{fmt_value(n, r.a[n])}\n{fmt_value(n, r.b[n])}\n")
                t.append("" if ratio is None else f"x{ratio:.3f}", style="bold")
                cells.append(t)
            table.add_row((r.label + (f" ({r.dataset})" if r.dataset else "")), *cells)
        console.print(table)
    for side, keys in (("A", cmp.only_in_a), ("B", cmp.only_in_b)):
        if keys:
            console.print(Text(f"only in {side}: {', '.join(keys)}", style="dim"))
