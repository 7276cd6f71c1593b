"""Sharing results between stores: one self-contained JSON Lines file per export.

The file, one JSON object per line::

    {"format": "knormctl-results", "version": 1, "schema_revision": "0005", ...}   header
    {"run": {every column of runs}}                                            a run ...
    {"sample": {every column of samples}}                                      ... its samples
    ...
    {"end": {"runs": 2, "samples": 300}}                                       nothing was cut off

Every column is written, read from the tables' own column lists, so a column added by
a future migration is exported without a change here. Timestamps are ISO 8601 (naive
UTC, as stored); JSON columns are nested JSON. A name ending in ``.gz`` is gzip-compressed.

Import is idempotent: a run whose ``uuid`` is already in the store is skipped with its
samples, unless the file's copy holds more cells (exported again after a resume): then it
replaces the stored copy, whose id stays. New runs get new ids (ids are local to one
database) and their samples follow.
The whole file is imported in one transaction, or nothing is.
"""

from __future__ import annotations

import gzip
import json
import typing
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import JSON, Column, DateTime, MetaData, Table, delete, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Mapped

from knormctl import __version__
from knormctl.errors import StoreError, StoreFailure, UsageError
from knormctl.files import refuse_the_database, written_whole
from knormctl.store import liveness
from knormctl.store.api import Store
from knormctl.store.connect import WRITE, reason
from knormctl.store.locations import hide_passwords_in_command
from knormctl.store.models import RUNNING, STATUSES, Run, Sample, naive_utc, utcnow

FORMAT = "knormctl-results"
VERSION = 1  # of the file layout above; the columns follow the schema revision in the header
_BATCH = 500  # samples per INSERT round trip

RUNS, SAMPLES = Run.__table__, Sample.__table__


def _for_import(table: Table) -> Table:
    """The table with JSON columns that store Python None as SQL NULL (as the ORM leaves an
    unset column), so an imported row is the row that was exported."""
    columns = [Column(c.name, JSON(none_as_null=True) if isinstance(c.type, JSON) else c.type,
                      primary_key=c.primary_key) for c in table.columns]
    return Table(table.name, MetaData(), *columns)


def _encode(table: Table, row) -> dict:
    out = {}
    for col in table.columns:
        value = row[col.name]
        out[col.name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def _writer(path: Path, compress: bool):
    return gzip.open(path, "wt", encoding="utf-8") if compress else path.open("w", encoding="utf-8")


def _reader(path: Path):
    """Plain or gzip-compressed, told by the content (a renamed file still reads)."""
    with path.open("rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if compressed else path.open("r", encoding="utf-8")


# ----------------------------------------------------------------------------- export

def export_runs(store: Store, run_ids: list[int], path: Path) -> tuple[int, int]:
    """Write the runs (oldest first) with all their samples to ``path``; returns (runs, samples).

    Written to a temporary file beside ``path`` and renamed at the end: an interrupted
    export leaves no half file. Reads only."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"-o {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent} is a file, not a folder" if path.parent.exists()
                         else f"folder {path.parent} does not exist")
    refuse_the_database(path, store.path, "-o")
    ids = sorted(set(run_ids))
    n_samples = 0
    try:
        with written_whole(path) as partial, _writer(partial, path.name.endswith(".gz")) as out, \
                store.engine.connect() as conn, conn.begin():
            def write(obj: dict) -> None:
                out.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")

            write({"format": FORMAT, "version": VERSION, "schema_revision": store.schema_revision,
                   "knormctl_version": __version__, "exported_utc": utcnow().isoformat(), "runs": len(ids)})
            for run_id in ids:  # one read transaction: a consistent snapshot of every run
                run = dict(conn.execute(select(RUNS).where(RUNS.c.id == run_id)).one()._mapping)
                run |= liveness.shown_as(run) or {}  # a 'running' run whose owner is gone: as readers show it
                run["command_line"] = hide_passwords_in_command(run["command_line"])  # a file to share
                write({"run": _encode(RUNS, run)})
                rows = conn.execute(select(SAMPLES).where(SAMPLES.c.run_id == run_id).order_by(SAMPLES.c.id),
                                    execution_options={"yield_per": _BATCH})  # streamed: no run held in memory
                for row in rows:
                    write({"sample": _encode(SAMPLES, row._mapping)})
                    n_samples += 1
            write({"end": {"runs": len(ids), "samples": n_samples}})
    except DBAPIError as exc:  # (written_whole has removed the partial file)
        raise StoreFailure(f"exporting from {store.url} failed: {reason(exc)}") from exc
    return len(ids), n_samples


# ----------------------------------------------------------------------------- import

@dataclass
class Updated:
    """A run already in the store whose copy in the file held more cells: replaced by it."""

    run_id: int
    old_status: str
    old_cells: int
    status: str
    cells: int


@dataclass
class Imported:
    """What ``import_file`` did."""

    run_ids: list[int] = field(default_factory=list)  # the new ids, in file order
    samples: int = 0  # of the new runs
    skipped_runs: int = 0  # already in the store (same uuid), as far along there
    skipped_samples: int = 0
    updated: list[Updated] = field(default_factory=list)
    kept_newer: list[int] = field(default_factory=list)  # skipped: the store's copy holds more cells
    busy: list[int] = field(default_factory=list)  # skipped: a live process is measuring the store's copy
    repeated: int = 0  # run records whose uuid came earlier in the same file: read once, these skipped


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    try:
        with _reader(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict) or len(obj) < 1:
                    if number == 1:
                        raise UsageError(f"{path} is not a knormctl export (line 1 is not its JSON header)")
                    raise UsageError(f"{path} line {number} is not a JSON object (the file is damaged)")
                yield number, obj
    except (UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise UsageError(f"{path} is not a knormctl export ({type(exc).__name__})") from None
    except EOFError:
        raise UsageError(f"{path} is truncated: its compressed stream ends early (nothing was imported)") from None
    except zlib.error as exc:
        raise UsageError(f"{path} is damaged: its compressed stream cannot be read ({exc}; nothing was "
                         f"imported)") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check_header(path: Path, header: dict) -> None:
    from knormctl.store.migrate import SCHEMA_HEAD, known_revisions

    if header.get("format") != FORMAT:
        raise UsageError(f"{path} is not a knormctl export (its first line is not a knormctl-results header)")
    if header.get("version") != VERSION:
        raise UsageError(f"{path} is an export of format version {header.get('version')!r}; this knormctl "
                         f"reads version {VERSION}")
    revision = header.get("schema_revision")
    if revision != SCHEMA_HEAD and revision not in known_revisions()[1]:
        raise UsageError(f"{path} was exported by a newer knormctl (schema {revision}, this one knows up to "
                         f"{SCHEMA_HEAD}); upgrade knormctl")


def _python_types(model) -> dict[str, tuple[type, ...]]:
    """Each column's Python type(s), read from the model's ``Mapped[...]`` annotations."""
    out = {}
    for name, hint in typing.get_type_hints(model).items():
        if typing.get_origin(hint) is Mapped:
            (inner,) = typing.get_args(hint)
            out[name] = tuple(t for t in (typing.get_args(inner) or (inner,)) if t is not type(None))
    return out


_TYPES = {RUNS.name: _python_types(Run), SAMPLES.name: _python_types(Sample)}


def _decode(table: Table, data: dict, path: Path, number: int) -> dict:
    """A record's columns as the store takes them, each value checked against its column's type:
    a damaged value (text where a number goes, a string where the config's mapping goes) would
    import and then break every later read of the store."""
    unknown = sorted(set(data) - set(table.c.keys()))
    if unknown:
        raise UsageError(f"{path} line {number}: unknown {table.name} column(s) {', '.join(unknown)}")
    required = {RUNS.name: RUNS, SAMPLES.name: SAMPLES}[table.name]
    data = dict(data)
    for col in required.columns:  # what the store's NOT NULL would refuse only inside the database
        if col.nullable or col.primary_key or col.foreign_keys:
            continue
        if col.name not in data and col.default is not None:  # the import's table has no defaults: the ORM's
            data[col.name] = col.default.arg(None) if col.default.is_callable else col.default.arg
        if data.get(col.name) is None:
            raise UsageError(f"{path} line {number}: {table.name}.{col.name} is "
                             f"{'empty' if col.name in data else 'missing'}, which the store does not allow "
                             f"(the file is damaged; nothing was imported)")
    row = {}
    for name, value in data.items():
        if value is not None and isinstance(table.c[name].type, DateTime):
            try:
                value = naive_utc(datetime.fromisoformat(value))  # the store keeps naive UTC
            except (TypeError, ValueError):
                raise UsageError(f"{path} line {number}: {name} is not a timestamp ({value!r})") from None
        if table.name == RUNS.name and name == "status" and value not in STATUSES:
            raise UsageError(f"{path} line {number}: runs.status {value!r} is not a run status "
                             f"({', '.join(STATUSES)}; the file is damaged, nothing was imported)")
        wanted = _TYPES[table.name].get(name, ())
        if float in wanted:
            wanted += (int,)  # JSON writes 2.0 as 2
        if value is not None and wanted and (not isinstance(value, wanted) or
                                             (isinstance(value, bool) and bool not in wanted)):
            kinds = " or ".join(t.__name__ for t in wanted)
            raise UsageError(f"{path} line {number}: {table.name}.{name} should be {kinds}, not "
                             f"{type(value).__name__} {str(value)[:40]!r} (the file is damaged; nothing was imported)")
        row[name] = value
    return row


def _progress(row) -> tuple[int, int]:
    """How far a run got (a dict or a row mapping): its finished cells, then those without an
    error (a resume measures failed cells again: as many cells, more of them done)."""
    done, failed = row.get("samples_done") or 0, row.get("samples_failed") or 0
    return done + failed, done


def _cells(row) -> int:
    return _progress(row)[0]


def _measured_here_now(row) -> bool:
    """A stored run a live process owns (resuming it now): never replaced under it."""
    return row["status"] == RUNNING and liveness.shown_as(row) is None


def _records(path: Path, runs_t: Table, samples_t: Table) -> Iterator[tuple[str, dict]]:
    """(kind, row) of each run and sample record of an export, with every check
    that needs no database: the header, each record's kind and column types, samples inside
    their run's block, the end line and its counts (raised after the last record: an
    importer's transaction then rolls back)."""
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        raise UsageError(f"{path} is empty (not a knormctl export)")
    _check_header(path, first[1])
    end, seen, current = None, {"runs": 0, "samples": 0}, None
    for number, obj in lines:
        if end is not None:
            raise UsageError(f"{path} line {number}: data after the end line (the file is damaged)")
        kind = next(iter(obj))
        if len(obj) != 1 or kind not in ("run", "sample", "end") or not isinstance(obj[kind], dict):
            raise UsageError(f"{path} line {number} is not a run, sample or end record")
        if kind == "end":
            end = obj["end"]
            continue
        row = _decode(runs_t if kind == "run" else samples_t, obj[kind], path, number)
        seen[kind + "s"] += 1
        if kind == "run":
            current = row.get("id")
            if not row.get("uuid") or not isinstance(row.get("uuid"), str):
                raise UsageError(f"{path} line {number}: a run without a uuid")
        elif current is None or row.get("run_id") != current:
            raise UsageError(f"{path} line {number}: a sample of run {row.get('run_id')!r} outside "
                             "that run's block (the file is damaged)")
        yield kind, row
    if end is None:
        raise UsageError(f"{path} is truncated (no end line); nothing was imported")
    if end != seen:
        raise UsageError(f"{path} is damaged: its end line counts {end}, the file holds {seen}; "
                         "nothing was imported")


def check_file(path: Path) -> None:
    """Read a whole export without a database: one line (UsageError) for what ``import_file``
    would refuse in the file itself, before a database is created or upgraded for it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    for _ in _records(path, _for_import(RUNS), _for_import(SAMPLES)):
        pass


def import_file(store: Store, path: Path, _attempt: int = 1) -> Imported:
    """Load an export into ``store``: new runs added with new ids; a run already there (same
    uuid) replaced by the file's copy when that holds more cells (the run was resumed after the
    earlier export; its id here is kept), else skipped. One transaction: a damaged or truncated
    file imports nothing."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if store.readonly:
        raise StoreError(f"importing refused: {store.url} was opened read-only")
    runs_t, samples_t = _for_import(RUNS), _for_import(SAMPLES)
    result = Imported()
    try:
        with store.engine.execution_options(**{WRITE: True}).begin() as conn:
            stored_cols = [RUNS.c[name] for name in ("uuid", "id", "samples_done", "samples_failed", "resumed_from",
                                                       *liveness.LIVENESS_FIELDS)]
            known = {r.uuid: r._mapping for r in conn.execute(select(*stored_cols))}
            in_file: set[str] = set()
            new_ids: dict[int, int] = {}  # id in the exporting store -> id here
            current, keep, counted, batch = None, False, "new", []
            for kind, row in _records(path, runs_t, samples_t):
                if kind == "run":
                    _flush(conn, samples_t, batch)
                    current = row.pop("id", None)
                    uuid = row["uuid"]
                    if uuid in in_file:  # the same run twice in one file (files joined by hand): read once
                        result.repeated += 1
                        keep, counted = False, "repeat"
                        continue
                    in_file.add(uuid)
                    stored = known.get(uuid)
                    # A run it was resumed from keeps the link only if it came along.
                    link = new_ids.get(row.pop("resumed_from", None))
                    if stored is None:
                        new_ids[current] = conn.execute(insert(runs_t).values(**row, resumed_from=link)
                                                        ).inserted_primary_key[0]
                        result.run_ids.append(new_ids[current])
                        keep, counted = True, "new"
                        continue
                    # the file's copy replaces the stored one when it is further along, unless a live
                    # process is measuring the stored one (read again, locked: PostgreSQL lets a resume
                    # commit between the first read and here)
                    further = _progress(row) > _progress(stored)
                    if further:
                        stored = conn.execute(select(*stored_cols).where(RUNS.c.id == stored["id"])
                                              .with_for_update()).one()._mapping
                        further = _progress(row) > _progress(stored)
                    keep = further and not _measured_here_now(stored)
                    if not keep:
                        result.skipped_runs += 1
                        if further:
                            result.busy.append(stored["id"])
                        elif _progress(row) < _progress(stored):
                            result.kept_newer.append(stored["id"])
                        continue
                    conn.execute(delete(SAMPLES).where(SAMPLES.c.run_id == stored["id"]))
                    conn.execute(update(runs_t).where(runs_t.c.id == stored["id"]).values(
                        **row, resumed_from=link if link is not None else stored["resumed_from"]))
                    new_ids[current] = stored["id"]
                    result.updated.append(Updated(stored["id"], stored["status"], _cells(stored), row["status"],
                                                  _cells(row)))
                    counted = "updated"
                    continue
                if not keep:
                    result.skipped_samples += counted != "repeat"
                    continue
                row.pop("id", None)
                row["run_id"] = new_ids[current]
                batch.append(row)
                result.samples += counted == "new"
                if len(batch) >= _BATCH:
                    _flush(conn, samples_t, batch)
            _flush(conn, samples_t, batch)
    except DBAPIError as exc:
        # Another import of the same runs committed first (PostgreSQL runs them side by side;
        # SQLite one after the other): this one rolled back whole, and read again it finds them.
        if isinstance(exc, IntegrityError) and _attempt < 3 and any(
                name in str(exc.orig) for name in ("uq_runs_uuid", "runs.uuid")):
            return import_file(store, path, _attempt + 1)
        raise StoreFailure(f"importing {path} into {store.url} failed: {reason(exc)}; nothing was imported") from exc
    except StatementError as exc:  # a value the column's type could not take (checked above: a safety net)
        raise UsageError(f"{path}: a value the store cannot take ({exc.orig or exc}); nothing was imported") from None
    return result


def _flush(conn, table: Table, batch: list[dict]) -> None:
    if batch:
        conn.execute(insert(table), batch)
        batch.clear()
