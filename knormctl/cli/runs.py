"""`knormctl runs delete|upgrade`: managing the stored runs and the database itself."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from knormctl.cli._common import DbOpt, PlainCommand, PlainGroup, check_db_exists, error_boundary, fail, on_terminal

app = typer.Typer(help="Manage stored runs: delete them, upgrade the database.", no_args_is_help=True,
                  cls=PlainGroup)


@app.command("delete", cls=PlainCommand)
def delete(
    run_ids: Annotated[list[int], typer.Argument(metavar="RUN_ID", help="Ids of the runs to delete.", show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    db: DbOpt = None,
) -> None:
    """Delete runs with all their samples (asks first; a run still running is refused)."""
    with error_boundary():
        from knormctl.errors import UsageError
        from knormctl.store import RUNNING, open_store
        from knormctl.store.liveness import owner

        check_db_exists(db)  # deleting creates nothing
        with open_store(db) as store:
            if store.upgrade_note:  # a writer brings an old schema to head (with a backup) first
                print(store.upgrade_note, file=sys.stderr)
            runs = store.get_runs(run_ids)
            missing = sorted(set(run_ids) - {r.id for r in runs})
            if missing:
                raise UsageError(f"no run {', '.join(map(str, missing))} in {store.url}; nothing deleted")
            for r in runs:  # before the listing: a refusal stays one line (delete_runs checks again, atomically)
                if r.status == RUNNING:  # get_runs shows a run whose owner is gone as interrupted
                    raise UsageError(f"run {r.id} is still running ({owner(r)}); nothing deleted")
            for r in runs:
                print(on_terminal(f"run {r.id}: {r.command} {r.model_requested}, {r.status}, "
                              f"{r.samples_done + r.samples_failed} sample(s), started "
                              f"{r.started_utc:%Y-%m-%d %H:%M} UTC"
                              + (f", group {r.group_name}" if r.group_name else ""), sys.stderr), file=sys.stderr)
            if not yes:
                sure = _confirm(f"Delete {len(runs)} run(s) and their samples from {store.url}? [y/N]: ")
                if sure is None:  # no answer: stdin closed (a script): never delete by default
                    raise fail("no confirmation (stdin closed): nothing deleted; add --yes to delete "
                               "without asking", 2) from None
                if not sure:
                    raise fail("nothing deleted", 1)
            n_runs, n_samples = store.delete_runs([r.id for r in runs])
        print(f"deleted {n_runs} run(s) and {n_samples} sample(s) from {store.url}")


@app.command("upgrade", cls=PlainCommand)
def upgrade(db: DbOpt = None) -> None:
    """Bring an existing database to this knormctl's schema (SQLite: keeps a backup).

    `report`, `plot` and `export` never change a database; `sweep` and `baseline` upgrade it too.
    """
    with error_boundary():
        from knormctl.store import open_store

        check_db_exists(db)  # upgrading creates nothing
        with open_store(db) as store:
            print(store.upgrade_note or f"{store.url} is already at schema {store.schema_revision}")



def _confirm(question: str) -> bool | None:
    """Ask on stderr, read one line: True for y/yes, False for anything else (the default is
    no), None when stdin is closed. Not typer.confirm: it wrote a blank to stdout, and with
    the answer piped in (no echo) the next message ran on after the question."""
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        sys.stderr.write(answer.rstrip("\n") + "\n")  # what a terminal would have echoed
    if not answer:
        return None
    return answer.strip().lower() in ("y", "yes")
