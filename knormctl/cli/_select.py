"""Which stored runs a `report` or `plot` reads, and their samples (one way for both commands)."""

from __future__ import annotations


def select_runs(store, run_id: int | None = None, group: str | None = None) -> list:
    """The run(s) to show: one id, the runs of a group (merged), or the newest run."""
    from knormctl.errors import KnormctlError, UsageError

    if run_id is not None and group is not None:
        raise UsageError("--run-id and --group select different things; give one of them")
    if run_id is not None:
        run = store.get_run(run_id)
        if run is None:
            raise UsageError(f"run {run_id} does not exist in {store.url}")
        return [run]
    if group is not None:
        runs = store.runs_in_group(group)
        if not runs:
            raise UsageError(f"no runs in group {group!r} in {store.url}")
        return runs
    run = store.last_run()
    if run is None:
        raise KnormctlError(f"no runs in {store.url} (run `knormctl sweep` or `knormctl baseline` first)")
    return [run]


def load_samples(store, runs: list, *, blobs: bool = False) -> list:
    """The runs' samples as report AND plot read them, so both show the same numbers: when a
    token match is missing (e.g. cells of one prompt stored by different runs), the generated
    ids are loaded too and the summary computes it. ``blobs``: always load them (plot's
    per-step latencies)."""
    from knormctl.render.summary import needs_generated_ids

    ids = [r.id for r in runs]
    rows = store.samples(ids, with_blobs=blobs)
    if not blobs and needs_generated_ids(rows):
        rows = store.samples(ids, with_blobs=True)
    return rows


def study_view(store, runs: list, group: str, db: str | None = None):
    """The group as a study (runs that differ in model or settings), or None when its runs are
    the shards of one sweep (merged into one summary instead). ``db``: the database the user
    named, for the commands the view's lines suggest (left out of files others read)."""
    from knormctl.cli._common import db_arg
    from knormctl.render.study import build_study, is_study

    if not is_study(runs):
        return None
    view = build_study(runs, {r.id: load_samples(store, [r]) for r in runs}, group)
    view.db_arg = db_arg(db)
    return view
