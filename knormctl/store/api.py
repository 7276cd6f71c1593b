"""The Store: every query and write the rest of knormctl makes, each one short transaction.

Callers never see a Session. Rows come back detached, their columns loaded
(``Run.samples`` is not: use ``Store.samples()``). Reading never writes: a 'running'
run whose owner is gone is *shown* as interrupted (``liveness.show_verdicts``);
only writers record that (``mark_stale_runs``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import defer, sessionmaker

from knormctl.config import MAX_STORED_INT
from knormctl.errors import RunNotOwned, StoreError, StoreFailure, UsageError
from knormctl.store import liveness
from knormctl.store.connect import WRITE, reason
from knormctl.store.models import INTERRUPTED, RUNNING, STATUSES, Run, Sample, naive_utc, utcnow

BLOB_COLUMNS = (Sample.step_latencies_json, Sample.generated_ids_json, Sample.generated_text)


def _storable(i: int) -> bool:
    """An id every backend's column holds (a run id typed as 99999999999999999999 cannot be one)."""
    return -MAX_STORED_INT - 1 <= i <= MAX_STORED_INT


def _check_fields(model, fields: dict, exclude: set[str]) -> dict:
    columns = {c.key for c in model.__table__.columns} - exclude
    unknown = sorted(set(fields) - columns)
    if unknown:
        raise TypeError(f"{model.__name__} has no column(s) {', '.join(unknown)} that can be set here")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"unknown run status {fields['status']!r} (one of {', '.join(STATUSES)})")
    return {k: naive_utc(v) for k, v in fields.items()}


class Store:
    """The results database. Every method is one short transaction that commits itself;
    the objects returned are detached ``Run``/``Sample`` rows with their columns loaded
    (``Run.samples`` is not: use ``samples()``). A store opened ``readonly`` refuses
    every write."""

    def __init__(self, engine: Engine, *, url: str, path: Path | None = None, readonly: bool = False):
        self.engine = engine
        self.url = url  # for messages: the file path, or the URL with the password hidden
        self.path = path  # the SQLite file, else None
        self.readonly = readonly
        self.backup_path: Path | None = None  # where open_store copied the old file before upgrading it
        self.upgraded_from: str | None = None  # schema revision before open_store upgraded it
        self.schema_revision: str | None = None
        self.created = False  # open_store created the schema
        self._owned_runs: dict[int, tuple[int, str]] = {}  # run -> (pid, host) this store wrote as its owner
        self._read = sessionmaker(engine, expire_on_commit=False)
        self._write = sessionmaker(engine.execution_options(**{WRITE: True}), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Store({self.url!r}{', readonly' if self.readonly else ''})"

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
        if write and self.readonly:
            raise StoreError(f"{what} refused: {self.url} was opened read-only")
        try:
            with (self._write if write else self._read).begin() as session:
                yield session
        except DBAPIError as exc:
            raise StoreFailure(f"{what} failed ({self.url}): {reason(exc)}") from exc

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
            self._owned_runs[run.id] = (run.pid, run.hostname)
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
        """Take over a run for ``--resume``: running again, owned by this process, error and end cleared.

        Refused (``UsageError``) while the run's owner is alive. The check and the take-over
        are one write transaction (SQLite: the write lock; PostgreSQL: the row locked), so of
        two processes resuming the same run at once exactly one gets it."""
        with self._tx(f"taking over run {run_id}") as session:
            run = session.get(Run, run_id, with_for_update=True)
            if run is None:
                raise StoreError(f"run {run_id} does not exist")
            if run.status == RUNNING and liveness.stale_reason(
                    run.pid, run.hostname, run.heartbeat_utc, run.started_utc, now=utcnow(),
                    host=socket.gethostname()) is None:
                raise UsageError(f"run {run_id} is still running ({liveness.owner(run)}); "
                                 "resume it once that process has stopped")
            last = run.ended_utc or run.heartbeat_utc  # a killed process never ended: its last beat
            if last is not None:
                run.stopped_s = (run.stopped_s or 0.0) + max(0.0, (utcnow() - last).total_seconds())
            run.status, run.ended_utc, run.error = RUNNING, None, None
            run.pid, run.hostname, run.heartbeat_utc = os.getpid(), socket.gethostname(), utcnow()
            self._owned_runs[run_id] = (run.pid, run.hostname)

    def _owned(self, run_id: int) -> tuple:
        """Where-clauses: the run, while this process owns it (a ``--resume`` elsewhere may have
        taken it over from a process that was paused or cut off, e.g. a laptop asleep). The
        owner is who this store wrote at create or take-over: a host renamed mid-run (a laptop
        waking on another network) is still its owner."""
        pid, host = self._owned_runs.get(run_id, (os.getpid(), socket.gethostname()))
        return Run.id == run_id, Run.pid == pid, Run.hostname == host

    @staticmethod
    def _not_owned(session, run_id: int) -> StoreError:
        run = session.get(Run, run_id)
        if run is None:
            return RunNotOwned(f"run {run_id} does not exist")
        return RunNotOwned(f"run {run_id} was taken over by process {run.pid} on {run.hostname} "
                          "(a --resume while this process was paused or cut off); this process stores no more")

    def _owner_write(self, what: str, run_id: int, **values) -> None:
        with self._tx(what) as session:
            if session.execute(update(Run).where(*self._owned(run_id)).values(**values)).rowcount == 0:
                raise self._not_owned(session, run_id)

    def heartbeat(self, run_id: int) -> None:
        """Tell other processes this run is alive (``add_sample`` does it too). Only its owner may."""
        self._owner_write(f"updating run {run_id}", run_id, heartbeat_utc=utcnow())

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        """End a run: its final status, an optional error line, ``ended_utc`` now. Only its
        owner may (StoreError for a process whose run was taken over)."""
        if status == RUNNING:
            raise ValueError("finish_run needs a final status, not 'running'")
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r} (one of {', '.join(STATUSES)})")
        now = utcnow()
        self._owner_write(f"ending run {run_id}", run_id, status=status, error=error, ended_utc=now,
                          heartbeat_utc=now)

    def get_run(self, run_id: int) -> Run | None:
        """The run with this id, or None."""
        if not _storable(run_id):  # no row has it (and the driver could not even send it)
            return None
        with self._tx(f"reading run {run_id}", write=False) as session:
            run = session.get(Run, run_id)
        return liveness.show_verdicts([run])[0]

    def get_runs(self, run_ids: list[int]) -> list[Run]:
        """The runs with these ids that exist, oldest first."""
        with self._tx("reading runs", write=False) as session:
            runs = list(session.scalars(select(Run).where(Run.id.in_([i for i in run_ids if _storable(i)]))
                                        .order_by(Run.id)))
        return liveness.show_verdicts(runs)

    def last_run(self, group: str | None = None) -> Run | None:
        """The newest run (of ``group`` when given), or None."""
        runs = self.list_runs(limit=1, group=group)
        return runs[0] if runs else None

    def list_runs(self, limit: int | None = 20, group: str | None = None) -> list[Run]:
        """Newest first, at most ``limit`` (None: all)."""
        stmt = select(Run).order_by(Run.id.desc()).limit(None if limit is None or not _storable(limit) else limit)
        if group is not None:
            stmt = stmt.where(Run.group_name == group)
        with self._tx("listing runs", write=False) as session:
            runs = list(session.scalars(stmt))
        return liveness.show_verdicts(runs)

    def runs_in_group(self, group: str) -> list[Run]:
        """All runs tagged ``group`` (shards of one sweep), oldest first."""
        stmt = select(Run).where(Run.group_name == group).order_by(Run.id)
        with self._tx(f"reading group {group!r}", write=False) as session:
            runs = list(session.scalars(stmt))
        return liveness.show_verdicts(runs)

    def mark_stale_runs(self, stale_after_s: float = liveness.STALE_AFTER_S) -> list[int]:
        """Record as ``interrupted`` the runs that say ``running`` but whose process is gone
        (see ``liveness``); returns their ids. Writers call this; readers only show the verdict."""
        if self.readonly:
            raise StoreError(f"marking stale runs refused: {self.url} was opened read-only")
        now, host = utcnow(), socket.gethostname()
        with self._tx("checking running runs", write=False) as session:
            rows = session.execute(select(Run.id, Run.pid, Run.hostname, Run.heartbeat_utc, Run.started_utc)
                                   .where(Run.status == RUNNING)).all()
        stale = {}
        for run_id, pid, hostname, heartbeat, started in rows:
            why = liveness.stale_reason(pid, hostname, heartbeat, started, now=now, host=host,
                                        stale_after_s=stale_after_s)
            if why is not None:
                stale[run_id] = (heartbeat or started, why)
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

    def delete_runs(self, run_ids: list[int]) -> tuple[int, int]:
        """Delete runs and their samples in one transaction; returns (runs, samples) deleted.
        Refused, deleting nothing, when a run does not exist or its owner is still running it."""
        ids = sorted(set(run_ids))
        now, host = utcnow(), socket.gethostname()
        with self._tx("deleting runs") as session:
            runs = {r.id: r for r in session.scalars(select(Run).where(Run.id.in_([i for i in ids if _storable(i)]))
                                                     .with_for_update())}
            missing = [i for i in ids if i not in runs]
            if missing:
                raise UsageError(f"no run {', '.join(map(str, missing))} in {self.url}; nothing deleted")
            for run in runs.values():
                if run.status == RUNNING and liveness.stale_reason(
                        run.pid, run.hostname, run.heartbeat_utc, run.started_utc, now=now, host=host) is None:
                    raise UsageError(f"run {run.id} is still running ({liveness.owner(run)}); nothing deleted")
            # Samples first, explicitly: not every connection enforces the foreign key's cascade.
            n_samples = session.execute(delete(Sample).where(Sample.run_id.in_(ids)),
                                        execution_options={"synchronize_session": False}).rowcount
            n_runs = session.execute(delete(Run).where(Run.id.in_(ids)),
                                     execution_options={"synchronize_session": False}).rowcount
        return n_runs, n_samples

    # --- samples ---------------------------------------------------------------------------

    def add_sample(self, run_id: int, **fields) -> int:
        """Store one finished (sample x configuration x repeat) cell. One transaction: the row, the
        run's ``samples_done`` (or ``samples_failed`` when ``error`` is set) and its heartbeat.
        Returns the id. Only the run's owner may store (StoreError once it was taken over)."""
        values = _check_fields(Sample, fields, exclude={"id", "run_id", "created_utc"})
        now = utcnow()
        counter = Run.samples_failed if values.get("error") is not None else Run.samples_done
        with self._tx(f"storing a sample of run {run_id}") as session:
            bump = update(Run).where(*self._owned(run_id)).values({counter: counter + 1, Run.heartbeat_utc: now})
            if session.execute(bump).rowcount == 0:
                raise self._not_owned(session, run_id)
            sample = Sample(run_id=run_id, created_utc=now, **values)
            session.add(sample)
            session.flush()
            return sample.id

    def set_token_match(self, run_id: int, sample_index: int, matches: dict[str, float | None],
                        repeat: int = 0) -> None:
        """Record, per config key, the fraction of tokens equal to the full-cache output of that
        sample (in the same repeat)."""
        with self._tx(f"storing token matches of run {run_id}") as session:
            if session.execute(select(Run.id).where(*self._owned(run_id))).first() is None:
                raise self._not_owned(session, run_id)
            for config_key, fraction in matches.items():
                session.execute(update(Sample)
                                .where(Sample.run_id == run_id, Sample.sample_index == sample_index,
                                       Sample.config_key == config_key, Sample.repeat == repeat)
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
            stmt = stmt.options(*(defer(col) for col in BLOB_COLUMNS))
        with self._tx("reading samples", write=False) as session:
            return list(session.scalars(stmt))

    def done_cells(self, run_id: int) -> set[tuple[int, str, int]]:
        """The (sample_index, config_key, repeat) cells of a run stored without error."""
        stmt = (select(Sample.sample_index, Sample.config_key, Sample.repeat)
                .where(Sample.run_id == run_id, Sample.error.is_(None)))
        with self._tx(f"reading cells of run {run_id}", write=False) as session:
            return {(i, key, repeat) for i, key, repeat in session.execute(stmt)}

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
