"""Migrate-on-open: blank -> head, old -> head keeping every row (with a backup), newer -> refused."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, func, insert, select, update
from sqlalchemy.engine import make_url

import knormctl
from db_fixtures import db_url  # noqa: F401  (a fixture)
from knormctl.store import INTERRUPTED, RUNNING, StoreError, open_store
from knormctl.store.connect import make_engine
from knormctl.store.migrate import alembic_config, migrations_dir
from knormctl.store.models import Base

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def schema_diffs(engine) -> list:
    """What ``alembic check`` would report: differences between the database and the models."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def sqlite_file(url: str) -> Path | None:
    u = make_url(url)
    return Path(u.database) if u.get_backend_name() == "sqlite" else None


def test_one_linear_history_ending_at_head():
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD]
    assert [r.revision for r in script.walk_revisions()][::-1] == ["0001", "0002", "0003", "0004", "0005"]
    # the no-Alembic fast path of open_store compares with this constant: it must follow the scripts
    from knormctl.store.migrate import SCHEMA_HEAD

    assert SCHEMA_HEAD == script.get_current_head()


def test_blank_database_is_created_at_head_and_matches_the_models(db_url):
    with open_store(db_url) as store:
        assert store.created and store.schema_revision == HEAD
        assert store.upgraded_from is None and store.backup_path is None
        assert schema_diffs(store.engine) == []
    with open_store(db_url) as again:  # a second open changes nothing
        assert not again.created and again.upgraded_from is None


def make_0001_database(url: str, n_runs: int = 3, n_samples: int = 20) -> dict:
    """A database at revision 0001 with rows written by plain Core inserts (no ORM: the
    models are at head). Returns the rows as written, per table, keyed by id."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
        meta = MetaData()
        meta.reflect(engine)
        runs, samples = meta.tables["runs"], meta.tables["samples"]
        assert "heartbeat_utc" not in runs.c  # really the old schema
        t0 = datetime(2024, 5, 1, 12, 0, 0)
        with engine.begin() as conn:
            for r in range(n_runs):
                run_id = conn.execute(insert(runs).values(
                    command="sweep", task="lm", status=RUNNING if r == n_runs - 1 else "complete",
                    group_name="g" if r else None, started_utc=t0 + timedelta(hours=r),
                    command_line=f"knormctl sweep --run {r}", model_requested="smollm2-135m",
                    samples_done=n_samples, samples_failed=0, config_json={"keep_ratios": [1.0, 0.5], "r": r},
                    env_json={"cpu": "test"})).inserted_primary_key[0]
                conn.execute(insert(samples), [dict(
                    run_id=run_id, created_utc=t0, sample_index=i, config_key="knorm|kr=0.5",
                    dataset="wiki-lite", prompt_tokens=100 + i, press="knorm", keep_ratio=0.5,
                    prune_after=16, skip_layers="0", compress_mode="decode", keep_recent=0,
                    ttft_s=0.01 * i, generated_text=f"text {r}/{i}", step_latencies_json=[0.1, 0.2],
                    error="boom" if i == 3 else None,
                    **(dict(task="passkey", passkey=f"{10000 + i}", passkey_length=1024, passkey_depth=0.5,
                            correct=i % 2) if i >= n_samples - 4 else
                       dict(task="lm", passkey=None, passkey_length=None, passkey_depth=None, correct=None)))
                    for i in range(n_samples)])
            return {name: {row.id: row._asdict() for row in conn.execute(select(t).order_by(t.c.id))}
                    for name, t in (("runs", runs), ("samples", samples))}
    finally:
        engine.dispose()


FOLDED_BY_0003 = ("passkey", "passkey_length", "passkey_depth", "correct")


def test_upgrade_from_0001_keeps_every_row(db_url):
    before = make_0001_database(db_url)
    with open_store(db_url) as store:
        assert store.upgraded_from == "0001" and store.schema_revision == HEAD
        assert schema_diffs(store.engine) == []
        path = sqlite_file(db_url)
        if path is not None:
            assert store.backup_path is not None and store.backup_path.parent == path.parent
            assert store.backup_path.name.startswith(f"{path.name}.bak-0001-")
            assert str(store.backup_path) in store.upgrade_note
        else:
            assert store.backup_path is None and "no automatic backup" in store.upgrade_note

        with store.engine.connect() as conn:
            meta = MetaData()
            meta.reflect(conn)
            for name, rows in before.items():
                table = meta.tables[name]
                after = {row.id: row._asdict() for row in conn.execute(select(table).order_by(table.c.id))}
                assert after.keys() == rows.keys()
                for row_id, old in rows.items():
                    kept = {k: v for k, v in old.items() if k not in FOLDED_BY_0003}
                    assert {k: after[row_id][k] for k in kept} == kept  # every old value unchanged
                    if old.get("passkey") is not None:  # 0003 folded the passkey columns into the task columns
                        new = after[row_id]
                        assert (new["answers_json"], new["context_length"], new["needle_depth"], new["score"],
                                new["subtask"]) == ([old["passkey"]], old["passkey_length"], old["passkey_depth"],
                                                    float(old["correct"]), "passkey")
        assert {r.hostname for r in store.list_runs(limit=None)} == {None}  # new columns: NULL

        # The upgraded rows work through the Store: the old 'running' run has no pid and an old
        # start, so it is recognised as interrupted.
        run_ids = sorted(before["runs"])
        assert store.get_run(run_ids[-1]).status == INTERRUPTED
        assert len(store.samples(run_ids)) == 60
        assert store.done_cells(run_ids[0]) == {(i, "knorm|kr=0.5", 0) for i in range(20) if i != 3}  # repeat 0
        # 0005: the rebuilt runs table keeps its high-water mark; the newest id is not handed out again
        store.delete_runs([run_ids[-1]])
        assert store.create_run(command="sweep", task="lm", model_requested="m", config={},
                                command_line="x") > run_ids[-1]

    if path is not None:  # the backup is a valid SQLite database holding the old rows at 0001
        with closing(sqlite3.connect(store.backup_path)) as bak:
            assert bak.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
            assert bak.execute("SELECT count(*) FROM samples").fetchone() == (60,)
            assert "heartbeat_utc" not in {c[1] for c in bak.execute("PRAGMA table_info(runs)")}
            assert bak.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        with open_store(db_url) as again:  # upgraded once: no second backup
            assert again.upgraded_from is None and again.backup_path is None
        assert len(list(path.parent.glob(f"{path.name}.bak-*"))) == 1


def test_the_developers_alembic_command_keeps_every_sample(tmp_path):
    """`alembic upgrade head` (env.py's own engine, foreign keys on) rebuilt `runs` in batch mode
    and the DROP cascaded to every sample; knormctl's migrate() switched the keys off, the
    developer path did not."""
    import subprocess
    import sys

    db = tmp_path / "dev.db"
    before = make_0001_database(f"sqlite:///{db}")
    res = subprocess.run([sys.executable, "-m", "alembic", "-c", "alembic.ini", "-x", f"db={db}", "upgrade", "head"],
                         cwd=Path(knormctl.__file__).resolve().parent.parent, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
        assert con.execute("SELECT count(*) FROM samples").fetchone() == (len(before["samples"]),)
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (len(before["runs"]),)


def test_a_failed_upgrade_changes_nothing(db_url, monkeypatch):
    before = make_0001_database(db_url, n_runs=2, n_samples=5)
    real_upgrade = command.upgrade

    def upgrade_then_crash(config, revision):
        real_upgrade(config, revision)  # every migration has run when the failure comes
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(command, "upgrade", upgrade_then_crash)
    with pytest.raises(StoreError, match="from schema 0001 to .* failed: disk on fire; the database is unchanged"):
        open_store(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_heads() == ("0001",)
        meta = MetaData()
        meta.reflect(conn)
        assert "heartbeat_utc" not in meta.tables["runs"].c
        assert conn.scalar(select(func.count()).select_from(meta.tables["samples"])) == len(before["samples"])
    engine.dispose()
    monkeypatch.undo()
    with open_store(db_url) as store:  # and the next open upgrades it properly
        assert store.upgraded_from == "0001" and len(store.samples(sorted(before["runs"]))) == 10


def test_newer_revision_is_refused_untouched(db_url):
    with open_store(db_url) as store:
        store.create_run(command="sweep", task="lm", model_requested="m", config={}, command_line="x")
        with store.engine.begin() as conn:
            conn.execute(update(_version_table(conn)).values(version_num="0099_from_the_future"))
    path = sqlite_file(db_url)
    if path is not None:
        data, mtime, listing = path.read_bytes(), path.stat().st_mtime_ns, sorted(path.parent.iterdir())

    with pytest.raises(StoreError) as err:
        open_store(db_url)
    message = str(err.value)
    assert "0099_from_the_future" in message and f"knows up to {HEAD}" in message and "upgrade knormctl" in message
    assert "\n" not in message

    if path is not None:
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
        assert sorted(path.parent.iterdir()) == listing  # no backup, no new file
    engine = make_engine(db_url)
    with engine.connect() as conn:  # still stamped as it was, nothing upgraded
        assert MigrationContext.configure(conn).get_current_heads() == ("0099_from_the_future",)
    engine.dispose()


def _version_table(conn):
    meta = MetaData()
    meta.reflect(conn, only=["alembic_version"])
    return meta.tables["alembic_version"]


def test_unversioned_database_with_tables_is_not_adopted(tmp_path):
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path)) as other:
        other.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        other.commit()
    data, listing = path.read_bytes(), sorted(tmp_path.iterdir())
    with pytest.raises(StoreError, match="already holds tables .*notes.* but no knormctl schema revision"):
        open_store(path)
    assert path.read_bytes() == data and sorted(tmp_path.iterdir()) == listing


def test_migrations_folder_is_found_in_a_wheel_and_in_a_checkout(tmp_path, monkeypatch):
    assert migrations_dir() == Path(knormctl.__file__).resolve().parent.parent / "migrations"
    installed = tmp_path / "site-packages" / "knormctl"
    (installed / "_migrations").mkdir(parents=True)
    (installed / "_migrations" / "env.py").write_text("")
    monkeypatch.setattr(knormctl, "__file__", str(installed / "__init__.py"))
    assert migrations_dir() == installed / "_migrations"
    (installed / "_migrations" / "env.py").unlink()
    with pytest.raises(StoreError, match="migration scripts are missing"):
        migrations_dir()
