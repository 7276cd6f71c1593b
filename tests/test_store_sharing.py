"""A results database shared by a team (a PostgreSQL server): passwords stay out of what is
stored and printed, a database that is not knormctl's is left as it was, imports side by
side, and the messages a server's user reads."""

from __future__ import annotations

import json
import threading

import pytest
from db_fixtures import pg_url  # noqa: F401  (fixture)
from report_data import fill_run
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.store import open_store
from knormctl.store.locations import hide_password, hide_passwords_in_command

runner = CliRunner()
SECRET = "Sekr3tPW"


def test_a_url_password_is_hidden_wherever_it_would_be_stored_or_printed(tmp_path, monkeypatch):
    url = f"postgresql+psycopg://bob:{SECRET}@db.example:5432/kb"
    assert hide_password(url) == "postgresql+psycopg://bob:***@db.example:5432/kb"
    assert hide_password(f"--db={url}") == "--db=postgresql+psycopg://bob:***@db.example:5432/kb"
    for plain in ("--db", "/tmp/r.db", "sqlite:////tmp/r.db", "knorm(window_size=3)", "text:/a=b",
                  "postgresql+psycopg://bob@host/kb"):
        assert hide_password(plain) == plain
    # the driver also takes it as a query argument: it was stored and printed as given
    assert hide_password(f"postgresql+psycopg://bob@h/kb?password={SECRET}&sslmode=require") == (
        "postgresql+psycopg://bob@h/kb?password=***&sslmode=require")
    # nothing listens on port 1: a runtime failure, exit 1
    res = runner.invoke(app, ["report", "--db", f"postgresql+psycopg://bob@127.0.0.1:1/kb?password={SECRET}"])
    assert res.exit_code == 1 and SECRET not in res.stderr and "password=***" in res.stderr
    # a run stored with the password in its command line (before knormctl hid it at the source):
    # the report and the export show it hidden
    db = str(tmp_path / "r.db")
    with open_store(db) as store:
        run = fill_run(store)
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE runs SET command_line = :c"), {"c": f"knormctl sweep --db '{url}' --seed 1"})
    out = runner.invoke(app, ["report", "--db", db, "--format", "json"])
    assert out.exit_code == 0, out.output
    assert SECRET not in out.stdout and "bob:***@db.example" in json.loads(out.stdout)["header"]["command_line"]
    export = tmp_path / "runs.jsonl"
    assert runner.invoke(app, ["export", "--db", db, "--run-id", str(run), "-o", str(export)]).exit_code == 0
    assert SECRET not in export.read_text() and "bob:***@db.example" in export.read_text()
    assert hide_passwords_in_command("knormctl report 'unclosed") == "knormctl report 'unclosed"  # kept whole
    # the command line a run stores, and the hints that name --db
    from knormctl.cli._common import db_arg

    assert db_arg(url) == " --db 'postgresql+psycopg://bob:***@db.example:5432/kb'"
    import sys

    from knormctl.runner import hide_password as stored  # the runner stores argv through it
    monkeypatch.setattr(sys, "argv", ["knormctl", "sweep", "--db", url])
    assert stored is hide_password and SECRET not in " ".join(map(hide_password, sys.argv))


def test_an_unknown_stamp_without_knormctls_tables_is_another_applications_database(tmp_path):
    """An MLflow-like database (Alembic stamp, its own tables) was called 'newer than this
    knormctl; upgrade knormctl'."""
    path = tmp_path / "other.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('c48cb773bb87')"))
        conn.execute(text("CREATE TABLE experiments (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    before = path.read_bytes()
    for args in (["report", "--list"], ["import", str(tmp_path / "nothing.jsonl")]):
        res = runner.invoke(app, [*args, "--db", str(path)])
        assert res.exit_code == 2
    res = runner.invoke(app, ["report", "--list", "--db", str(path)])
    assert "is not a knormctl results database" in res.stderr and "upgrade knormctl" not in res.stderr
    with pytest.raises(Exception, match="another application's"):
        open_store(path)  # a writer too
    assert path.read_bytes() == before


@pytest.mark.postgres
def test_commands_that_continue_or_change_runs_create_nothing_in_an_empty_server_database(pg_url):  # noqa: F811
    """sweep --resume, runs delete and runs upgrade created knormctl's three tables in an empty
    PostgreSQL database, then said 'run 1 does not exist' (upgrade: 'already at schema')."""
    for args in (["sweep", "--resume", "1"], ["runs", "delete", "1", "--yes"], ["runs", "upgrade"]):
        res = runner.invoke(app, [*args, "--db", pg_url])
        assert res.exit_code == 2, (args, res.output)
        assert "holds no knormctl results (no runs table)" in res.stderr, res.stderr
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert inspect(conn).get_table_names() == []
    engine.dispose()


@pytest.mark.postgres
def test_an_older_server_database_is_not_promised_a_backup(pg_url):  # noqa: F811
    from alembic import command

    from knormctl.store.migrate import alembic_config

    engine = create_engine(pg_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0003")
    engine.dispose()
    res = runner.invoke(app, ["report", "--list", "--db", pg_url])
    assert res.exit_code == 2
    assert "no automatic backup" in res.stderr and "pg_dump" in res.stderr and "keeps a backup" not in res.stderr


@pytest.mark.postgres
def test_two_imports_of_the_same_file_side_by_side_both_succeed(pg_url, tmp_path, monkeypatch):  # noqa: F811
    """Both read the store's uuids before either committed: the second got 'duplicate key value
    violates unique constraint uq_runs_uuid' (import is documented as idempotent)."""
    import knormctl.store.exchange as exchange

    src = str(tmp_path / "src.db")
    with open_store(src) as store:
        fill_run(store)
    export = tmp_path / "runs.jsonl"
    assert runner.invoke(app, ["export", "--db", src, "--run-id", "1", "-o", str(export)]).exit_code == 0
    open_store(pg_url).close()  # the schema first: the race is the import's, not the creation's

    both_read = threading.Barrier(2, timeout=30)
    real = exchange._records
    first_attempts = []

    def records(*args):
        it = real(*args)
        first = next(it)  # the uuids are read before this: hold both imports here once
        if len(first_attempts) < 2:
            first_attempts.append(1)
            both_read.wait()
        yield first
        yield from it

    monkeypatch.setattr(exchange, "_records", records)
    results, errors = [], []

    def run():
        try:
            with open_store(pg_url) as store:
                results.append(exchange.import_file(store, export))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(len(r.run_ids) for r in results) == [0, 1]  # one imported it, the other found it there
    with open_store(pg_url, readonly=True) as store:
        assert len(store.list_runs()) == 1


def test_a_postgres_scheme_without_a_driver_names_the_one_to_use():
    res = runner.invoke(app, ["report", "--list", "--db", f"postgres://bob:{SECRET}@127.0.0.1:1/kb"])
    assert res.exit_code == 2
    assert "use postgresql+psycopg://" in res.stderr and SECRET not in res.stderr


@pytest.mark.parametrize("args", [["runs", "delete", "1", "--yes"], ["runs", "upgrade"], ["sweep", "--resume", "1"]])
@pytest.mark.parametrize("url", ["foo bar://x", "postgresql+psycopg://u@h:5x/db"])
def test_a_malformed_url_is_one_usage_line_in_the_commands_that_change_runs(args, url):
    """They checked that the database exists before the URL was parsed: 'unexpected
    ArgumentError' / 'unexpected ValueError', exit 1."""
    res = runner.invoke(app, [*args, "--db", url])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == ("Error: invalid database URL (expected a file path, sqlite:///PATH or "
                                  "postgresql+psycopg://USER@HOST/DB)")
