"""Bad input to `report` and `plot`, table-driven: one line on stderr, exit 2, no traceback,
and the database (or a file that is not one) left exactly as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from report_data import fill_run
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.store import open_store

runner = CliRunner()

CASES = [
    (["report", "--run-id", "99"], "run 99 does not exist"),
    (["report", "--run-id", "-1"], "does not exist"),
    (["report", "--compare", "1", "99"], "99"),
    (["report", "--group", "nope"], "nope"),
    (["report", "--format", "xml"], "xml"),
    (["report", "--limit", "0"], "greater than or equal to 1"),
    (["report", "--db", "{DIR}"], "directory"),
    (["report", "--db", "{NOT_DB}"], "not a SQLite database"),
    (["report", "--db", "{MISSING}/r.db"], "does not exist"),
    (["plot", "--run-id", "99"], "run 99 does not exist"),
    (["plot", "--format", "gif"], "gif"),
    (["plot", "--group", "nope"], "nope"),
    (["plot", "--db", "{NOT_DB}"], "not a SQLite database"),
    (["plot", "--out", "{NOT_DB}"], "is not a folder"),
    # an audit of the CLI surface: each of these was 'unexpected ...Error' (exit 1) or exit 0
    (["report", "--run-id", "99999999999999999999"], "run 99999999999999999999 does not exist"),
    (["report", "--compare", "1", "99999999999999999999"], "99999999999999999999 does not exist"),
    (["plot", "--run-id", "99999999999999999999"], "run 99999999999999999999 does not exist"),
    (["export", "--run-id", "99999999999999999999", "-o", "{MISSING}.jsonl"], "no run 99999999999999999999"),
    (["runs", "delete", "99999999999999999999"], "no run 99999999999999999999"),
    (["report", "--run-id", "2147483648"], "run 2147483648 does not exist"),  # above PostgreSQL's INTEGER
    (["report", "--db", "postgresql+psycopg://x:s3cret@127.0.0.1:notaport/db"], "invalid database URL"),
    (["report", "--compare", "1", "1", "--group", "nope"], "--group cannot be used with --compare"),
    (["report", "--db", ""], "Invalid value for '--db': empty"),
    (["report", "--samples", "--tasks", "--format", "csv"], "--tasks cannot be used with --samples"),
    (["report", "--samples", "--by-dataset"], "--by-dataset cannot be used with --samples"),
    (["report", "--db", "sqlite:///{NOT_DB}?mode=rw"], "knormctl does not use SQLite URL arguments (mode)"),
    # values Typer cannot convert, without pydantic's "Value error, " / "Input should be a valid integer"
    (["report", "--format", "foo"], "Error: Invalid value for '--format': 'foo' is not one of 'table', 'json',"),
    (["report", "--run-id", "x"], "Error: Invalid value for '--run-id': 'x' is not an integer"),
    (["report", "--list", "--limit=1.5"], "Error: Invalid value for '--limit': '1.5' is not an integer"),
    (["runs", "delete", "x"], "Error: Invalid value for 'RUN_ID': not an integer"),
    # an empty path (`-o "$UNSET"`) is Path(""), the current folder: it wrote the figures there
    (["plot", "-o", ""], "Error: Invalid value for '--out' / '-o': empty (give a path)"),
    (["report", "--format", "json", "-o", ""], "Error: Invalid value for '--output' / '-o': empty"),
    (["export", "--run-id", "1", "-o", " "], "Error: Invalid value for '-o' / '--output': empty"),
    (["import", ""], "Error: Invalid value for 'FILE': empty"),
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_to_report_and_plot(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "r.db"
    with open_store(str(db)) as store:
        fill_run(store)
    (tmp_path / "adir").mkdir()
    not_db = tmp_path / "notes.txt"
    not_db.write_text("not a database\n" * 50)
    paths = {"DIR": str(tmp_path / "adir"), "NOT_DB": str(not_db), "MISSING": str(tmp_path / "missing")}
    args = [a.format(**paths) for a in args]
    if "--db" not in args:
        args += ["--db", str(db)]
    before = {p: _digest(p) for p in (db, not_db)}
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert {p: _digest(p) for p in (db, not_db)} == before
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("r.db-"))  # SQLite's -wal/-shm
    assert written == ["adir", "notes.txt", "r.db"]


def test_report_list_takes_a_limit_larger_than_the_database_can_hold(tmp_path):
    db = tmp_path / "r.db"
    with open_store(str(db)) as store:
        fill_run(store)
    result = runner.invoke(app, ["report", "--list", "--limit", "99999999999999999999", "--db", str(db)])
    assert result.exit_code == 0, result.output


def test_writers_refuse_what_would_lose_or_mislabel_the_results(tmp_path, monkeypatch):
    """An in-memory URL kept nothing ('1 cell(s) stored'); --db '' (from an unset variable) wrote the
    home folder's database; --group '' stored runs under an empty name; an integer no column
    holds loaded the model and left a failed run."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KNORMCTL_DB", raising=False)
    base = ["sweep", "--num-wikitext-samples", "1", "--num-pg19-samples", "0", "--keep-ratios", "1.0"]
    for extra, message in (
            (["--db", "sqlite://"], "Error: sqlite:// is an in-memory database: what a run stores there is gone when "
                                    "it ends (give a file path)"),
            (["--db", ""], "Error: Invalid value for '--db': empty (leave it out for $KNORMCTL_DB or the default "
                           "database)"),
            (["--group", "", "--db", str(tmp_path / "g.db")], "Error: Invalid value for '--group': empty (give a "
                                                                "name, or leave it out)"),
            (["--prune-after", "99999999999999999999", "--db", str(tmp_path / "p.db")],
             "Error: --prune-after: 99999999999999999999 is too large (at most 2147483647)"),
            # PostgreSQL's INTEGER columns: 3e9 failed storing the first cell there (a failed run left)
            (["--keep-recent", "3000000000", "--db", str(tmp_path / "k.db")],
             "Error: --keep-recent: 3000000000 is too large (at most 2147483647)")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines()[-1] == message
    assert not any(tmp_path.rglob("*.db"))  # no database anywhere, the home folder's included


def test_an_output_name_near_the_file_system_limit_is_written(tmp_path):
    """The temporary '.NAME.PID.tmp' beside a valid 245-character name was too long to create."""
    db = tmp_path / "r.db"
    with open_store(str(db)) as store:
        fill_run(store)
    out = tmp_path / ("r" * 245 + ".json")
    result = runner.invoke(app, ["report", "--db", str(db), "--format", "json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_onto_the_database_being_read_is_refused(tmp_path):
    """`report --format json -o r.db` replaced the results database with the report: every result gone."""
    db = tmp_path / "r.db"
    with open_store(str(db)) as store:
        fill_run(store)
    before = _digest(db)
    for args in (["report", "--format", "json", "-o", str(db)], ["export", "--run-id", "1", "-o", str(db)]):
        result = runner.invoke(app, [*args, "--db", str(db)])
        assert result.exit_code == 2, result.output
        assert "is the results database being read; give another file" in result.stderr
    assert _digest(db) == before
    # nor SQLite's files beside it: a report written over the write-ahead log lost what it held
    for suffix in ("-wal", "-shm", "-journal"):
        side = tmp_path / f"r.db{suffix}"
        result = runner.invoke(app, ["report", "--format", "csv", "-o", str(side), "--db", str(db)])
        assert result.exit_code == 2 and f"is SQLite's {suffix[1:]} file of the results database" in result.stderr


def test_output_into_a_pipe_or_through_a_link_writes_into_it(tmp_path):
    """-o onto a FIFO (or /dev/null, /dev/stdout) replaced it with a regular file, so a waiting
    reader got nothing; a symlink was replaced by a file instead of the file it names."""
    import os
    import threading

    db = tmp_path / "r.db"
    with open_store(str(db)) as store:
        fill_run(store)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    result = runner.invoke(app, ["report", "--format", "json", "-o", str(fifo), "--db", str(db)])
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert got and got[0].startswith(b"{") and fifo.is_fifo()
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    assert runner.invoke(app, ["report", "--format", "json", "-o", str(link), "--db", str(db)]).exit_code == 0
    assert link.is_symlink() and real.read_text().startswith("{")
