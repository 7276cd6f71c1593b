"""Rich tables for humans: the run header, per-configuration tables with colour-coded
changes and their intervals, question-task accuracy, per-sample rows, the run list and a
two-run comparison.

Everything prints to the Console it is given (stdout in ``report``); the numbers come
from ``render.summary`` and the text from ``render.format``/``render.export``, so table,
markdown and json always agree. Tables never squeeze a number: metrics are split over
as many tables as the console's width needs (measured, not guessed).
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from knormctl.render.compare import Comparison
from knormctl.render.export import header_lines, legend_lines, na_notes, run_records, shown_metrics, task_label
from knormctl.render.flags import first_line
from knormctl.render.format import DELTA, fmt_accuracy, fmt_change, fmt_interval, fmt_pct_interval, fmt_pp, fmt_value
from knormctl.render.metrics import METRIC, METRICS, SECTIONS
from knormctl.render.summary import Summary, sample_rows
from knormctl.render.tasks import TaskRow

TASK_LEGEND = (f"Accuracy: % of questions right (correct/n; mean score for partial credit), below it its 95% "
               f"interval (Wilson for right/wrong answers, bootstrap for partial scores, stratified bootstrap for a "
               f"mean over subtasks); {DELTA}: the paired change against the full cache on the same questions, in "
               f"percentage points, with its 95% bootstrap interval.")
STYLE = {"better": "green", "worse": "red", "noise": "dim", "same": "dim", "artifact": "yellow"}
PIPE_WIDTH = 120  # when stdout is not a terminal (a pipe, CliRunner) and $COLUMNS does not say


def make_console() -> Console:
    """A Console on the *current* sys.stdout (CliRunner swaps it): the terminal's width, else
    $COLUMNS, else PIPE_WIDTH for a pipe or file."""
    is_tty = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
    width = None
    if not is_tty:
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH
    # markup and emoji codes off: group, model and press names are the user's ("exp [v2]" lost
    # "[v2]", "[/x] g" crashed the report)
    return Console(file=sys.stdout, width=width, highlight=False, soft_wrap=False, markup=False, emoji=False)


def print_bullet(console: Console, text: str) -> None:
    """``- text``, wrapped at the console's width with its continuation lines under the text
    (a flush-left continuation reads as a new item), and no trailing blanks."""
    lines = Text(text).wrap(console, max(console.width - 2, 20))
    for i, line in enumerate(lines):
        line.rstrip()
        console.print(Text("- " if i == 0 else "  ") + line, soft_wrap=True)


def _natural_width(console: Console, table: Table, limit: int = 10_000) -> int:
    """The width a table needs to show every cell unsqueezed (Measurement.get clamps to the
    options' width, so measure against a very wide page)."""
    return Measurement.get(console, console.options.update_width(limit), table).maximum


def fits(console: Console, table: Table) -> bool:
    return _natural_width(console, table) <= console.width


def split_tables(console: Console, items: Sequence[Any], build: Callable[[Sequence[Any], int, int], Table]) -> list[Table]:
    """Tables of consecutive ``items`` (metrics, lengths), each as wide as the console allows.
    ``build(chunk, part, parts)`` makes one table; parts are balanced (4 metrics at 3 per table
    give 2 + 2, not 3 + 1). No items: one table of the key columns alone."""
    if not items:
        return [build(items, 0, 0)]
    per = len(items)
    while per > 1 and not all(fits(console, build(items[i:i + per], 0, 0)) for i in range(0, len(items), per)):
        per -= 1
    parts = -(-len(items) // per)
    size = -(-len(items) // parts)
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    return [build(chunk, k + 1, len(chunks)) for k, chunk in enumerate(chunks)]


def part_title(what: str, part: int, parts: int) -> str:
    return what if parts <= 1 else f"{what} ({part}/{parts})"


def _shared_mem_reason(summary: Summary) -> str | None:
    """The reason, when every row's peak memory is N/A for the same one (said once, under the table)."""
    reasons = {r.peak_mem_reason for r in summary.rows}
    return reasons.pop() if len(reasons) == 1 and None not in reasons else None


def _config_cell(row: Any) -> Text:
    text = Text(row.label, style="bold" if row.is_reference else "")
    text.append(f"\nn={row.n_prompts}" + (f" \u00d7{row.n_repeats}" if row.n_repeats > 1 else ""), style="dim")
    if row.n_failed:
        text.append(f"\n{row.n_failed} failed", style="red")
    return text


def _cell(row: Any, name: str, shared_reason: str | None = None) -> Text:
    value = row.values[name]
    if value is None and name == "peak_mem_bytes" and row.peak_mem_reason:
        return Text("N/A" if shared_reason else f"N/A ({row.peak_mem_reason})", style="yellow")
    text = Text(fmt_value(name, value), style="dim" if value is None else "")
    change = fmt_change(name, row.changes[name])
    if change:
        style = STYLE.get(row.verdicts[name] or "", "")
        text.append(f"\n{DELTA} {change}", style=style)
        ci = fmt_interval(row.change_intervals[name])
        if ci:
            text.append(f"\n{ci}", style=style)
    return text


def _config_table(summary: Summary, what: str, names: Sequence[str], part: int, parts: int) -> Table:
    shared = _shared_mem_reason(summary) if "peak_mem_bytes" in names else None
    notes = ([f"peak memory N/A: {shared}"] if shared else []) + na_notes(summary, names)
    table = Table(title=part_title(what, part, parts), title_justify="left", show_lines=True, caption_justify="left",
                  caption="\n".join(notes) or None)
    if summary.by_dataset:
        table.add_column("dataset", no_wrap=True)
    table.add_column("configuration", no_wrap=True)
    for name in names:
        m = METRIC[name]
        table.add_column(m.label, justify="right", no_wrap=name != "peak_mem_bytes",
                         max_width=30 if name == "peak_mem_bytes" else None)
    for r in summary.rows:
        lead = [r.dataset] if summary.by_dataset else []
        table.add_row(*lead, _config_cell(r), *(_cell(r, n, shared) for n in names))
    return table


def _acc_cell(t: TaskRow | None) -> Text:
    if t is None:
        return Text("")
    text = Text(fmt_accuracy(t.accuracy) + (f" ({t.correct}/{t.n})" if t.correct is not None else f" (n={t.n})"))
    if t.interval:
        text.append(f"\n{fmt_pct_interval(t.interval)}", style="dim")
    if t.change_pp is not None:
        style = STYLE.get(t.verdict or "", "")
        text.append(f"\n{DELTA} {fmt_pp(t.change_pp)}", style=style)
        ci = fmt_interval(t.change_interval, 0)
        if ci:
            text.append(f"\n{ci}", style=style)
    return text


def _task_tables(console: Console, summary: Summary) -> None:
    """Per task and subtask (the mean over subtasks first): configurations down, context lengths across."""
    blocks: dict[tuple, list[TaskRow]] = defaultdict(list)
    for t in summary.tasks:
        blocks[(t.task, t.subtask)].append(t)
    for (task, sub), rows in blocks.items():
        lengths = sorted({t.context_length for t in rows}, key=lambda x: (x is None, x or 0))
        configs = list(dict.fromkeys(t.config_key for t in rows))
        cell = {(t.config_key, t.context_length): t for t in rows}
        label = {t.config_key: t.label for t in rows}
        near = any(t.near_chance and t.is_reference for t in rows)
        what = f"{task_label(rows[0], rows)} \u2014 accuracy"
        if near:
            what += " \u2014 FULL CACHE NEAR CHANCE: compression results here mean nothing"

        def build(chunk: Sequence[Any], part: int, parts: int) -> Table:
            table = Table(title=part_title(what, part, parts), title_justify="left", show_lines=True,
                          title_style="bold yellow" if near else None)
            table.add_column("configuration", no_wrap=True)
            for length in chunk:
                table.add_column("length" if length is None else f"{length} tokens", justify="right", no_wrap=True)
            for key in configs:
                table.add_row(Text(label[key], style="bold" if key == "none" else ""),
                              *(_acc_cell(cell.get((key, length))) for length in chunk))
            return table

        for table in split_tables(console, lengths, build):
            console.print(table)
    console.print(Text(TASK_LEGEND, style="dim"))


def print_summary(summary: Summary, console: Console, samples: Sequence[Any] | None = None) -> None:
    """Header panel, per-configuration tables, question-task accuracy, honesty flags; per-sample rows if given."""
    console.print(Panel("\n".join(header_lines(summary)), title="knormctl report", title_align="left"))
    if summary.rows:
        shown = set(shown_metrics(summary))
        for section in SECTIONS:
            names = [m.name for m in METRICS if m.section == section and m.name in shown]
            if names:
                for table in split_tables(console, names, lambda chunk, k, n, s=section: _config_table(summary, s, chunk, k, n)):
                    console.print(table)
        for line in legend_lines(summary):
            console.print(Text(line, style="dim"))
    else:
        console.print(Text("no samples stored for this run", style="yellow"))
    if summary.tasks:
        _task_tables(console, summary)
    if summary.flags:
        console.print(Text("Read before quoting these numbers:", style="bold yellow"))
        for f in summary.flags:
            print_bullet(console, f.message)
    if samples is not None:
        print_samples(samples, console, {r.config_key: r.label for r in summary.rows})


# (column, header, scale for numbers: cells carry no unit, the header does)
SAMPLE_COLUMNS = (("run_id", "run", None), ("sample_index", "sample", None), ("repeat", "rep", None),
                  ("dataset", "dataset", None), ("config_key", "configuration", None),
                  ("prompt_tokens", "prompt", None), ("new_tokens", "new", None),
                  ("ttft_s", "TTFT ms", 1e3), ("tpot_s", "TPOT ms", 1e3), ("itl_p90_s", "ITL p90 ms", 1e3),
                  ("throughput_tps", "tok/s", 1.0), ("peak_mem_bytes", "peak MiB", 2.0**-20),
                  ("kv_bytes_final", "KV MiB", 2.0**-20), ("compress_events", "cuts", None),
                  ("ppl_compressed", "ppl", 1.0), ("token_match", "match", 1.0), ("subtask", "subtask", None),
                  ("context_length", "length", None), ("needle_depth", "depth", None), ("score", "score", 1.0),
                  ("error", "error", None))


KEY_COLUMNS = ("run_id", "sample_index", "repeat", "dataset", "config_key")  # which sample a line is


def print_samples(samples: Sequence[Any], console: Console, labels: dict[str, str] | None = None) -> None:
    """One line per stored sample; columns that are empty for every sample are left out. Where the
    width (the terminal's; $COLUMNS or 120 for a pipe or file) is too narrow for every column,
    the values are split over several tables, each repeating the columns that say which sample
    a line is (as the summary's tables are split): a squeezed column would cut its numbers."""
    recs = sample_rows(samples)
    labels = labels or {}
    single_run = len({rec["run_id"] for rec in recs}) <= 1
    cols = [c for c in SAMPLE_COLUMNS
            if (c[0] in ("sample_index", "dataset", "config_key")
                or any(rec[c[0]] not in ((None, 0) if c[0] == "repeat" else (None,)) for rec in recs))
            and not (c[0] == "run_id" and single_run)]
    keys = [c for c in cols if c[0] in KEY_COLUMNS]
    values = [c for c in cols if c[0] not in KEY_COLUMNS]

    def build(chunk: Sequence[tuple], part: int, parts: int) -> Table:
        table = Table(title=part_title("samples", part, parts), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for key, head, _ in (*keys, *chunk):
            # Only the error wraps: every other cell is short and must stay on one line.
            table.add_column(head, justify="left" if key in ("dataset", "config_key", "error", "subtask") else "right",
                             no_wrap=key != "error", overflow="fold" if key == "error" else "ellipsis",
                             max_width=40 if key == "error" else None)
        for rec in recs:
            table.add_row(*(_sample_cell(rec, key, scale, labels) for key, _, scale in (*keys, *chunk)))
        return table

    for table in split_tables(console, values, build):
        console.print(table)


def _sample_cell(rec: dict, key: str, scale: float | None, labels: dict[str, str]) -> str | Text:
    v = rec[key]
    if v is None:
        return ""
    if scale is not None:
        x = v * scale
        return f"{x:.2f}" if key in ("token_match", "score") else f"{x:.3f}" if key == "ppl_compressed" else f"{x:.1f}"
    if key == "config_key":
        return labels.get(v, v)
    if key == "error":
        return Text(first_line(v) or "", style="red")
    return str(v)


def print_runs(runs: Sequence[Any], console: Console) -> None:
    """The run list: a plain list (no vertical rules) so it reads at 80 columns; short
    columns never wrap, names wrap."""
    table = Table(title="runs (newest first; times in UTC)", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    # min widths: a status word, most of a model name; the date and the time on two lines;
    # the group column only when some run has a group
    recs = run_records(runs)
    minimum = {"status": 9, "model": 10, "datasets": 8, "group": 6}
    cols = ("id", "run", "model", "datasets", "status", "cells", "started") + (
        ("group",) if any(rec["group_name"] for rec in recs) else ())
    for col in cols:
        table.add_column(col, justify="right" if col in ("id", "cells") else "left", min_width=minimum.get(col),
                         no_wrap=col in ("id", "cells", "started"), overflow="fold")
    status_style = {"complete": "green", "complete_with_errors": "yellow", "running": "cyan",
                    "interrupted": "red", "failed": "red"}
    for rec in recs:
        done = f"{rec['samples_done']}" + (f"/{rec['samples_planned']}" if rec["samples_planned"] is not None else "")
        if rec["samples_failed"]:
            done += f"\n{rec['samples_failed']} failed"
        cells = [str(rec["id"]), f"{rec['command']} {rec['task']}", rec["model"], rec["datasets"],
                 Text(rec["status"].replace("_", " "), style=status_style.get(rec["status"], "")), done,
                 (rec["started_utc"] or "").replace("T", "\n"), rec["group_name"] or ""]
        table.add_row(*cells[:len(cols)])
    console.print(table)


def print_comparison(cmp: Comparison, console: Console) -> None:
    def who(h: Any) -> str:
        ran = "".join(f"; {d}" for d in h.deployment)  # batch, chunks, decode step: they change the numbers
        return f"{h.title} ({h.model}, {h.dtype or '?'} on {h.device or '?'}{ran}, started {h.started_utc or '?'})"

    console.print(Panel(f"A = {who(cmp.a)}\nB = {who(cmp.b)}",
                        title="knormctl report --compare", title_align="left"))
    names = [m.name for m in METRICS if any(r.a[m.name] is not None or r.b[m.name] is not None for r in cmp.rows)]

    def build(section: str, cols: Sequence[str], part: int, parts: int) -> Table:
        table = Table(title=part_title(f"{section}: A, B and B/A", part, parts), title_justify="left", show_lines=True)
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
        return table

    for section in SECTIONS:
        cols = [m.name for m in METRICS if m.section == section and m.name in names]
        if cols:
            for table in split_tables(console, cols, lambda chunk, k, n, s=section: build(s, chunk, k, n)):
                console.print(table)
    for side, keys in (("A", cmp.only_in_a), ("B", cmp.only_in_b)):
        if keys:
            console.print(Text(f"only in {side}: {', '.join(keys)}", style="dim"))
    for note in cmp.notes:
        console.print(Text(f"note: {note}.", style="yellow"))
