"""`knormctl export`: runs with every sample, as one JSON Lines file another store can import."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from knormctl.cli._common import DbOpt, error_boundary, nonempty_path


def export(
    out: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", parser=nonempty_path, help="File to write (JSON Lines; a name ending in .gz is compressed).")],
    run_id: Annotated[list[int] | None, typer.Option("--run-id", metavar="N", help="A run to export (repeat for several).")] = None,
    group: Annotated[str | None, typer.Option("--group", metavar="NAME", help="Export every run tagged with this group.")] = None,
    db: DbOpt = None,
) -> None:
    """Write runs with every sample to one file that any store can import.

    The file holds each run's config and environment and every sample with all its columns (latencies, generated ids). The database is only read. Load it with `knormctl import FILE`.
    """
    with error_boundary():
        from knormctl.errors import UsageError
        from knormctl.store import RUNNING, open_store
        from knormctl.store.exchange import export_runs
        from knormctl.store.liveness import owner

        if run_id and group is not None:
            raise UsageError("choose one of --run-id, --group")
        if not run_id and group is None:
            raise UsageError("give the runs to export: --run-id N (repeatable) or --group NAME")
        with open_store(db, readonly=True) as store:
            runs = store.runs_in_group(group) if group is not None else store.get_runs(run_id)
            if group is not None and not runs:
                raise UsageError(f"no runs in group {group!r} in {store.url}")
            missing = sorted(set(run_id or []) - {r.id for r in runs})
            if missing:
                raise UsageError(f"no run {', '.join(map(str, missing))} in {store.url}")
            for run in runs:  # a live run would be exported half-done, and re-importing skips it later
                if run.status == RUNNING:
                    raise UsageError(f"run {run.id} is still running ({owner(run)}); export it when it has ended")
            n_runs, n_samples = export_runs(store, [r.id for r in runs], out)
        print(f"exported {n_runs} run(s) with {n_samples} sample(s) to {out}")
