"""`knormctl import FILE`: load an export into this store, without duplicating what is already there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from knormctl.cli._common import DbOpt, error_boundary, nonempty_path, on_terminal


def import_results(
    file: Annotated[Path, typer.Argument(metavar="FILE", parser=nonempty_path, help="A file written by `knormctl export`.", show_default=False)],
    db: DbOpt = None,
) -> None:
    """Load a file written by `knormctl export` into the database, without duplicates.

    Runs already there (same uuid) are skipped, or replaced when the file's copy holds more cells (exported again after a resume); new ones get new ids. All or nothing: a damaged or truncated file imports nothing.
    """
    with error_boundary():
        import sys

        from knormctl.store import open_store
        from knormctl.store.exchange import check_file, import_file

        # The whole file first: a refused one must not create, upgrade or touch a database.
        check_file(file)
        with open_store(db) as store:
            if store.upgrade_note:
                print(store.upgrade_note, file=sys.stderr)
            done = import_file(store, file)
        said = []
        if done.run_ids:
            ids = ", ".join(map(str, done.run_ids))
            said.append(f"imported {len(done.run_ids)} run(s) (now id {ids}) with {done.samples} sample(s) "
                        f"from {file} into {store.url}")
        if done.updated:
            said.append(f"updated {len(done.updated)} run(s) from {file} in {store.url}: " + "; ".join(
                f"run {u.run_id} ({u.old_status}, {u.old_cells} cells) -> {u.status}, {u.cells} cells"
                for u in done.updated))
        kept = "".join(
            f" (run {', '.join(map(str, ids))} {why}: kept)" for ids, why in (
                (done.kept_newer, "holds more cells there than in the file"),
                (done.busy, "is being measured there now; import the file again once it has stopped"))
            if ids)
        repeated = (f"; {done.repeated} run record(s) repeat a run that came earlier in the file "
                    f"(the same uuid): the first copy was read" if done.repeated else "")
        if said:
            skipped = (f"; skipped {done.skipped_runs} run(s) already in the database "
                       f"({done.skipped_samples} sample(s)){kept}" if done.skipped_runs else "")
            print(on_terminal("; ".join(said) + skipped + repeated))
        else:
            print(on_terminal(f"nothing imported from {file}: its {done.skipped_runs} run(s) are already in "
                          f"{store.url}{kept}" + repeated))
