"""Migrate-on-open: bring a database to the newest Alembic revision, backing up an older SQLite file first.

A new database is created at head; an older one is copied (SQLite), then upgraded in
one transaction; one stamped by a newer knormctl is refused. Readers never migrate:
``check_readable`` tells them whether they can read the database as it is.
"""

from __future__ import annotations

import shlex
import sqlite3
import threading
from contextlib import closing, suppress
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Column, Engine, MetaData, String, Table, func, inspect, select

import knormctl
from knormctl.errors import StoreError, StoreFailure
from knormctl.store.connect import WRITE, is_busy, reason
from knormctl.store.models import Run, Sample

# The newest migration's revision id. Opening a database already at this revision reads
# one row and never imports Alembic (~230 ms: report and plot must start fast);
# tests/test_migrations.py checks that it equals the scripts' head.
SCHEMA_HEAD = "0005"
# Revisions whose tables a reader reads exactly as head's, so report, plot and export take them
# as they are (reading never upgrades): 0005 only changed how SQLite hands out new run ids.
READ_AS_HEAD = frozenset({SCHEMA_HEAD, "0004"})
_alembic_version = Table("alembic_version", MetaData(), Column("version_num", String(32)))
_PG_MIGRATION_LOCK = 7_391_004_217  # any constant: serialises concurrent first opens on PostgreSQL
# Alembic keeps the running migration in module globals: one at a time per process
# (other processes are kept apart by the database lock taken in migrate).
_ALEMBIC_LOCK = threading.Lock()


def migrations_dir() -> Path:
    """The Alembic scripts: inside the installed wheel, else the source checkout's ``migrations/``."""
    package = Path(knormctl.__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError(f"knormctl's migration scripts are missing (looked in {package / '_migrations'} "
                     f"and {package.parent / 'migrations'}); reinstall knormctl")


def alembic_config(connection=None):
    """An Alembic Config built in code (no alembic.ini at runtime); ``env.py`` uses ``connection``."""
    from alembic.config import Config

    cfg = Config()
    # ConfigParser interpolation: a '%' in the path must be doubled.
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def stamped_revisions(engine: Engine) -> list[str] | None:
    """The revision(s) the database is stamped with; None when it has no ``alembic_version`` table.
    One cheap SELECT: no Alembic import."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return list(conn.execute(select(_alembic_version.c.version_num)).scalars())


def known_revisions() -> tuple[str, set[str]]:
    """(head, every revision id) of this knormctl's migration scripts (imports Alembic)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return script.get_current_head(), {rev.revision for rev in script.walk_revisions()}


def _newer_message(conn, shown: str, unknown: list[str], head: str) -> str:
    """An Alembic stamp this knormctl does not know: a newer knormctl's, or -- without knormctl's
    tables -- another application's (its database named by mistake)."""
    if not inspect(conn).has_table("runs"):
        return (f"{shown} is not a knormctl results database (its schema revision {', '.join(unknown)} is "
                "another application's, and it has no runs table)")
    return (f"database {shown} has schema revision {', '.join(unknown)}, newer than this "
            f"knormctl (knows up to {head}); upgrade knormctl")


def check_readable(engine: Engine, shown: str) -> str:
    """For a read-only opening: the database must be at this knormctl's schema (or one it reads
    the same way, ``READ_AS_HEAD``). Returns the revision.

    An older database is not upgraded here (reading never writes): the message names the
    command that upgrades it."""
    stamped = stamped_revisions(engine)
    if stamped and len(stamped) == 1 and stamped[0] in READ_AS_HEAD:
        return stamped[0]
    if not stamped:
        with engine.connect() as conn:
            tables = inspect(conn).get_table_names()
        if not tables:
            raise StoreError(f"{shown} holds no knormctl results (an empty database)")
        raise StoreError(f"{shown} is not a knormctl results database (it has tables but no knormctl "
                         "schema revision)")
    head, known = known_revisions()
    unknown = [rev for rev in stamped if rev not in known]
    if unknown:
        with engine.connect() as conn:
            raise StoreError(_newer_message(conn, shown, unknown, head))
    backup = ("it keeps a backup" if engine.dialect.name == "sqlite" else
              "this backend gets no automatic backup: take one first, e.g. with pg_dump")
    raise StoreError(f"{shown} has schema {', '.join(stamped)}, older than this knormctl's {head}; reading "
                     f"never changes a database: upgrade it first with `knormctl runs upgrade --db {shlex.quote(shown)}` "
                     f"({backup})")


def _current_heads(conn) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext

    return tuple(MigrationContext.configure(conn).get_current_heads())


def migrate(engine: Engine, shown: str, path: Path | None) -> tuple[str | None, str, Path | None]:
    """Bring the schema to head. Returns (revision before, head, backup file or None).

    The decision and the upgrade happen in one transaction holding the write lock
    (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so several processes
    opening a new database at once create it exactly once. Safe to call again after
    SQLITE_BUSY (``connect.retry_busy``): a failed attempt rolled back everything.
    """
    if stamped_revisions(engine) == [SCHEMA_HEAD]:
        return SCHEMA_HEAD, SCHEMA_HEAD, None
    from alembic import command

    head, known = known_revisions()

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
            conn.execution_options(**{WRITE: True})
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                current = _current_heads(conn)  # again: another process may have migrated meanwhile
                if current == (head,):
                    return head, head, None
                _refuse_unmigratable(conn, shown, current, head, known)
                old = ", ".join(current) or None
                backup = backup_sqlite(path, old) if (old and path is not None) else None
                try:
                    with _ALEMBIC_LOCK:
                        command.upgrade(alembic_config(conn), "head")
                    if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                        raise StoreFailure("the migration left rows that break a foreign key")
                except Exception as exc:  # the transaction rolls back: nothing half-migrated
                    if is_busy(exc):
                        raise  # another process holds the file for a moment: the caller tries again
                    action = (f"upgrading {shown} from schema {old} to {head}" if old
                              else f"creating the schema in {shown}")
                    why = str(exc) if isinstance(exc, StoreError) else reason(exc)
                    kept = f" (backup: {backup})" if backup else ""
                    raise StoreFailure(f"{action} failed: {why}; the database is unchanged{kept}") from exc
                return old, head, backup
        finally:
            if sqlite:
                with suppress(sqlite3.Error):  # a broken connection is discarded anyway; keep the first error
                    conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = ON")


def refuse_what_migrate_would(engine: Engine, shown: str) -> None:
    """What ``migrate`` would refuse in this database (a newer schema, tables not knormctl's),
    found reading only: a dry run says what the run would (an older schema is fine: the run
    upgrades it)."""
    head, known = known_revisions()
    with engine.connect() as conn:
        _refuse_unmigratable(conn, shown, _current_heads(conn), head, known)


def _refuse_unmigratable(conn, shown: str, current: tuple[str, ...], head: str, known) -> None:
    """A schema stamped by a newer knormctl, or tables with no stamp that are not ours: what
    ``migrate`` refuses (under its lock) and a dry run says (reading only)."""
    unknown = [rev for rev in current if rev not in known]
    if unknown:
        raise StoreError(_newer_message(conn, shown, unknown, head))
    if not current:
        _refuse_foreign_tables(conn, shown, conn.dialect.name == "sqlite")


def _refuse_foreign_tables(conn, shown: str, sqlite: bool) -> None:
    """No revision stamp: only an empty database (SQLite) or one without our tables is ours to fill."""
    tables = sorted(inspect(conn).get_table_names())
    ours = {Run.__tablename__, Sample.__tablename__}
    if (sqlite and tables) or ours.intersection(tables):
        listed = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise StoreError(f"{shown} already holds tables ({listed}) but no knormctl schema revision; "
                         "use a new file or an empty database")


def backup_sqlite(path: Path, old_revision: str) -> Path:
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
        raise StoreFailure(f"cannot back up {path} to {target} before upgrading it: {exc}") from None
    return target
