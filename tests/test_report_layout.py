"""`report` tables at 80 and 120 columns: nothing cut, no ellipsis, every number of the json
printed in full, change columns that say what they are, counts as counts."""

from __future__ import annotations

import json

import pytest
from report_data import Cfg, fill_run, parse_tables
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.render.format import fmt_change, fmt_interval, fmt_value

runner = CliRunner()
WIDE_LABELS = (Cfg(), Cfg("knorm", 1.0), Cfg("knorm", 0.9), Cfg("knorm-inverse", 0.75), Cfg("streaming", 0.25),
               Cfg("random", 0.7))


def table_at(db, width: int, *args) -> str:
    result = runner.invoke(app, ["report", "--db", db, *args], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def check_layout(out: str, width: int) -> None:
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width, max(lines, key=len)
    assert "\u2026" not in out and "..." not in out  # nothing cut short


@pytest.mark.parametrize("width", [80, 120])
def test_each_cell_shows_its_own_rows_numbers(store, db, width):
    """Every number of the json found somewhere in the output passed with a row's cells taken
    from another row: read each cell back under its own label and column."""
    from knormctl.render.metrics import METRIC

    run = fill_run(store, configs=WIDE_LABELS, n_samples=5)
    cells = parse_tables(table_at(db, width, "--run-id", str(run)))
    data = json.loads(runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "json"]).stdout)
    checked = 0
    for row in data["rows"]:
        for name, value in row["values"].items():
            cell = cells.get((row["label"], METRIC[name].label))
            if value is None or cell is None:
                continue
            assert cell[0] == fmt_value(name, value), (row["label"], name, cell)
            if row["changes"][name] is not None:
                assert cell[1:3] == [f"\u0394 {fmt_change(name, row['changes'][name])}",
                                     fmt_interval(row["change_intervals"][name])], (row["label"], name, cell)
            checked += 1
    assert checked >= len(data["rows"]) * 8  # speed, memory and quality columns of every row


@pytest.mark.parametrize("width", [80, 120])
def test_every_number_fits_uncut(store, db, width):
    run = fill_run(store, configs=WIDE_LABELS, n_samples=5, fail=(1, Cfg("streaming", 0.25).pc.key))
    out = table_at(db, width, "--run-id", str(run))
    check_layout(out, width)
    data = json.loads(runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "json"]).stdout)
    flat = " ".join(out.split())
    for row in data["rows"]:
        assert row["label"] in out
        for name, value in row["values"].items():
            if value is None:
                continue
            assert fmt_value(name, value) in out, (row["label"], name)
            change = row["changes"][name]
            if change is not None:
                assert f"\u0394 {fmt_change(name, change)}" in out, (row["label"], name)
                assert fmt_interval(row["change_intervals"][name]) in out, (row["label"], name)
    assert "1 failed" in out and "n=5" in out and "n=4" in out
    # the legend says what a change is, so values and changes cannot look contradictory
    assert "median over prompts of each prompt's change" in flat and "need not equal" in flat
    if width == 80:
        assert "speed (1/2)" not in out or "speed (2/2)" in out  # split into narrower tables, never squeezed
    else:
        assert "speed (1/2)" not in out  # four speed columns fit in 120


def test_flags_wrap_under_their_text(store, db):
    """Each flag is one item: wrapped at 80 columns, its continuation lines stand under its
    text (two blanks), never flush left where they read as a new item, and end without blanks."""
    run = fill_run(store, configs=WIDE_LABELS, n_samples=5)
    out = table_at(db, 80, "--run-id", str(run))
    data = json.loads(runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "json"]).stdout)
    lines = out.splitlines()
    start = lines.index("Read before quoting these numbers:") + 1
    items, current = [], None
    for line in lines[start:]:
        assert line == line.rstrip(), repr(line)
        if line.startswith("- "):
            current = [line[2:]]
            items.append(current)
        elif line.startswith("  ") and current is not None:
            current.append(line[2:])
        else:
            break
    messages = [" ".join(" ".join(item).split()) for item in items]
    assert messages == [" ".join(f["message"].split()) for f in data["flags"]]
    assert any(len(item) > 1 for item in items)  # the check saw wrapped flags


def test_counts_print_as_counts(store, db):
    # compress_events alternate 100, 99 over prompts: a median would say 99.5
    run = fill_run(store, configs=(Cfg(), Cfg("knorm", 0.7)), n_samples=4)
    out = table_at(db, 80, "--run-id", str(run))
    data = json.loads(runner.invoke(app, ["report", "--db", db, "--run-id", str(run), "--format", "json"]).stdout)
    events = next(r for r in data["rows"] if not r["is_reference"])["values"]["compress_events"]
    assert events == 99 and "99.5" not in out


@pytest.mark.parametrize("width", [80, 120])
def test_task_tables_fit(store, db, width):
    lengths = (2048, 4096, 8192, 16384, 32768)
    run = fill_run(store, task="niah", configs=(Cfg(mode="prefill"), Cfg("knorm-inverse", 0.25, mode="prefill")),
                   n_samples=20, subtasks=("niah_single_1", "niah_multikey_1"), lengths=lengths,
                   score=lambda i, pc, sub, d, n: float(pc.press == "none" or i % 3 == 0))
    out = table_at(db, width, "--run-id", str(run))
    check_layout(out, width)
    for n in lengths:
        assert f"{n} tokens" in out
    if width == 80:
        assert "(1/2)" in out  # five lengths do not fit in 80 columns: split, not squeezed


def test_compare_fits_80_columns(store, db):
    a, b = fill_run(store, seed=1), fill_run(store, seed=2)
    out = table_at(db, 80, "--compare", str(a), str(b))
    check_layout(out, 80)


@pytest.mark.parametrize("width", [80, 120])
def test_run_list_keeps_every_column(store, db, width):
    fill_run(store, group="a-long-group-name", status="complete_with_errors", model="meta-llama/Llama-3.1-8B-Instruct")
    fill_run(store, fail=(0, Cfg().pc.key))
    out = table_at(db, width, "--list")
    check_layout(out, width)
    header = next(line for line in out.splitlines() if line.lstrip().startswith("id"))
    assert header.split() == ["id", "run", "model", "datasets", "status", "cells", "started", "group"]
    import re

    assert "1 failed" in out and "complete" in out
    assert len(re.findall(r"\d{4}-\d\d-\d\d", out)) == 2  # every start date, whole


def test_an_interval_that_excludes_zero_never_prints_a_bound_as_zero():
    """Peak memory +1.0% [+0.0, +2.0] beside a red 'worse': the low bound was +0.0004%, so the
    interval excluded 0, yet it printed as one that touches it."""
    assert fmt_interval((0.0004, 2.0)) == "[+0.0004, +2.0]"
    assert fmt_interval((-2.04, -0.00004)) == "[\u22122.0, \u22120.00004]"
    assert fmt_interval((0.04, 1.0), 0) == "[+0.04, +1]"
    # an interval that contains 0 keeps its usual digits (no verdict rests on them)
    assert fmt_interval((-0.0004, 2.0)) == "[\u22120.0, +2.0]" and fmt_interval((0.0, 2.0)) == "[+0.0, +2.0]"
