"""Reading never writes (issue 11, item 6): `report`, `plot` and `export` open the database
read-only. A missing file is an error and nothing is created; a read-only file or folder
can be read; an old schema is refused untouched with the command that upgrades it; a stale
run is shown as interrupted without being marked. Permission cases run in a child process
held to file permissions (``unprivileged``), so they run as root too."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from db_fixtures import db_url  # noqa: F401  (a fixture)
from report_data import fill_run
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner
from unprivileged import unprivileged

from knormctl.cli import app
from knormctl.store import RUNNING, Run, StoreError, open_store, utcnow
from knormctl.store.migrate import SCHEMA_HEAD

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def knormctl_as_user(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    env.pop("KNORMCTL_DB", None)
    return subprocess.run(unprivileged([sys.executable, "-m", "knormctl", *args]), cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def closed_database(path: Path, **kw) -> int:
    """A filled database, closed (checkpointed: no -wal or -shm left beside it). Returns the run id."""
    with open_store(path) as store:
        run_id = fill_run(store, **kw)
    assert listing(path.parent) == [path.name]
    return run_id


@pytest.fixture
def read_only(tmp_path):
    """Make paths read-only (chmod a-w); restored afterwards so pytest can clean up."""
    changed = []

    def make(*paths: Path) -> None:
        for p in paths:
            changed.append((p, p.stat().st_mode))
            p.chmod(0o555 if p.is_dir() else 0o444)

    yield make
    for p, mode in reversed(changed):
        p.chmod(mode)


def test_the_harness_really_denies_writes(tmp_path, read_only):
    """Otherwise every 'read-only' test below would pass vacuously when run as root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "f").write_text("x")
    read_only(folder / "f", folder)
    probe = ("import sys\nfor what, path, mode in (('file', sys.argv[1], 'a'), ('folder', sys.argv[2], 'w')):\n"
             "    try:\n        open(path, mode)\n        print(what, 'writable')\n"
             "    except PermissionError:\n        print(what, 'denied')\n")
    res = subprocess.run(unprivileged([sys.executable, "-c", probe, str(folder / "f"), str(folder / "new")]),
                         capture_output=True, text=True, check=True)
    assert res.stdout.split("\n")[:2] == ["file denied", "folder denied"]


def test_report_and_plot_read_a_read_only_file(tmp_path, read_only):
    db = tmp_path / "data" / "r.db"
    db.parent.mkdir()
    run_id = closed_database(db)
    before = digest(db)
    read_only(db)
    res = knormctl_as_user("report", "--db", str(db), "--format", "json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["header"]["run_ids"] == [run_id]
    res = knormctl_as_user("plot", "--db", str(db), "--out", str(tmp_path / "figs"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.split()) >= 1 and all(Path(p).is_file() for p in res.stdout.split())
    assert digest(db) == before
    # Nothing beside it: SQLite's -wal/-shm would be made read-only like the file, and once the
    # owner made the file writable again every write failed "attempt to write a readonly database"
    assert listing(db.parent) == ["r.db"]
    db.chmod(0o644)
    res = knormctl_as_user("runs", "delete", str(run_id), "--yes", "--db", str(db), cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_report_reads_a_database_in_a_read_only_folder_and_creates_nothing_there(tmp_path, read_only):
    folder = tmp_path / "shared"
    folder.mkdir()
    db = folder / "r.db"
    run_id = closed_database(db)
    before = digest(db)
    read_only(db, folder)
    for args in (["report", "--run-id", str(run_id), "--format", "json"], ["report", "--list"],
                 ["export", "--run-id", str(run_id), "-o", str(tmp_path / "out.jsonl")]):
        res = knormctl_as_user(*args, "--db", str(db), cwd=tmp_path)
        assert res.returncode == 0, (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert listing(folder) == ["r.db"] and digest(db) == before
    assert (tmp_path / "out.jsonl").stat().st_size > 0


def test_an_unwritable_output_is_one_line_and_leaves_nothing(tmp_path, read_only):
    """plot into a read-only folder, report -o under a file: one line, exit 2, no partial file."""
    db = tmp_path / "r.db"
    closed_database(db)
    figs = tmp_path / "figs"
    figs.mkdir()
    read_only(figs)
    (tmp_path / "afile").write_text("x")
    for args, what in ((["plot", "--out", str(figs)], f"cannot write figure {figs}/"),
                       (["report", "--format", "json", "-o", str(tmp_path / "afile" / "x.json")],
                        f"cannot write --output {tmp_path / 'afile' / 'x.json'}: Not a directory")):
        res = knormctl_as_user(*args, "--db", str(db), cwd=tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        [line] = res.stderr.strip().splitlines()
        assert line.startswith(f"Error: {what}") and "unexpected" not in line, line
    assert listing(figs) == [] and (tmp_path / "afile").read_text() == "x"


def test_a_read_only_folder_is_refused_for_writing(tmp_path, read_only):
    """A writer needs the folder for SQLite's -wal and -shm files: one line, nothing created."""
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(folder)
    res = subprocess.run(unprivileged([sys.executable, "-c", "import sys\nfrom knormctl.store import open_store\n"
                                       "open_store(sys.argv[1])", str(folder / "x.db")]),
                         capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert res.returncode != 0 and f"StoreError: folder {folder} is not writable" in res.stderr
    assert listing(folder) == []


@pytest.mark.parametrize("command", [["report"], ["plot"], ["export", "--run-id", "1", "-o", "x.jsonl"]])
def test_a_missing_database_is_an_error_and_nothing_is_created(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "typo.db"
    res = runner.invoke(app, [*command, "--db", str(missing)])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"Error: {missing} does not exist"
    assert listing(tmp_path) == []

    # the default database (no --db, no $KNORMCTL_DB) is not created either, nor its folder
    monkeypatch.delenv("KNORMCTL_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    res = runner.invoke(app, command)
    assert res.exit_code == 2 and "no results database at" in res.stderr and "knormctl sweep" in res.stderr
    assert listing(tmp_path) == []


def test_reading_shows_a_dead_run_as_interrupted_and_leaves_it_as_stored(tmp_path):
    db = tmp_path / "r.db"
    with open_store(db) as store:
        run_id = fill_run(store, status=RUNNING, stop_after=4)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        store.update_run(run_id, pid=int(dead.stdout))
    before = digest(db)
    res = runner.invoke(app, ["report", "--list", "--format", "json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["status"] == "interrupted"
    res = runner.invoke(app, ["report", "--run-id", str(run_id), "--format", "json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    with closing(sqlite3.connect(db)) as raw:
        assert raw.execute("SELECT status FROM runs").fetchone() == (RUNNING,)
    assert digest(db) == before


def test_an_old_schema_is_refused_untouched_and_runs_upgrade_upgrades_it(tmp_path):
    from test_migrations import make_0001_database

    db = tmp_path / "old runs.db"  # a space: the suggested command is quoted for the shell
    make_0001_database(f"sqlite:///{db}", n_runs=2, n_samples=5)
    before, files = digest(db), listing(tmp_path)
    for command in (["report"], ["plot"], ["export", "--run-id", "1", "-o", str(tmp_path / "x.jsonl")]):
        res = runner.invoke(app, [*command, "--db", str(db)])
        assert res.exit_code == 2, res.output
        line = res.stderr.strip()
        assert line.startswith(f"Error: {db} has schema 0001, older than this knormctl's {SCHEMA_HEAD}")
        assert f"knormctl runs upgrade --db '{db}'" in line and "\n" not in line
    assert digest(db) == before and listing(tmp_path) == files  # no backup, no -wal: nothing written

    res = runner.invoke(app, ["runs", "upgrade", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert f"from 0001 to {SCHEMA_HEAD}" in res.stdout and ".bak-0001-" in res.stdout
    res = runner.invoke(app, ["report", "--list", "--format", "json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == 2
    res = runner.invoke(app, ["runs", "upgrade", "--db", str(db)])
    assert res.exit_code == 0 and f"already at schema {SCHEMA_HEAD}" in res.stdout
    res = runner.invoke(app, ["runs", "upgrade", "--db", str(tmp_path / "nope.db")])
    assert res.exit_code == 2 and "does not exist" in res.stderr and not (tmp_path / "nope.db").exists()


def test_a_schema_read_the_same_way_is_read_as_it_is(tmp_path):
    """0005 changed only how SQLite hands out new run ids: a 0004 database is read without an
    upgrade (and untouched), not refused with 'runs upgrade' for a colleague who cannot write it."""
    db = tmp_path / "r.db"
    run_id = closed_database(db)
    with closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE alembic_version SET version_num = '0004'")
    before = digest(db)
    res = runner.invoke(app, ["report", "--run-id", str(run_id), "--format", "json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["header"]["run_ids"] == [run_id]
    assert digest(db) == before  # no upgrade, no backup (SQLite's own lock files may appear)
    assert set(listing(tmp_path)) <= {"r.db", "r.db-wal", "r.db-shm"}


def test_a_read_only_store_refuses_every_write(db_url):
    with open_store(db_url) as store:
        run_id = fill_run(store)
    with open_store(db_url, readonly=True) as store:
        assert store.readonly and store.get_run(run_id).id == run_id and store.schema_revision == SCHEMA_HEAD
        with pytest.raises(StoreError, match="opened read-only"):
            store.update_run(run_id, error="x")
        with pytest.raises(StoreError, match="opened read-only"):
            store.mark_stale_runs()
        # below the Store's own guard, the connection itself cannot write
        # (SQLite: mode=ro + query_only; PostgreSQL: read-only transactions)
        with pytest.raises(DBAPIError, match="readonly|read-only|query_only"):
            with store.engine.begin() as conn:
                conn.execute(insert(Run.__table__).values(
                    uuid="x", command="sweep", task="lm", status="complete", started_utc=utcnow(),
                    command_line="", model_requested="m", samples_done=0, samples_failed=0,
                    config_json={}, env_json={}))
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM runs")).scalar() == 1


def test_an_empty_or_foreign_file_is_refused_for_reading(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError, match="holds no knormctl results"):
        open_store(empty, readonly=True)
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as con:
        con.execute("CREATE TABLE notes (x)")
    with pytest.raises(StoreError, match="not a knormctl results database"):
        open_store(other, readonly=True)
    assert empty.stat().st_size == 0


def test_a_read_only_store_refuses_writes_even_over_a_users_sqlite_uri(tmp_path):
    """A `file:` URI (sqlite:///file:PATH?uri=true) is opened by SQLite as given, without
    mode=ro: the read-only connection's query_only pragma is then the one guard against a write."""
    from sqlalchemy.exc import OperationalError
    from test_store import new_run

    db = tmp_path / "r.db"
    with open_store(db) as store:
        new_run(store)
    reader = open_store(f"sqlite:///file:{db}?uri=true", readonly=True)
    try:
        with pytest.raises(OperationalError, match="readonly database"), reader.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE runs SET status = 'failed'")
    finally:
        reader.engine.dispose()
    with open_store(db) as store:
        assert store.last_run().status != "failed"
