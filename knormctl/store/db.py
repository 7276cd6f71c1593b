"""``open_store``: the one door to the results database (a SQLite file or a SQLAlchemy URL).

Writers (``sweep``, ``baseline``, ``import``) open it as it is meant to be used: the
location is checked, the SQLite pragmas set, the schema brought to the newest Alembic
revision (``migrate``), the file switched to WAL. Readers (``report``, ``plot``,
``export``) open it ``readonly``: nothing is created, migrated or written.

The parts live beside this module: ``locations`` (paths and URLs), ``connect`` (engine,
pragmas, WAL, busy retries), ``migrate`` (migrate-on-open with backup), ``liveness``
(who owns a running run) and ``api`` (the ``Store``). This package must load without
torch: it never imports ``knormctl.engine``.
"""

from __future__ import annotations

import os

from sqlalchemy.exc import DBAPIError, NoSuchModuleError

from knormctl.errors import StoreError
from knormctl.store.api import STATUSES, Store  # noqa: F401  (re-exported: the historical home)
from knormctl.store.connect import ensure_wal, make_engine, open_error, retry_busy
from knormctl.store.locations import (check_sqlite_file, check_sqlite_file_to_read, default_db_path, default_db_url,
                                      is_default, parse_url, shown_url, sqlite_file, to_url)
from knormctl.store.migrate import (SCHEMA_HEAD, alembic_config, check_readable, migrations_dir,
                                    refuse_what_migrate_would)
from knormctl.store.migrate import migrate as migrate_schema  # `migrate` is open_store's flag
from knormctl.store.models import utcnow

__all__ = ["open_store", "open_store_for_run", "Store", "STATUSES", "SCHEMA_HEAD", "default_db_path",
           "default_db_url", "to_url", "utcnow", "make_engine", "alembic_config", "migrations_dir"]


def open_store(url_or_path: str | os.PathLike | None = None, *, migrate: bool = True,
               readonly: bool = False) -> Store:
    """Open the results database.

    ``url_or_path``: a SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``),
    a file path, or None for ``default_db_url()``.

    Writing (the default): a new database is created; with ``migrate`` (the default) the
    schema is brought to head: an older one is backed up (SQLite:
    ``<file>.bak-<revision>-<UTC stamp>``, see ``Store.backup_path``; other backends get
    no automatic backup) and upgraded, one stamped by a newer knormctl is refused.
    ``migrate=False`` touches no schema (tests, tools).

    ``readonly``: the database must exist and be at this knormctl's schema (an older one is
    refused with the command that upgrades it); SQLite opens the file read-only, so a
    read-only file or folder works; the store refuses every write.

    Every failure is a ``StoreError`` with one line (no password in it), and a location
    that is refused (missing, a directory, not a SQLite file, damaged) is left exactly as it was.
    """
    return _open_at(*_checked_location(url_or_path, readonly), migrate=migrate, readonly=readonly)


def _open_at(url, shown: str, path, *, migrate: bool, readonly: bool) -> Store:
    """``open_store`` at a location ``_checked_location`` accepted."""
    try:
        engine = make_engine(url, readonly=readonly)
    except (NoSuchModuleError, ImportError) as exc:
        hint = " (PostgreSQL: pip install 'knormctl[postgres]' and use postgresql+psycopg://)" \
            if url.get_backend_name() in ("postgresql", "postgres") else ""
        raise StoreError(f"cannot use {shown}: no driver for {url.drivername} ({exc}){hint}") from None
    try:
        before = head = backup = None
        if readonly:
            before = head = check_readable(engine, shown)
        elif migrate:
            # SQLITE_BUSY that SQLite does not wait out itself (several processes creating one
            # file at once): the attempt rolled back, so it is simply made again.
            before, head, backup = retry_busy(lambda: migrate_schema(engine, shown, path))
            if url.get_backend_name() == "sqlite":
                ensure_wal(engine)
        else:
            with engine.connect():
                pass
    except StoreError:
        engine.dispose()
        raise
    except DBAPIError as exc:
        engine.dispose()
        raise open_error(exc, shown, path) from exc
    store = Store(engine, url=shown, path=path, readonly=readonly)
    store.schema_revision = head
    store.upgraded_from = before if before != head else None
    store.created = migrate and not readonly and before is None
    store.backup_path = backup
    return store


def check_open_for_run(url_or_path) -> None:
    """Refuse what opening an existing database for a run would refuse (unreachable, not
    SQLite, a newer schema, another program's tables), writing nothing: ``sweep --dry-run``."""
    url, shown, path = _checked_location(url_or_path, readonly=True)
    engine = make_engine(url, readonly=True)
    try:
        refuse_what_migrate_would(engine, shown)
    except DBAPIError as exc:
        raise open_error(exc, shown, path) from exc
    finally:
        engine.dispose()


def _checked_location(url_or_path, readonly: bool):
    """(URL, the name shown in messages, the SQLite file or None), or one line (StoreError) for a
    location that cannot hold the database; nothing is created but the default folder."""
    default = is_default(url_or_path)
    url_text = to_url(url_or_path)
    if default and not readonly:
        default_db_path().parent.mkdir(parents=True, exist_ok=True)  # only the default folder is ours to create
    url = parse_url(url_text)
    shown = shown_url(url)
    path = sqlite_file(url)
    if path is not None and url.query:  # the driver would ignore them, with a two-line warning
        raise StoreError(f"{shown}: knormctl does not use SQLite URL arguments ({', '.join(url.query)}); give "
                         "the plain path or sqlite:///PATH")
    if path is None and url.get_backend_name() == "sqlite" and not readonly and not (url.database or "").startswith(
            "file:"):
        raise StoreError(f"{shown} is an in-memory database: what a run stores there is gone when it ends "
                         "(give a file path)")
    if path is not None:
        if readonly and default and not path.exists():
            raise StoreError(f"no results database at {path} yet (run `knormctl sweep` or `knormctl baseline` "
                             "first, or name one with --db)")
        (check_sqlite_file_to_read if readonly else check_sqlite_file)(path)
        shown = str(path)
    return url, shown, path


def open_store_for_run(url_or_path: str | os.PathLike | None = None) -> Store | StoreOnFirstUse:
    """``open_store`` for a run (``sweep``, ``baseline``), except that a SQLite file that does not
    exist yet is created only when the run first needs it: after the model loaded and every check
    on its input passed, so a run refused on bad input (an unknown model, a prompt too long for
    it) leaves no empty database behind. The location is checked now, before the model loads.
    (Deleting the new file after a refusal instead is unsafe: another sweep may have opened the
    same new file meanwhile.)"""
    url, shown, path = _checked_location(url_or_path, readonly=False)
    if path is None or path.exists():  # checked once, opened now
        return _open_at(url, shown, path, migrate=True, readonly=False)
    return StoreOnFirstUse(url_or_path)  # opened (and checked again: time has passed) at its first use


class StoreOnFirstUse:
    """A ``Store`` opened (and its file created) at the first use of any of its public methods or
    attributes. Until then it knows the file did not exist: no upgrade to note, no runs in any
    group. One thread uses it until it is open (the run's heartbeat starts after its row)."""

    def __init__(self, url_or_path):
        self._url_or_path, self._store = url_or_path, None

    @property
    def upgrade_note(self) -> str | None:
        return self._store.upgrade_note if self._store is not None else None

    def runs_in_group(self, group: str) -> list:
        return self._store.runs_in_group(group) if self._store is not None else []

    def __enter__(self) -> StoreOnFirstUse:
        return self

    def __exit__(self, *exc) -> None:
        if self._store is not None:
            self._store.close()

    def __getattr__(self, name):  # only what the class does not define: the Store's public API
        if name.startswith("_"):  # copy, pickle and hasattr probes must neither recurse nor create the file
            raise AttributeError(name)
        if self._store is None:
            self._store = open_store(self._url_or_path)
        return getattr(self._store, name)
