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
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_to_report_and_plot(tmp_path, args, message):
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
