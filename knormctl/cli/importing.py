"""`knormctl import FILE`: load an export into this store, without duplicating what is already there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from knormctl.cli._common import DbOpt, error_boundary


def import_results(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A file written by `knormctl export`.", show_default=False)],
    db: DbOpt = None,
) -> None:
    """Load a file written by `knormctl export` into the database, without duplicates.

    Runs already there (same uuid) are skipped; new ones get new ids. All or nothing: a damaged or truncated file imports nothing.
    """
    with error_boundary():
        from knormctl.store import open_store
        from knormctl.store.exchange import import_file

        if not file.exists():  # before open_store: a typo must not create an empty database either
            from knormctl.errors import UsageError

            raise UsageError(f"{file} does not exist")
        with open_store(db) as store:
            done = import_file(store, file)
        skipped = (f"; skipped {done.skipped_runs} run(s) already in the database "
                   f"({done.skipped_samples} sample(s))" if done.skipped_runs else "")
        if done.run_ids:
            ids = ", ".join(map(str, done.run_ids))
            print(f"imported {len(done.run_ids)} run(s) (now id {ids}) with {done.samples} sample(s) "
                  f"from {file} into {store.url}{skipped}")
        else:
            print(f"nothing imported from {file}: its {done.skipped_runs} run(s) are already in {store.url}")
