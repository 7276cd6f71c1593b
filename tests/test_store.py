"""The Store: opening (and refusing) databases, every method, stale runs, and real concurrent writers."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import ExitStack, closing, contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import delete, func, select

import knormctl
from db_fixtures import db_url, pg_url  # noqa: F401  (fixtures)
from knormctl.errors import UsageError
from knormctl.store import (COMPLETE, COMPLETE_WITH_ERRORS, INTERRUPTED, RUNNING, Run, Sample, StoreError,
                            default_db_url, open_store, to_url, utcnow)
from knormctl.store.connect import ensure_wal, make_engine, retry_busy
from knormctl.store.migrate import alembic_config
from knormctl.store.locations import default_db_path

REPO = Path(knormctl.__file__).resolve().parent.parent


def new_run(store, **kw) -> int:
    args = dict(command="sweep", task="lm", model_requested="smollm2-135m", config={"keep_ratios": [1.0, 0.5]},
                command_line="knormctl sweep --keep-ratios 1.0,0.5")
    return store.create_run(**(args | kw))


def cell(i: int, key: str = "knorm|kr=0.5", **kw) -> dict:
    """The fields of one stored (sample x configuration) cell."""
    row = dict(sample_index=i, config_key=key, dataset="wiki-lite", prompt_tokens=64, press=key.split("|")[0],
               keep_ratio=0.5, prune_after=16, compress_mode="decode", ttft_s=0.01, new_tokens=8,
               generated_text=f"text {i}", generated_ids_json=[1, 2, 3], step_latencies_json=[0.01, 0.02])
    return row | kw


# ----------------------------------------------------------------------------- locations

def test_to_url_keeps_urls_and_turns_paths_into_absolute_sqlite_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert to_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert to_url("sqlite:///x.db") == "sqlite:///x.db"
    assert to_url("results.db") == f"sqlite:///{tmp_path / 'results.db'}"
    assert to_url(tmp_path / "a.db") == f"sqlite:///{tmp_path / 'a.db'}"


def test_default_url_is_the_env_var_else_the_user_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KNORMCTL_DB", str(tmp_path / "env.db"))
    assert default_db_url() == to_url(None) == f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("KNORMCTL_DB", "postgresql+psycopg://u@h/db")
    assert default_db_url() == "postgresql+psycopg://u@h/db"
    monkeypatch.delenv("KNORMCTL_DB")
    assert default_db_url() == f"sqlite:///{default_db_path()}"
    assert default_db_path().name == "knormctl.db" and "knormctl" in default_db_path().parent.parts[-1]


def test_sqlite_pragmas_are_set_on_every_connection(tmp_path):
    with open_store(tmp_path / "p.db") as store, store.engine.connect() as conn:
        def pragma(name):
            return conn.exec_driver_sql(f"PRAGMA {name}").scalar()
        assert pragma("journal_mode") == "wal"
        assert pragma("busy_timeout") == 30000
        assert pragma("foreign_keys") == 1
        assert pragma("synchronous") == 1  # NORMAL


# ----------------------------------------------------------------------------- refusing to open

def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and mtime: to prove nothing was created or modified."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(target, match: str, folder: Path) -> str:
    before = snapshot(folder)
    with pytest.raises(StoreError, match=match) as err:
        open_store(target)
    assert snapshot(folder) == before
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 100)
    message = refused(path, "is not a SQLite database", tmp_path)
    assert message == f"{path} is not a SQLite database (file is not a database)"


def a_real_database(path: Path, n: int = 150) -> bytes:
    with open_store(path) as store:
        run_id = new_run(store)
        for i in range(n):
            store.add_sample(run_id, **cell(i, generated_text="x" * 2000))
    return path.read_bytes()  # closed: everything checkpointed into the main file


@pytest.mark.parametrize("cut", ["mid-page", "page-boundary", "inside-header"])
def test_a_truncated_database_is_refused_untouched(tmp_path, cut):
    path = tmp_path / "cut.db"
    data = a_real_database(path)
    size = {"mid-page": len(data) // 2 + 123, "page-boundary": 4096 * 4, "inside-header": 60}[cut]
    path.write_bytes(data[:size])
    refused(path, f"{path} is a damaged SQLite database|{path} is not a SQLite database", tmp_path)


def test_a_directory_is_refused(tmp_path):
    refused(tmp_path, "is a directory, not a database file", tmp_path)


def test_a_missing_folder_is_refused_and_not_created(tmp_path):
    target = tmp_path / "no" / "such" / "results.db"
    message = refused(target, "does not exist", tmp_path)
    assert message == f"folder {tmp_path / 'no' / 'such'} does not exist"
    assert not (tmp_path / "no").exists()


def test_a_run_creates_a_new_file_only_when_it_first_uses_the_store(tmp_path):
    """open_store_for_run: the location is checked at once, the file made at the first real use
    (a run refused after the command opened its store left an empty database behind)."""
    import copy

    from knormctl.store.db import open_store_for_run

    with pytest.raises(StoreError, match="does not exist"):
        open_store_for_run(tmp_path / "no" / "r.db")
    path = tmp_path / "r.db"
    with open_store_for_run(path) as store:
        assert store.runs_in_group("g") == [] and store.upgrade_note is None
        assert not hasattr(store, "_engine") and copy.copy(store) is not None  # probes open nothing
        assert not path.exists()
        run_id = new_run(store, group_name="g")
        assert path.exists() and [r.id for r in store.runs_in_group("g")] == [run_id]
    with open_store_for_run(path) as again:  # an existing file is opened at once, as open_store does
        assert type(again).__name__ == "Store" and again.get_run(run_id).group_name == "g"


def test_an_unwritable_folder_is_refused_even_for_root(tmp_path, monkeypatch):
    # (tests/test_read_only.py refuses a really read-only folder, in a process held to permissions)
    import knormctl.store.locations as db

    monkeypatch.setattr(db.os, "access", lambda path, mode: Path(path) != tmp_path)  # as a non-root user would see it
    message = refused(tmp_path / "x.db", "is not writable", tmp_path)
    assert message == f"folder {tmp_path} is not writable"


def test_an_empty_file_is_a_new_database(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    with open_store(path) as store:
        assert store.created


def test_the_password_never_appears(tmp_path):
    url = "postgresql+psycopg://knorm:s3cr3t-pw@127.0.0.1:1/results"  # nothing listens on port 1
    with pytest.raises(StoreError) as err:
        open_store(url)
    message = str(err.value)
    assert "s3cr3t-pw" not in message and "knorm:***@127.0.0.1:1/results" in message
    assert message.startswith("cannot connect to ") and "\n" not in message


def test_a_server_that_refuses_the_connection_is_a_runtime_failure_exit_1():
    """The address is well formed, the server is not there: a runtime failure (exit 1), where
    a malformed URL is bad input (exit 2). Every store error exited 2."""
    from typer.testing import CliRunner

    from knormctl.cli import app

    res = CliRunner().invoke(app, ["report", "--db", "postgresql+psycopg://u:pw@127.0.0.1:1/x"])
    assert res.exit_code == 1 and res.stderr.startswith("Error: cannot connect to "), res.output
    bad = CliRunner().invoke(app, ["report", "--db", "nosuchdb://x"])
    assert bad.exit_code == 2 and "no driver for nosuchdb" in bad.stderr


def test_a_bad_url_is_one_clear_line():
    with pytest.raises(StoreError, match="no driver for nosuchdb"):
        open_store("nosuchdb://u:pw@h/x")


# ----------------------------------------------------------------------------- the Store API

def test_run_round_trip(db_url):
    with open_store(db_url) as store:
        before = utcnow()
        run_id = new_run(store, env={"cpu": "test", "threads": 2}, group_name="g1", shard="1/2",
                         samples_planned=4, dtype="float32", device="cpu", knormctl_version="0.1.0",
                         git_commit="abc123")
        run = store.get_run(run_id)
        assert (run.status, run.command, run.task, run.group_name, run.shard) == (RUNNING, "sweep", "lm", "g1", "1/2")
        assert run.config_json == {"keep_ratios": [1.0, 0.5]} and run.env_json == {"cpu": "test", "threads": 2}
        assert (run.pid, run.hostname) == (os.getpid(), socket.gethostname())
        assert run.started_utc.tzinfo is None and before - timedelta(seconds=1) <= run.started_utc <= utcnow()
        assert run.heartbeat_utc == run.started_utc and run.ended_utc is None
        assert (run.samples_done, run.samples_failed, run.samples_planned) == (0, 0, 4)

        store.update_run(run_id, model_resolved="/models/x", model_hash="sha256:1")
        with pytest.raises(TypeError, match="no column"):
            store.update_run(run_id, not_a_column=1)
        with pytest.raises(ValueError, match="unknown run status"):
            store.update_run(run_id, status="done")
        with pytest.raises(StoreError, match="run 999999 does not exist"):
            store.update_run(999999, model_hash="x")

        time.sleep(0.01)
        store.heartbeat(run_id)
        assert store.get_run(run_id).heartbeat_utc > run.heartbeat_utc

        store.finish_run(run_id, COMPLETE_WITH_ERRORS, error="1 sample failed")
        run = store.get_run(run_id)
        assert (run.status, run.error, run.model_resolved, run.model_hash) == (
            COMPLETE_WITH_ERRORS, "1 sample failed", "/models/x", "sha256:1")
        assert run.ended_utc >= run.started_utc
        with pytest.raises(ValueError):
            store.finish_run(run_id, RUNNING)

        store.reopen_run(run_id)  # --resume takes it over
        run = store.get_run(run_id)
        assert (run.status, run.error, run.ended_utc, run.pid) == (RUNNING, None, None, os.getpid())
        assert store.get_run(424242) is None


def test_only_the_runs_owner_writes_to_it(db_url):
    """Once a --resume elsewhere took a run over, the old owner's samples, heartbeats, token
    matches and end are refused: they would mix with the new owner's or end the run under it."""
    with open_store(db_url) as store:
        run_id = new_run(store)
        store.add_sample(run_id, **cell(0, "none"))
        taken = utcnow() - timedelta(seconds=5)
        store.update_run(run_id, pid=4321, hostname="gpu-node-7", heartbeat_utc=taken)
        why = f"run {run_id} was taken over by process 4321 on gpu-node-7"
        for write in (lambda: store.add_sample(run_id, **cell(1, "none")), lambda: store.heartbeat(run_id),
                      lambda: store.set_token_match(run_id, 0, {"none": 1.0}),
                      lambda: store.finish_run(run_id, COMPLETE)):
            with pytest.raises(StoreError, match=why):
                write()
        run = store.get_run(run_id)
        assert (run.status, run.samples_done, run.heartbeat_utc, run.ended_utc) == (RUNNING, 1, taken, None)
        assert [(s.sample_index, s.token_match) for s in store.samples(run_id)] == [(0, None)]
        with pytest.raises(StoreError, match="run 999999 does not exist"):
            store.add_sample(999999, **cell(0, "none"))


def test_a_host_renamed_mid_run_is_still_its_owner(db_url, monkeypatch):
    """A laptop waking on another network gets another hostname: the ownership check read the
    current name and stopped the sweep, blaming a take-over by itself."""
    with open_store(db_url) as store:
        run_id = new_run(store)
        monkeypatch.setattr(socket, "gethostname", lambda: "renamed-host")
        store.add_sample(run_id, **cell(0, "none"))
        store.heartbeat(run_id)
        store.finish_run(run_id, COMPLETE)
        assert store.get_run(run_id).status == COMPLETE


def test_an_id_no_column_holds_is_no_run_on_every_backend(db_url):
    """PostgreSQL's INTEGER ids: 'reading run 2147483648 failed: integer out of range' (SQLite:
    'does not exist'); 99999999999999999999 was an OverflowError on both."""
    with open_store(db_url) as store:
        run_id = new_run(store)
        for huge in (2**31, 10**20):
            assert store.get_run(huge) is None and store.get_runs([run_id, huge])[0].id == run_id
            with pytest.raises(UsageError, match=f"no run {huge} in"):
                store.delete_runs([huge])
        assert [r.id for r in store.list_runs(limit=10**20)] == [run_id]


def test_a_resumed_run_counts_the_time_it_sat_stopped_apart(db_url):
    """--resume hours later: 'took' is the time measuring, and the stop is said on its own."""
    from knormctl.render.export import header_lines
    from knormctl.render.header import run_header
    from knormctl.render.summary import build_summary

    with open_store(db_url) as store:
        now = utcnow()
        ctrl_c, killed = new_run(store), new_run(store)
        # measured 1 h, stopped by Ctrl-C, resumed 2 h later
        store.update_run(ctrl_c, started_utc=now - timedelta(hours=3), status=INTERRUPTED,
                         ended_utc=now - timedelta(hours=2))
        # killed (no end, its last beat 2 h ago), resumed now
        store.update_run(killed, started_utc=now - timedelta(hours=3), heartbeat_utc=now - timedelta(hours=2))
        for run_id in (ctrl_c, killed):
            store.reopen_run(run_id)
            assert store.get_run(run_id).stopped_s == pytest.approx(2 * 3600, abs=60)
            store.finish_run(run_id, COMPLETE)
        runs = [store.get_run(r) for r in (ctrl_c, killed)]
    header = run_header(runs[:1])
    assert header.duration_s == pytest.approx(3600, abs=60) and header.stopped_s == pytest.approx(7200, abs=60)
    text = " ".join(header_lines(build_summary(runs[:1], [])))
    assert "took 1h00m (and sat stopped 2h00m before a resume, not counted)" in text
    merged = run_header(runs)  # shards may run side by side: one's stop is no gap in the group's span
    assert merged.duration_s == pytest.approx(3 * 3600, abs=60) and merged.stopped_s == pytest.approx(4 * 3600, abs=120)


def test_a_run_resumed_twice_counts_both_stops(db_url, monkeypatch):
    """If this fails, a run interrupted and resumed twice counts its first stop as measuring time."""
    from knormctl.render.header import run_header
    from knormctl.store import api

    t0 = utcnow() - timedelta(hours=10)
    clock = [t0]
    monkeypatch.setattr(api, "utcnow", lambda: clock[0])
    with open_store(db_url) as store:
        run_id = new_run(store)  # starts at t0
        for ran, stopped in ((1, 2), (1, 3)):  # measure 1 h, Ctrl-C, resume 2 h later; again, 3 h later
            clock[0] += timedelta(hours=ran)
            store.finish_run(run_id, INTERRUPTED)
            clock[0] += timedelta(hours=stopped)
            store.reopen_run(run_id)
        clock[0] += timedelta(hours=1)
        store.finish_run(run_id, COMPLETE)  # t0 + 8 h: 3 h measuring, 2 h + 3 h stopped
        run = store.get_run(run_id)
    assert run.stopped_s == pytest.approx(5 * 3600, abs=1)
    header = run_header([run])
    assert header.duration_s == pytest.approx(3 * 3600, abs=1) and header.stopped_s == pytest.approx(5 * 3600, abs=1)


def test_listing_runs(db_url):
    with open_store(db_url) as store:
        assert store.last_run() is None and store.list_runs() == []
        ids = [new_run(store, group_name="a" if i % 2 else "b") for i in range(5)]
        assert [r.id for r in store.list_runs()] == ids[::-1]  # newest first
        assert [r.id for r in store.list_runs(limit=2)] == ids[:-3:-1]
        assert [r.id for r in store.list_runs(group="a")] == [ids[3], ids[1]]
        assert store.last_run().id == ids[-1] and store.last_run(group="a").id == ids[3]
        assert store.last_run(group="nope") is None
        assert [r.id for r in store.runs_in_group("b")] == [ids[0], ids[2], ids[4]]  # oldest first


def test_samples_counters_cells_and_resume(db_url):
    with open_store(db_url) as store:
        run_id, other = new_run(store), new_run(store)
        ids = [store.add_sample(run_id, **cell(i, key)) for i in range(3) for key in ("none", "knorm|kr=0.5")]
        store.add_sample(run_id, **cell(3, "knorm|kr=0.5", error="RuntimeError: CUDA out of memory",
                                        generated_text=None, generated_ids_json=None, step_latencies_json=None))
        store.add_sample(other, **cell(0, "none"))
        run = store.get_run(run_id)
        assert (run.samples_done, run.samples_failed) == (6, 1)
        assert run.heartbeat_utc >= run.started_utc

        rows = store.samples(run_id)
        assert [s.id for s in rows[:6]] == ids and len(rows) == 7
        assert rows[0].created_utc.tzinfo is None and rows[0].keep_ratio == 0.5 and rows[0].run_id == run_id
        assert len(store.samples([run_id, other])) == 8 and store.samples([]) == []
        with pytest.raises(Exception):  # the big columns are not loaded without with_blobs
            rows[0].generated_text
        full = store.samples(run_id, with_blobs=True)
        assert full[0].generated_text == "text 0" and full[0].step_latencies_json == [0.01, 0.02]
        assert full[0].generated_ids_json == [1, 2, 3]

        store.set_token_match(run_id, 1, {"none": 1.0, "knorm|kr=0.5": 0.75, "absent": 0.1})
        matches = {(s.sample_index, s.config_key): s.token_match for s in store.samples(run_id)}
        assert matches[(1, "none")] == 1.0 and matches[(1, "knorm|kr=0.5")] == 0.75
        assert matches[(0, "none")] is None

        expected = {(i, k, 0) for i in range(3) for k in ("none", "knorm|kr=0.5")}
        assert store.done_cells(run_id) == expected  # the failed cell is not done
        with pytest.raises(StoreError):  # a cell is stored once per run
            store.add_sample(run_id, **cell(0, "none"))
        assert store.get_run(run_id).samples_done == 6  # and the failed insert counted nothing
        # ... once per repeat: the same sample and configuration measured again is another cell
        store.add_sample(run_id, **cell(0, "none", repeat=1))
        store.set_token_match(run_id, 0, {"none": 0.5}, repeat=1)
        expected |= {(0, "none", 1)}
        assert store.done_cells(run_id) == expected
        by_cell = {(s.sample_index, s.config_key, s.repeat): s.token_match for s in store.samples(run_id)}
        assert by_cell[(0, "none", 1)] == 0.5 and by_cell[(0, "none", 0)] is None  # repeat 0 untouched

        assert store.delete_failed_cells(run_id) == 1
        run = store.get_run(run_id)
        assert (run.samples_done, run.samples_failed) == (7, 0) and len(store.samples(run_id)) == 7
        assert store.delete_failed_cells(run_id) == 0
        store.add_sample(run_id, **cell(3, "knorm|kr=0.5"))  # the resumed cell, measured again
        assert store.done_cells(run_id) == expected | {(3, "knorm|kr=0.5", 0)}

        with pytest.raises(TypeError, match="no column"):
            store.add_sample(run_id, **cell(9, bogus=1))
        with pytest.raises(StoreError, match="does not exist"):
            store.add_sample(999999, **cell(0))


def test_deleting_a_run_deletes_its_samples(db_url):
    with open_store(db_url) as store:
        run_id = new_run(store)
        store.add_sample(run_id, **cell(0))
        with store.engine.begin() as conn:  # foreign keys are enforced (SQLite: PRAGMA foreign_keys)
            conn.execute(delete(Run).where(Run.id == run_id))
        with store.engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Sample)) == 0


def test_a_deleted_runs_id_is_never_given_to_a_new_run(db_url):
    """Run ids are what users write down and share ("run 5"): deleting the newest run must not
    hand its id to the next one (SQLite's plain rowid would reuse max(id) + 1)."""
    with open_store(db_url) as store:
        first, newest = new_run(store), new_run(store)
        store.add_sample(newest, **cell(0))
        store.finish_run(newest, COMPLETE)
        assert store.delete_runs([newest]) == (1, 1)
        again = new_run(store)
        assert again > newest and again != first
        store.finish_run(again, COMPLETE)
    with open_store(db_url) as store:  # the high-water mark is kept in the file, not the process
        store.delete_runs([again])
        assert new_run(store) > again


def dead_pid() -> int:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(dead.stdout)  # exited and reaped: no such process any more


def stored_statuses(store) -> dict[int, str]:
    """What the database itself says (a raw SELECT, no verdicts applied)."""
    with store.engine.connect() as conn:
        return dict(conn.execute(select(Run.id, Run.status)).all())


def test_reading_shows_stale_runs_as_interrupted_without_writing_and_writers_record_it(db_url):
    with open_store(db_url) as store:
        pid = dead_pid()
        host = socket.gethostname()
        mine = new_run(store)
        crashed = new_run(store, group_name="g")
        store.update_run(crashed, pid=pid)
        elsewhere_old = new_run(store)
        store.update_run(elsewhere_old, hostname="gpu-node-7", pid=1234, heartbeat_utc=utcnow() - timedelta(hours=2))
        elsewhere_alive = new_run(store)
        store.update_run(elsewhere_alive, hostname="gpu-node-8", pid=1234, heartbeat_utc=utcnow())
        finished = new_run(store)
        store.finish_run(finished, COMPLETE)
        store.update_run(finished, pid=pid)
        before = stored_statuses(store)

        run = store.get_run(crashed)  # reading shows the truth ...
        assert run.status == INTERRUPTED and run.stored_status == RUNNING
        assert run.error.startswith(f"process {pid} on {host} stopped without finishing")
        assert run.ended_utc is not None
        shown = {r.id: r for r in store.list_runs()}
        assert shown[elsewhere_old].status == INTERRUPTED
        assert shown[elsewhere_old].error.startswith("process 1234 on gpu-node-7 stopped without finishing "
                                                     "(stale heartbeat")
        assert shown[elsewhere_alive].status == RUNNING and shown[mine].status == RUNNING  # alive
        assert shown[finished].status == COMPLETE
        assert [r.status for r in store.runs_in_group("g")] == [INTERRUPTED]
        assert [r.status for r in store.get_runs([crashed, mine])] == [RUNNING, INTERRUPTED]  # oldest first
        assert stored_statuses(store) == before  # ... and writes nothing
        assert before[crashed] == RUNNING

        assert sorted(store.mark_stale_runs()) == sorted([crashed, elsewhere_old])  # a writer records it
        after = stored_statuses(store)
        assert after[crashed] == after[elsewhere_old] == INTERRUPTED and after[mine] == RUNNING
        assert store.get_run(crashed).stored_status is None  # the database says it now
        assert store.mark_stale_runs() == []  # nothing left to mark
        assert store.mark_stale_runs(stale_after_s=0) == [elsewhere_alive]


def test_a_run_is_taken_over_only_when_its_owner_is_gone(db_url):
    with open_store(db_url) as store:
        alive_here = new_run(store)  # this process: alive
        alive_elsewhere = new_run(store)
        store.update_run(alive_elsewhere, hostname="gpu-node-8", pid=1234, heartbeat_utc=utcnow())
        dead_here = new_run(store)
        store.update_run(dead_here, pid=dead_pid())
        recycled = new_run(store)  # a live pid born after the owner's last sign of life: another program
        long_ago = utcnow() - timedelta(days=365 * 30)
        store.update_run(recycled, pid=1, started_utc=long_ago, heartbeat_utc=long_ago)
        stale_elsewhere = new_run(store)
        store.update_run(stale_elsewhere, hostname="gpu-node-7", pid=99,
                         heartbeat_utc=utcnow() - timedelta(hours=1))
        for run_id in (alive_here, alive_elsewhere):
            with pytest.raises(UsageError, match=f"run {run_id} is still running .*resume it once"):
                store.reopen_run(run_id)
        assert store.get_run(alive_elsewhere).hostname == "gpu-node-8"  # untouched
        for run_id in (dead_here, stale_elsewhere):  # stored 'running', owner gone: taken over
            store.reopen_run(run_id)
            run = store.get_run(run_id)
            assert (run.status, run.pid, run.hostname) == (RUNNING, os.getpid(), socket.gethostname())
        # pid 1 lives but was born long after 1995: not the run's owner
        assert store.get_run(recycled).status == INTERRUPTED
        with pytest.raises(StoreError, match="run 424242 does not exist"):
            store.reopen_run(424242)


def test_a_resumed_run_is_running_while_its_new_owner_lives(db_url):
    """A resume keeps the run's first start and hands it to a process born later. That process
    was read as a recycled pid (born after the start), so a live resume showed 'interrupted' and
    could be deleted, resumed a second time or exported half-done under it."""
    with open_store(db_url) as store:
        run_id = new_run(store)
        store.update_run(run_id, started_utc=utcnow() - timedelta(days=2), pid=dead_pid(),
                         heartbeat_utc=utcnow() - timedelta(days=1))
        store.reopen_run(run_id)  # this process, born long after the start, takes it over
        assert store.get_run(run_id).status == RUNNING
        assert store.mark_stale_runs() == []
        with pytest.raises(UsageError, match=f"run {run_id} is still running"):
            store.reopen_run(run_id)
        with pytest.raises(UsageError, match=f"run {run_id} is still running"):
            store.delete_runs([run_id])


def test_deleting_runs(db_url):
    with open_store(db_url) as store:
        keep, gone, alive = new_run(store), new_run(store), new_run(store)
        for run_id in (keep, gone, alive):
            for i in range(3):
                store.add_sample(run_id, **cell(i))
        store.finish_run(gone, COMPLETE)
        store.finish_run(keep, COMPLETE)
        with pytest.raises(UsageError, match=f"run {alive} is still running.*nothing deleted"):
            store.delete_runs([gone, alive])
        with pytest.raises(UsageError, match="no run 999 in .*nothing deleted"):
            store.delete_runs([gone, 999])
        assert len(store.samples([keep, gone, alive])) == 9  # refused: nothing deleted
        assert store.delete_runs([gone, gone]) == (1, 3)
        assert store.get_run(gone) is None and [s.run_id for s in store.samples([keep, gone])] == [keep] * 3


# ----------------------------------------------------------------------------- real processes

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    urls, tag, n, gate = sys.argv[1].split(" "), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    from knormctl.store import COMPLETE, open_store
    for r, url in enumerate(urls):  # one round per URL: a new database each time
        (gate / f"ready-{r}-{tag}").touch()
        while not (gate / f"go-{r}").exists():  # all processes open the fresh database at the same moment
            time.sleep(0.002)
        with open_store(url) as store:
            run_id = store.create_run(command="sweep", task="lm", model_requested="tiny", config={"worker": tag},
                                      command_line="test", group_name="concurrency")
            for i in range(n):
                store.add_sample(run_id, sample_index=i, config_key="knorm|kr=0.5", dataset="synthetic",
                                 prompt_tokens=64, press="knorm", keep_ratio=0.5, prune_after=16,
                                 compress_mode="decode", generated_text="x" * 500, step_latencies_json=[0.01] * 50)
            store.finish_run(run_id, COMPLETE)
            print(run_id, int(store.created), flush=True)
""")


def worker_env() -> dict:
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@contextmanager
def cpu_burners(n: int):
    """``n`` CPU-bound processes: the machine as busy as a shared GPU node, where scheduling
    delays widen every race between the writers."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_writers(urls: list[str], n_procs: int, n_samples: int, gate: Path,
                burners: int = 0) -> list[subprocess.CompletedProcess]:
    """``n_procs`` processes; in each round all of them open ``urls[round]`` (new) at once and write.
    ``burners`` CPU-bound processes run beside them from the first round on (started once the
    writers have imported knormctl, so the test does not spend its time on imports)."""
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, " ".join(urls), str(k), str(n_samples), str(gate)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())
             for k in range(n_procs)]
    deadline = time.monotonic() + 120
    with ExitStack() as load:
        for r in range(len(urls)):
            while (len(list(gate.glob(f"ready-{r}-*"))) < n_procs and time.monotonic() < deadline
                   and all(p.poll() is None for p in procs)):  # a crashed worker ends the rounds early
                time.sleep(0.005)
            if r == 0:
                load.enter_context(cpu_burners(burners))
            (gate / f"go-{r}").touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def check_writers(urls: list[str], results, n_procs: int, n_samples: int, created: int | None = None) -> None:
    for r in results:
        assert r.returncode == 0, r.stderr
        assert "locked" not in r.stderr
    printed = [line.split() for r in results for line in r.stdout.splitlines()]  # run id, created the schema?
    assert len(printed) == n_procs * len(urls)
    # each new database created exactly once
    assert sum(int(flag) for _, flag in printed) == (len(urls) if created is None else created)
    for url in urls:
        with open_store(url) as store:
            runs = store.runs_in_group("concurrency")
            assert len(runs) == n_procs and {r.status for r in runs} == {COMPLETE}
            assert all(r.samples_done == n_samples for r in runs)
            rows = store.samples([r.id for r in runs])
            assert len(rows) == n_procs * n_samples
            assert len({(s.run_id, s.sample_index) for s in rows}) == len(rows)  # no duplicates
        if url.startswith("sqlite:///"):
            with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as raw:
                assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def at_head_in_rollback_mode(path: Path) -> None:
    """A database at head that is not yet in WAL, as ``alembic upgrade head`` (or the first
    opener, between its migration and its switch to WAL) leaves it."""
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    engine.dispose()
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_four_processes_write_one_new_sqlite_file_at_once_under_load(tmp_path):
    """Issue 15: the first open of one new file by several processes failed ~1 in 6 under load
    ("database is locked" switching to WAL). Six rounds beside CPU burners, each on a new file:
    created from nothing, or (every other round) already at head but not yet in WAL, so that all
    four processes switch it to WAL at the same moment."""
    urls = [f"sqlite:///{tmp_path / f'shared-{r}.db'}" for r in range(6)]
    for url in urls[1::2]:
        at_head_in_rollback_mode(Path(url.removeprefix("sqlite:///")))
    results = run_writers(urls, 4, 10, tmp_path / "gate", burners=os.cpu_count() or 2)
    check_writers(urls, results, 4, 10, created=len(urls[0::2]))


def test_concurrent_switches_to_wal_never_fail(tmp_path):
    """The exact race behind issue 15, many times: connections switching one new file to WAL at the
    same moment. SQLite answers all but one with SQLITE_BUSY at once (busy_timeout does not apply);
    without retrying, 13 of 100 rounds failed here."""
    failures = []
    for r in range(60):
        path = tmp_path / f"wal-{r}.db"
        with closing(sqlite3.connect(path)) as raw:  # a file in rollback-journal mode, as a new one is
            raw.execute("CREATE TABLE t (x)")
        engines = [make_engine(f"sqlite:///{path}") for _ in range(4)]
        for engine in engines:
            engine.connect().close()  # connected (pragmas set) before the race starts
        barrier = threading.Barrier(len(engines))

        def switch(engine):
            barrier.wait()
            try:
                ensure_wal(engine)
            except Exception as exc:  # noqa: BLE001  (collected and asserted on below)
                failures.append(f"round {r}: {exc}")

        threads = [threading.Thread(target=switch, args=(e,)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for engine in engines:
            engine.dispose()
        with closing(sqlite3.connect(path)) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert failures == []


def test_retry_busy_retries_only_busy_and_gives_up_at_its_deadline():
    calls, pauses = [], []
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise busy
        return "done"

    assert retry_busy(flaky, sleep=pauses.append) == "done" and len(calls) == 4
    assert len(pauses) == 3 and pauses[0] < pauses[-1]  # backing off
    other = sqlite3.OperationalError("no such table: runs")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):  # not busy: at once
        retry_busy(lambda: (_ for _ in ()).throw(other), sleep=pauses.append)
    assert len(pauses) == 3
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # busy for ever: gives up
        retry_busy(lambda: (_ for _ in ()).throw(busy), timeout_s=0.2)
    assert time.monotonic() - started < 5


@pytest.mark.postgres
def test_two_processes_write_one_postgresql_database_at_once(pg_url, tmp_path):
    results = run_writers([pg_url], 2, 50, tmp_path / "gate")
    check_writers([pg_url], results, 2, 50)


KILLED = textwrap.dedent("""
    import sys
    from knormctl.store import open_store
    store = open_store(sys.argv[1])
    run_id = store.create_run(command="sweep", task="lm", model_requested="tiny", config={}, command_line="test")
    print(run_id, flush=True)
    i = 0
    while True:  # writes until killed
        store.add_sample(run_id, sample_index=i, config_key="none", dataset="synthetic", prompt_tokens=64,
                         press="none", keep_ratio=1.0, prune_after=0, compress_mode="decode",
                         generated_text="y" * 4000)
        i += 1
""")


def test_sigkill_mid_write_leaves_a_consistent_database(tmp_path):
    path = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(path)], stdout=subprocess.PIPE, text=True,
                            env=worker_env())
    run_id = int(proc.stdout.readline())
    with open_store(path) as watcher:  # wait until it is busy writing
        deadline = time.monotonic() + 30
        while watcher.get_run(run_id).samples_done < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with open_store(path) as store:
        run = store.get_run(run_id)
        assert run.status == INTERRUPTED and f"process {proc.pid}" in run.error
        assert run.samples_done >= 30 and len(store.samples(run_id)) == run.samples_done  # every counted row kept


def test_a_stale_run_is_shown_ended_at_its_last_heartbeat_as_a_writer_records_it(tmp_path):
    """A reader showing a stale run as interrupted must give it the end a writer stores
    (its last heartbeat), not 'now': the report's duration would grow with every hour since the crash."""
    with open_store(tmp_path / "r.db") as store:
        run_id = new_run(store)
        last = (utcnow() - timedelta(hours=2)).replace(microsecond=0)
        store.update_run(run_id, hostname="gpu-node-7", pid=1234, started_utc=last - timedelta(hours=1),
                         heartbeat_utc=last)
        shown = store.get_run(run_id)
        assert shown.status == INTERRUPTED and shown.ended_utc == last
        assert store.mark_stale_runs() == [run_id]
        assert store.get_run(run_id).ended_utc == last


def test_a_run_elsewhere_is_alive_for_ten_minutes_after_its_last_heartbeat(tmp_path):
    """A heartbeat comes every 60 s; a run on another host whose last one is 5 minutes old
    (a slow cell) still runs -- it must not be shown interrupted, nor be taken over or deleted --
    and is gone once ten beats are missed."""
    from knormctl.errors import UsageError
    from knormctl.store import RUNNING

    with open_store(tmp_path / "r.db") as store:
        slow, gone = new_run(store), new_run(store)
        store.update_run(slow, hostname="gpu-node-8", pid=4321, heartbeat_utc=utcnow() - timedelta(minutes=5))
        store.update_run(gone, hostname="gpu-node-8", pid=4322, heartbeat_utc=utcnow() - timedelta(minutes=11))
        assert [r.status for r in store.get_runs([slow, gone])] == [RUNNING, INTERRUPTED]
        assert store.mark_stale_runs() == [gone]
        with pytest.raises(UsageError, match=f"run {slow} is still running"):
            store.reopen_run(slow)


def test_extended_busy_codes_are_busy_and_retried():
    """Python reports SQLite's *extended* code (SQLITE_BUSY_SNAPSHOT = 517, BUSY_RECOVERY =
    261); they are SQLITE_BUSY and must be retried, not raised at once."""
    import sqlite3

    from knormctl.store.connect import is_busy, retry_busy

    def busy(code: int) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError("database is locked")
        exc.sqlite_errorcode = code
        return exc

    assert is_busy(busy(sqlite3.SQLITE_BUSY)) and is_busy(busy(517)) and is_busy(busy(261))
    assert not is_busy(busy(sqlite3.SQLITE_LOCKED))  # 6: another error, the message notwithstanding
    calls = []

    def step():
        calls.append(1)
        if len(calls) < 3:
            raise busy(517)
        return "done"

    assert retry_busy(step, sleep=lambda s: None) == "done" and len(calls) == 3
