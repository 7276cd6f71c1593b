"""Connections: the SQLAlchemy engine, SQLite's pragmas, WAL, and waiting out a busy file.

SQLite waits for a lock (``busy_timeout``) in most places, but not in all: to avoid a
deadlock it answers SQLITE_BUSY at once when two connections that both hold a read lock
want to write, which is what happens when several processes switch a new file to WAL
at the same moment. ``retry_busy`` retries such a step with a growing, jittered pause
(the remedy SQLite documents for this case) for as long as the busy timeout would wait.
A lock file would serialise the first open too, but it would leave a second file next
to every database, need a writable folder even to read, and behave differently on
network filesystems; retrying needs nothing beside the database.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool

from knormctl.errors import StoreError, StoreFailure
from knormctl.store.locations import sqlite_file, sqlite_uri

WRITE = "knormctl_write"  # execution option: this transaction will write (SQLite: BEGIN IMMEDIATE)
BUSY_TIMEOUT_S = 30  # how long a writer waits for another one, in SQLite and in retry_busy

T = TypeVar("T")


def make_engine(url: str | URL, *, readonly: bool = False) -> Engine:
    """A SQLAlchemy engine with knormctl's connection settings (SQLite pragmas, PostgreSQL timeouts).

    ``readonly``: SQLite files are opened with ``mode=ro`` (or ``immutable=1`` where the
    folder cannot hold SQLite's -shm file), PostgreSQL sessions default to read-only
    transactions: nothing written through this engine can reach the database.
    """
    url = make_url(url)
    kwargs = {}
    backend = url.get_backend_name()
    if backend == "postgresql":
        # Long sweeps: a connection dropped by the server or a firewall is replaced, not fatal.
        kwargs["pool_pre_ping"] = True
        connect_args = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = 10  # an unreachable server fails in seconds
        if readonly:
            connect_args["options"] = "-c default_transaction_read_only=on"
        if connect_args:
            kwargs["connect_args"] = connect_args
    path = sqlite_file(url)  # None: in memory, or the caller's own file: URI (left to SQLite)
    if path is not None and readonly:
        uri = readonly_sqlite_uri(path)
        # sqlite3 opens the URI itself: SQLAlchemy's URL syntax has no safe spelling for every path.
        kwargs.update(creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False,
                                                      timeout=BUSY_TIMEOUT_S),
                      poolclass=QueuePool)
    engine = create_engine(url, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect_ro if readonly else _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def readonly_sqlite_uri(path: Path) -> str:
    """``mode=ro`` shares SQLite's locks with writers, so a report sees a consistent state even
    while a sweep writes; it needs the -shm file (SQLite creates it, empty of results, when the
    folder allows). Where no live writer can exist, ``immutable=1`` reads the file as it is,
    with no lock and no file beside it: a read-only folder without a -shm, or a file nobody may
    write (chmod a-w; mode=ro would leave -wal/-shm as read-only as the file, and once it is
    made writable again every write fails "attempt to write a readonly database")."""
    shm, wal = (path.with_name(path.name + suffix) for suffix in ("-shm", "-wal"))
    pending = wal.exists() and wal.stat().st_size > 0  # commits not yet in the file: need the lock protocol
    unwritable = not path.stat().st_mode & 0o222
    if shm.exists() or (os.access(path.parent, os.W_OK | os.X_OK) and (pending or not unwritable)):
        return sqlite_uri(path, mode="ro")
    if pending:
        raise StoreError(f"cannot read {path}: its write-ahead log {wal.name} holds changes that need the "
                         f"missing {shm.name} file, and folder {path.parent} is read-only "
                         "(copy the database with its -wal file to a writable folder)")
    return sqlite_uri(path, mode="ro", immutable="1")


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # SQLAlchemy emits BEGIN itself (_sqlite_on_begin): the sqlite3 module's legacy mode
    # never begins before DDL or SELECT, so a migration would not be one atomic step.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # Several processes writing one file wait for the lock (up to 30 s) instead of failing "database is locked".
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
    # (journal_mode=WAL belongs to the file, not the connection: ensure_wal sets it once the
    # file is known to be ours, so a refused file is left exactly as it was.)
    # Safe with WAL (a crash cannot corrupt the file; a power cut may lose the last commits),
    # and one fsync fewer per stored sample.
    cursor.execute("PRAGMA synchronous = NORMAL")
    # SQLite ignores foreign keys unless asked: deleting a run must delete its samples.
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_on_connect_ro(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # as above: SQLAlchemy emits BEGIN
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")  # a writer's commit is waited for
    cursor.execute("PRAGMA query_only = ON")  # a second guard beside mode=ro: no statement may write
    cursor.close()


def _sqlite_on_begin(conn) -> None:
    # A transaction that will write takes the write lock at BEGIN: a deferred one that reads
    # first and writes later fails at once with SQLITE_BUSY if another process committed in
    # between (busy_timeout cannot help there). Readers keep the cheap deferred BEGIN.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")


def is_busy(exc: BaseException) -> bool:
    """Is this SQLite's SQLITE_BUSY ("database is locked"), raw or wrapped by SQLAlchemy?"""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if not isinstance(orig, sqlite3.OperationalError):
        return False
    code = getattr(orig, "sqlite_errorcode", None)  # Python >= 3.11; the message is the fallback
    return (code & 0xFF) == sqlite3.SQLITE_BUSY if code is not None else "database is locked" in str(orig)


def retry_busy(step: Callable[[], T], *, timeout_s: float = BUSY_TIMEOUT_S,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``step``; while it fails with SQLITE_BUSY, pause (5 ms doubling to 0.25 s, jittered so
    that competing processes fall out of step) and run it again, for up to ``timeout_s``.
    ``step`` must be safe to repeat: one transaction that rolled back, or an idempotent pragma."""
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while True:
        try:
            return step()
        except (DBAPIError, sqlite3.OperationalError) as exc:
            if not is_busy(exc) or time.monotonic() + pause > deadline:
                raise
        sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 2, 0.25)


def ensure_wal(engine: Engine) -> None:
    """Switch the file to WAL: report/plot keep reading while a sweep writes, and writers never
    wait for readers. Persistent, so usually already done; needs a moment alone with the file,
    which several processes opening a new file at once compete for (hence ``retry_busy``)."""
    def switch() -> None:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection  # outside any transaction: the pragma is refused inside one
            if raw.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
                raw.execute("PRAGMA journal_mode = WAL")

    retry_busy(switch)


def reason(exc: BaseException) -> str:
    """The driver's message, first line only (psycopg adds hints on further lines)."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(orig).__name__


def open_error(exc: DBAPIError, shown: str, path: Path | None) -> StoreError:
    """The one line for a database that could not be opened or read."""
    why = reason(exc)
    if path is not None:
        if why == "file is not a database":
            return StoreError(f"{path} is not a SQLite database ({why})")
        if "malformed" in why:
            return StoreError(f"{path} is a damaged SQLite database ({why})")
        return StoreError(f"cannot open {path}: {why}")
    return StoreFailure(f"cannot connect to {shown}: {why}")
