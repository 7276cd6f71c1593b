"""Opening the results database (SQLite file or SQLAlchemy URL), migrating it, and the Store.

``open_store()`` checks the location, applies the SQLite pragmas, brings the schema
to the newest Alembic revision (a new database is created at head; an older one is
backed up, then upgraded; one from a newer knormctl is refused), and returns a
``Store``: the only door to the database. Callers never see a Session; every
method is one short transaction that commits itself.

Timestamps: every ``*_utc`` column holds a *naive* datetime in UTC. SQLite's
DateTime drops the zone anyway, and PostgreSQL's ``timestamp without time zone``
would shift an aware value by the session's TimeZone, so the store strips the zone
from whatever it is given and returns naive UTC values.

This module must load without torch: it never imports ``knormctl.engine``.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Column, Engine, MetaData, String, Table, create_engine, delete, event, func, inspect, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import defer, sessionmaker

import knormctl
from knormctl.errors import StoreError
from knormctl.store.models import COMPLETE, COMPLETE_WITH_ERRORS, FAILED, INTERRUPTED, RUNNING, Run, Sample

STATUSES = (RUNNING, COMPLETE, COMPLETE_WITH_ERRORS, INTERRUPTED, FAILED)

SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file
_WRITE = "knormctl_write"  # execution option: this transaction will write (SQLite: BEGIN IMMEDIATE)
_PG_MIGRATION_LOCK = 7_391_004_217  # any constant: serialises concurrent first opens on PostgreSQL
# Alembic keeps the running migration in module globals: one at a time per process
# (other processes are kept apart by the database lock taken in _migrate).
_ALEMBIC_LOCK = threading.Lock()
_BLOB_COLUMNS = (Sample.step_latencies_json, Sample.generated_ids_json, Sample.generated_text)


def utcnow() -> datetime:
    """Now, as the store keeps it: a naive datetime in UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _naive_utc(value):
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


# ----------------------------------------------------------------------------- locations

def default_db_path() -> Path:
    """The SQLite file used when neither ``--db`` nor ``KNORMCTL_DB`` says otherwise."""
    import platformdirs

    return Path(platformdirs.user_data_dir("knormctl", appauthor=False)) / "knormctl.db"


def default_db_url() -> str:
    """``$KNORMCTL_DB`` (a URL or a path), else a SQLite file in the user data folder."""
    env = os.environ.get("KNORMCTL_DB", "").strip()
    return to_url(env) if env else _path_url(default_db_path())


def to_url(url_or_path: str | os.PathLike | None) -> str:
    """A SQLAlchemy URL (anything with ``://``) is kept; a path becomes ``sqlite:///<absolute path>``;
    None means ``default_db_url()``."""
    if url_or_path is None or str(url_or_path).strip() == "":
        return default_db_url()
    text = str(url_or_path).strip()
    return text if "://" in text else _path_url(Path(text))


def _path_url(path: Path) -> str:
    return "sqlite:///" + str(path.expanduser().absolute())


def migrations_dir() -> Path:
    """The Alembic scripts: inside the installed wheel, else the source checkout's ``migrations/``."""
    package = Path(knormctl.__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError(f"knormctl's migration scripts are missing (looked in {package / '_migrations'} "
                     f"and {package.parent / 'migrations'}); reinstall knormctl")


# The newest migration's revision id. Opening a database already at this revision reads
# one row and never imports Alembic (~230 ms: report and plot must start fast);
# tests/test_migrations.py checks that it equals the scripts' head.
SCHEMA_HEAD = "0003"
_alembic_version = Table("alembic_version", MetaData(), Column("version_num", String(32)))


def _at_head(engine: Engine) -> bool:
    """True when the database is stamped exactly SCHEMA_HEAD (cheap: one SELECT)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        return conn.execute(select(_alembic_version.c.version_num)).scalars().all() == [SCHEMA_HEAD]


def alembic_config(connection=None):
    """An Alembic Config built in code (no alembic.ini at runtime); ``env.py`` uses ``connection``."""
    from alembic.config import Config

    cfg = Config()
    # ConfigParser interpolation: a '%' in the path must be doubled.
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for other backends and in-memory databases."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):  # a sqlite3 URI: leave it to SQLite
        return None
    return Path(url.database).absolute()


def _check_sqlite_file(path: Path) -> None:
    """Refuse, before SQLite creates or touches anything, a location that cannot hold our database."""
    parent = path.parent
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a database file")
    if not parent.exists():
        raise StoreError(f"folder {parent} does not exist")
    if not parent.is_dir():
        raise StoreError(f"{parent} is not a folder")
    # WAL keeps two files next to the database (-wal, -shm): the folder must be writable too.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"folder {parent} is not writable")
    if not path.exists():
        return
    if not path.is_file():
        raise StoreError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"{path} is not writable")
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    # An empty file is a new database to SQLite; anything else must start with the header.
    # (Truncation behind a valid header is caught by SQLite itself on the first read.)
    if head and head != SQLITE_HEADER:
        raise StoreError(f"{path} is not a SQLite database (file is not a database)")


# ----------------------------------------------------------------------------- engine

def make_engine(url: str | URL) -> Engine:
    """A SQLAlchemy engine with knormctl's connection settings (SQLite pragmas, PostgreSQL timeouts)."""
    url = make_url(url)
    kwargs = {}
    if url.get_backend_name() == "postgresql":
        # Long sweeps: a connection dropped by the server or a firewall is replaced, not fatal.
        kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in url.query:
            kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable server fails in seconds
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # SQLAlchemy emits BEGIN itself (_sqlite_on_begin): the sqlite3 module's legacy mode
    # never begins before DDL or SELECT, so a migration would not be one atomic step.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # Several processes writing one file wait for the lock (up to 30 s) instead of failing "database is locked".
    cursor.execute("PRAGMA busy_timeout = 30000")
    # (journal_mode=WAL belongs to the file, not the connection: _ensure_wal sets it once the
    # file is known to be ours, so a refused file is left exactly as it was.)
    # Safe with WAL (a crash cannot corrupt the file; a power cut may lose the last commits),
    # and one fsync fewer per stored sample.
    cursor.execute("PRAGMA synchronous = NORMAL")
    # SQLite ignores foreign keys unless asked: deleting a run must delete its samples.
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_on_begin(conn) -> None:
    # A transaction that will write takes the write lock at BEGIN: a deferred one that reads
    # first and writes later fails at once with SQLITE_BUSY if another process committed in
    # between (busy_timeout cannot help there). Readers keep the cheap deferred BEGIN.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def _ensure_wal(engine: Engine) -> None:
    """Switch the file to WAL: report/plot keep reading while a sweep writes, and writers never
    wait for readers. Persistent, so usually already done; needs a moment alone with the file."""
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection  # outside any transaction: the pragma is refused inside one
        if raw.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
            raw.execute("PRAGMA journal_mode = WAL")


def _reason(exc: BaseException) -> str:
    """The driver's message, first line only (psycopg adds hints on further lines)."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(orig).__name__


def _open_error(exc: DBAPIError, shown: str, path: Path | None) -> StoreError:
    reason = _reason(exc)
    if path is not None:
        if reason == "file is not a database":
            return StoreError(f"{path} is not a SQLite database ({reason})")
        if "malformed" in reason:
            return StoreError(f"{path} is a damaged SQLite database ({reason})")
        return StoreError(f"cannot open {path}: {reason}")
    return StoreError(f"cannot connect to {shown}: {reason}")


# ----------------------------------------------------------------------------- migrate on open

def _current_heads(conn) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext

    return tuple(MigrationContext.configure(conn).get_current_heads())


def _migrate(engine: Engine, shown: str, path: Path | None) -> tuple[str | None, str, Path | None]:
    """Bring the schema to head. Returns (revision before, head, backup file or None).

    The decision and the upgrade happen in one transaction holding the write lock
    (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so several processes
    opening a new database at once create it exactly once.
    """
    if _at_head(engine):
        return SCHEMA_HEAD, SCHEMA_HEAD, None
    from alembic import command
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    known = {rev.revision for rev in script.walk_revisions()}

    with engine.connect() as conn:  # fast path, no lock: already at head
        with conn.begin():
            if _current_heads(conn) == (head,):
                return head, head, None

    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # Batch migrations rebuild a table (copy, DROP, rename); with foreign keys on, dropping
            # `runs` would cascade-delete every sample. SQLite ignores this pragma inside a
            # transaction, hence before BEGIN (on the driver's connection: SQLAlchemy would begin
            # one first); it is switched back on below.
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = OFF")
        try:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                current = _current_heads(conn)  # again: another process may have migrated meanwhile
                if current == (head,):
                    return head, head, None
                unknown = [rev for rev in current if rev not in known]
                if unknown:
                    raise StoreError(f"database {shown} has schema revision {', '.join(unknown)}, newer than this "
                                     f"knormctl (knows up to {head}); upgrade knormctl")
                if not current:
                    _refuse_foreign_tables(conn, shown, sqlite)
                old = ", ".join(current) or None
                backup = _backup_sqlite(path, old) if (old and path is not None) else None
                try:
                    with _ALEMBIC_LOCK:
                        command.upgrade(alembic_config(conn), "head")
                    if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                        raise StoreError("the migration left rows that break a foreign key")
                except Exception as exc:  # the transaction rolls back: nothing half-migrated
                    action = (f"upgrading {shown} from schema {old} to {head}" if old
                              else f"creating the schema in {shown}")
                    why = str(exc) if isinstance(exc, StoreError) else _reason(exc)
                    kept = f" (backup: {backup})" if backup else ""
                    raise StoreError(f"{action} failed: {why}; the database is unchanged{kept}") from exc
                return old, head, backup
        finally:
            if sqlite:
                with suppress(sqlite3.Error):  # a broken connection is discarded anyway; keep the first error
                    conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = ON")


def _refuse_foreign_tables(conn, shown: str, sqlite: bool) -> None:
    """No revision stamp: only an empty database (SQLite) or one without our tables is ours to fill."""
    tables = sorted(inspect(conn).get_table_names())
    ours = {Run.__tablename__, Sample.__tablename__}
    if (sqlite and tables) or ours.intersection(tables):
        listed = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise StoreError(f"{shown} already holds tables ({listed}) but no knormctl schema revision; "
                         "use a new file or an empty database")


def _backup_sqlite(path: Path, old_revision: str) -> Path:
    """Copy the database, next to it, before an upgrade.

    Called while the migrating connection holds the write lock (but has written
    nothing): a second connection reads the last committed state, which nobody can
    change under the copy. SQLite's backup API includes pages still in the -wal
    file, which a plain file copy would miss. (The locked connection itself cannot
    be the source: SQLite refuses to back up from a connection in a write transaction.)
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{path.name}.bak-{old_revision.replace(', ', '+')}-{stamp}"
    target, n = path.with_name(name), 1
    while target.exists():  # two upgrades within one second
        target, n = path.with_name(f"{name}-{n}"), n + 1
    try:
        with closing(sqlite3.connect(path, timeout=30)) as source, closing(sqlite3.connect(target)) as dest:
            source.backup(dest)
            dest.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal/-shm beside it
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot back up {path} to {target} before upgrading it: {exc}") from None
    return target


# ----------------------------------------------------------------------------- open

def open_store(url_or_path: str | os.PathLike | None = None, *, migrate: bool = True) -> Store:
    """Open (and create or upgrade) the results database.

    ``url_or_path``: a SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``),
    a file path, or None for ``default_db_url()``. With ``migrate`` (the default) the
    schema is brought to head: a new database is created, an older one is backed up
    (SQLite: ``<file>.bak-<revision>-<UTC stamp>``, see ``Store.backup_path``; other
    backends get no automatic backup) and upgraded, one stamped by a newer knormctl is
    refused. ``migrate=False`` touches no schema (tests, tools).

    Every failure is a ``StoreError`` with one line (no password in it), and a location
    that is refused (missing folder, a directory, not a SQLite file, damaged) is left
    exactly as it was.
    """
    url_text = to_url(url_or_path)
    if (url_or_path is None or str(url_or_path).strip() == "") and not os.environ.get("KNORMCTL_DB", "").strip():
        default_db_path().parent.mkdir(parents=True, exist_ok=True)  # only the default folder is ours to create
    try:
        url = make_url(url_text)
    except ArgumentError:
        raise StoreError("invalid database URL (expected a file path, sqlite:///PATH or "
                         "postgresql+psycopg://USER@HOST/DB)") from None
    shown = url.render_as_string(hide_password=True)
    path = _sqlite_file(url)
    if path is not None:
        _check_sqlite_file(path)
        shown = str(path)
    try:
        engine = make_engine(url)
    except (NoSuchModuleError, ImportError) as exc:
        hint = " (PostgreSQL: pip install 'knormctl[postgres]' and use postgresql+psycopg://)" \
            if url.get_backend_name() == "postgresql" else ""
        raise StoreError(f"cannot use {shown}: no driver for {url.drivername} ({exc}){hint}") from None
    try:
        if migrate:
            before, head, backup = _migrate(engine, shown, path)
            if url.get_backend_name() == "sqlite":
                _ensure_wal(engine)
        else:
            with engine.connect():
                pass
            before, head, backup = None, None, None
    except StoreError:
        engine.dispose()
        raise
    except DBAPIError as exc:
        engine.dispose()
        raise _open_error(exc, shown, path) from exc
    store = Store(engine, url=shown, path=path)
    store.schema_revision = head
    store.upgraded_from = before if before != head else None
    store.created = migrate and before is None
    store.backup_path = backup
    return store


# ----------------------------------------------------------------------------- the store

def _check_fields(model, fields: dict, exclude: set[str]) -> dict:
    columns = {c.key for c in model.__table__.columns} - exclude
    unknown = sorted(set(fields) - columns)
    if unknown:
        raise TypeError(f"{model.__name__} has no column(s) {', '.join(unknown)} that can be set here")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"unknown run status {fields['status']!r} (one of {', '.join(STATUSES)})")
    return {k: _naive_utc(v) for k, v in fields.items()}


def _pid_alive(pid: int, started: datetime | None) -> bool:
    """Is the process that wrote this run still running on this host?"""
    try:
        import psutil
    except ImportError:  # psutil is a dependency; this is only a fallback
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    # A process born after the run started is another program that got the same pid.
    if started is not None and created > started.replace(tzinfo=timezone.utc).timestamp() + 2:
        return False
    return True


class Store:
    """The results database. Every method is one short transaction that commits itself;
    the objects returned are detached ``Run``/``Sample`` rows with their columns loaded
    (``Run.samples`` is not: use ``samples()``)."""

    def __init__(self, engine: Engine, *, url: str, path: Path | None = None):
        self.engine = engine
        self.url = url  # for messages: the file path, or the URL with the password hidden
        self.path = path  # the SQLite file, else None
        self.backup_path: Path | None = None  # where open_store copied the old file before upgrading it
        self.upgraded_from: str | None = None  # schema revision before open_store upgraded it
        self.schema_revision: str | None = None
        self.created = False  # open_store created the schema
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(**{_WRITE: True}), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (the store is unusable afterwards)."""
        self.engine.dispose()

    @property
    def upgrade_note(self) -> str | None:
        """One line for the user when ``open_store`` upgraded the schema, else None."""
        if not self.upgraded_from:
            return None
        note = f"upgraded the database schema of {self.url} from {self.upgraded_from} to {self.schema_revision}"
        if self.backup_path is not None:
            return note + f"; the old file is kept at {self.backup_path}"
        return note + ("" if self.path is not None else " (no automatic backup on this backend)")

    @contextmanager
    def _tx(self, what: str, *, write: bool = True) -> Iterator:
        """One transaction: commits on success, rolls back on error, database errors -> StoreError."""
        try:
            with (self._write if write else self._read).begin() as session:
                yield session
        except DBAPIError as exc:
            raise StoreError(f"{what} failed ({self.url}): {_reason(exc)}") from exc

    # --- runs ------------------------------------------------------------------------------

    def create_run(self, *, command: str, task: str, model_requested: str, config: dict, command_line: str,
                   env: dict | None = None, group_name: str | None = None, shard: str | None = None,
                   resumed_from: int | None = None, samples_planned: int | None = None,
                   dtype: str | None = None, device: str | None = None, knormctl_version: str | None = None,
                   git_commit: str | None = None) -> int:
        """A new run, status ``running``, owned by this process (pid, host, heartbeat). Returns its id."""
        now = utcnow()
        run = Run(command=command, task=task, status=RUNNING, model_requested=model_requested,
                  config_json=config, env_json=env or {}, command_line=command_line, group_name=group_name,
                  shard=shard, resumed_from=resumed_from, samples_planned=samples_planned, dtype=dtype,
                  device=device, knormctl_version=knormctl_version, git_commit=git_commit,
                  started_utc=now, heartbeat_utc=now, pid=os.getpid(), hostname=socket.gethostname(),
                  samples_done=0, samples_failed=0)
        with self._tx("creating a run") as session:
            session.add(run)
            session.flush()
            return run.id

    def update_run(self, run_id: int, **fields) -> None:
        """Set columns of a run (e.g. ``model_resolved=...``). Unknown names are a TypeError."""
        values = _check_fields(Run, fields, exclude={"id"})
        if not values:
            return
        with self._tx(f"updating run {run_id}") as session:
            if session.execute(update(Run).where(Run.id == run_id).values(**values)).rowcount == 0:
                raise StoreError(f"run {run_id} does not exist")

    def reopen_run(self, run_id: int) -> None:
        """Take over a run for ``--resume``: running again, owned by this process, error and end cleared."""
        self.update_run(run_id, status=RUNNING, ended_utc=None, error=None, pid=os.getpid(),
                        hostname=socket.gethostname(), heartbeat_utc=utcnow())

    def heartbeat(self, run_id: int) -> None:
        """Tell other processes this run is alive (``add_sample`` does it too)."""
        self.update_run(run_id, heartbeat_utc=utcnow())

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        """End a run: its final status, an optional error line, ``ended_utc`` now."""
        if status == RUNNING:
            raise ValueError("finish_run needs a final status, not 'running'")
        now = utcnow()
        self.update_run(run_id, status=status, error=error, ended_utc=now, heartbeat_utc=now)

    def get_run(self, run_id: int) -> Run | None:
        """The run with this id, or None."""
        self.mark_stale_runs()
        with self._tx(f"reading run {run_id}", write=False) as session:
            return session.get(Run, run_id)

    def last_run(self, group: str | None = None) -> Run | None:
        """The newest run (of ``group`` when given), or None."""
        runs = self.list_runs(limit=1, group=group)
        return runs[0] if runs else None

    def list_runs(self, limit: int = 20, group: str | None = None) -> list[Run]:
        """Newest first, at most ``limit`` (None: all)."""
        self.mark_stale_runs()
        stmt = select(Run).order_by(Run.id.desc()).limit(limit)
        if group is not None:
            stmt = stmt.where(Run.group_name == group)
        with self._tx("listing runs", write=False) as session:
            return list(session.scalars(stmt))

    def runs_in_group(self, group: str) -> list[Run]:
        """All runs tagged ``group`` (shards of one sweep), oldest first."""
        self.mark_stale_runs()
        stmt = select(Run).where(Run.group_name == group).order_by(Run.id)
        with self._tx(f"reading group {group!r}", write=False) as session:
            return list(session.scalars(stmt))

    def mark_stale_runs(self, stale_after_s: float = 600) -> list[int]:
        """Mark runs that say ``running`` but whose process is gone as ``interrupted``; returns their ids.

        On this host the owning pid decides (a long forward pass sends no heartbeat but
        is alive); for runs of other hosts, a heartbeat older than ``stale_after_s``.
        """
        now, host = utcnow(), socket.gethostname()
        with self._tx("checking running runs", write=False) as session:
            rows = session.execute(select(Run.id, Run.pid, Run.hostname, Run.heartbeat_utc, Run.started_utc)
                                   .where(Run.status == RUNNING)).all()
        stale = {}
        for run_id, pid, hostname, heartbeat, started in rows:
            last = heartbeat or started
            if pid and hostname == host:
                if not _pid_alive(pid, started):
                    stale[run_id] = (last, f"process {pid} on {hostname} stopped without finishing "
                                           "(the process no longer exists)")
            elif last is None or now - last > timedelta(seconds=stale_after_s):
                seen = last.strftime("%Y-%m-%d %H:%M:%S UTC") if last else "never"
                stale[run_id] = (last, f"process {pid} on {hostname} stopped without finishing "
                                       f"(stale heartbeat, last {seen})")
        if not stale:
            return []
        marked = []
        with self._tx("marking stale runs") as session:
            for run_id, (last, error) in stale.items():
                # status == running again: the run may have finished since we looked.
                result = session.execute(update(Run).where(Run.id == run_id, Run.status == RUNNING)
                                         .values(status=INTERRUPTED, error=error, ended_utc=last or now))
                if result.rowcount:
                    marked.append(run_id)
        return marked

    # --- samples ---------------------------------------------------------------------------

    def add_sample(self, run_id: int, **fields) -> int:
        """Store one finished (sample x configuration) cell. One transaction: the row, the run's
        ``samples_done`` (or ``samples_failed`` when ``error`` is set) and its heartbeat. Returns the id."""
        values = _check_fields(Sample, fields, exclude={"id", "run_id", "created_utc"})
        now = utcnow()
        counter = Run.samples_failed if values.get("error") is not None else Run.samples_done
        with self._tx(f"storing a sample of run {run_id}") as session:
            bump = update(Run).where(Run.id == run_id).values({counter: counter + 1, Run.heartbeat_utc: now})
            if session.execute(bump).rowcount == 0:
                raise StoreError(f"run {run_id} does not exist")
            sample = Sample(run_id=run_id, created_utc=now, **values)
            session.add(sample)
            session.flush()
            return sample.id

    def set_token_match(self, run_id: int, sample_index: int, matches: dict[str, float | None]) -> None:
        """Record, per config key, the fraction of tokens equal to the full-cache output of that sample."""
        with self._tx(f"storing token matches of run {run_id}") as session:
            for config_key, fraction in matches.items():
                session.execute(update(Sample)
                                .where(Sample.run_id == run_id, Sample.sample_index == sample_index,
                                       Sample.config_key == config_key)
                                .values(token_match=fraction))

    def samples(self, run_ids: int | list[int], with_blobs: bool = False) -> list[Sample]:
        """Samples of one or several runs, in the order they were stored.

        Without ``with_blobs`` the big columns (``step_latencies_json``, ``generated_ids_json``,
        ``generated_text``) are not loaded -- reading them then raises -- so a report over
        thousands of rows stays fast.
        """
        ids = [run_ids] if isinstance(run_ids, int) else list(run_ids)
        if not ids:
            return []
        stmt = select(Sample).where(Sample.run_id.in_(ids)).order_by(Sample.id)
        if not with_blobs:
            stmt = stmt.options(*(defer(col) for col in _BLOB_COLUMNS))
        with self._tx("reading samples", write=False) as session:
            return list(session.scalars(stmt))

    def done_cells(self, run_id: int) -> set[tuple[int, str]]:
        """The (sample_index, config_key) cells of a run stored without error."""
        stmt = select(Sample.sample_index, Sample.config_key).where(Sample.run_id == run_id, Sample.error.is_(None))
        with self._tx(f"reading cells of run {run_id}", write=False) as session:
            return {(i, key) for i, key in session.execute(stmt)}

    def delete_failed_cells(self, run_id: int) -> int:
        """Remove a run's errored samples so ``--resume`` can measure them again; recount the run.
        Returns how many were removed."""
        def count(*where):
            return select(func.count()).select_from(Sample).where(Sample.run_id == run_id, *where).scalar_subquery()

        with self._tx(f"removing failed samples of run {run_id}") as session:
            removed = session.execute(delete(Sample).where(Sample.run_id == run_id, Sample.error.is_not(None)),
                                      execution_options={"synchronize_session": False}).rowcount
            session.execute(update(Run).where(Run.id == run_id).values(
                samples_done=count(Sample.error.is_(None)), samples_failed=count(Sample.error.is_not(None))))
            return removed
