"""Is the process that owns a 'running' run still alive?

On the run's own host the owning pid decides, checked against the process's start
time (a long forward pass sends no heartbeat but is alive; a recycled pid is not the
same process). For a run of another host, only its heartbeat can tell: one older than
``STALE_AFTER_S`` means the owner is gone.

Readers apply the verdict to the rows they return (``show_verdicts``) and write
nothing; writers record it (``Store.mark_stale_runs``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

from knormctl.store.models import INTERRUPTED, RUNNING, Run, utcnow

STALE_AFTER_S = 600.0  # a heartbeat is sent every 60 s: ten missed beats is not a slow cell


def pid_alive(pid: int, seen: datetime | None) -> bool:
    """Is process ``pid``, already running at ``seen`` (naive UTC), running on this host?"""
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
    # A process born after the owner's last sign of life is another program that got the same pid.
    if seen is not None and created > seen.replace(tzinfo=timezone.utc).timestamp() + 2:
        return False
    return True


def stale_reason(pid: int | None, hostname: str | None, heartbeat: datetime | None, started: datetime | None, *,
                 now: datetime, host: str, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why a 'running' run's owner is gone, or None while it may be alive."""
    # The owner was alive at its last heartbeat (create_run and a resume's take-over beat
    # first): not the run's first start, which a resumed run keeps from an earlier process.
    last = heartbeat or started
    if pid and hostname == host:
        if pid_alive(pid, last):
            return None
        return f"process {pid} on {hostname} stopped without finishing (the process no longer exists)"
    if last is not None and now - last <= timedelta(seconds=stale_after_s):
        return None
    seen = last.strftime("%Y-%m-%d %H:%M:%S UTC") if last else "never"
    return f"process {pid} on {hostname} stopped without finishing (stale heartbeat, last {seen})"


LIVENESS_FIELDS = ("status", "pid", "hostname", "heartbeat_utc", "started_utc")  # what shown_as reads


def shown_as(run: Mapping, *, now: datetime | None = None, host: str | None = None,
             stale_after_s: float = STALE_AFTER_S) -> dict | None:
    """How a run (a mapping of LIVENESS_FIELDS: a table row or a Run's values) is shown when it
    says 'running' but its owner is gone: the status, error and ended_utc of an interrupted run.
    None while it runs, or for any other status."""
    if run["status"] != RUNNING:
        return None
    now = now or utcnow()
    why = stale_reason(run["pid"], run["hostname"], run["heartbeat_utc"], run["started_utc"], now=now,
                       host=host or socket.gethostname(), stale_after_s=stale_after_s)
    if why is None:
        return None
    return {"status": INTERRUPTED, "error": why, "ended_utc": run["heartbeat_utc"] or run["started_utc"] or now}


def show_verdicts(runs: list[Run], stale_after_s: float = STALE_AFTER_S) -> list[Run]:
    """Show each 'running' run whose owner is gone as 'interrupted', in memory only: the rows are
    detached from any session, so nothing reaches the database. ``Run.stored_status`` keeps
    what the database says."""
    now, host = utcnow(), socket.gethostname()
    for run in runs:
        shown = None if run is None else shown_as({f: getattr(run, f) for f in LIVENESS_FIELDS}, now=now, host=host,
                                                  stale_after_s=stale_after_s)
        if shown is not None:
            run.stored_status = run.status
            for name, value in shown.items():
                setattr(run, name, value)
    return runs


def owner(run: Run) -> str:
    """Who holds a running run, for messages: 'process 123 on gpu-7, last heartbeat 12 s ago'."""
    last = run.heartbeat_utc or run.started_utc
    ago = f", last heartbeat {max(0, int((utcnow() - last).total_seconds()))} s ago" if last else ""
    return f"process {run.pid} on {run.hostname}{ago}"
