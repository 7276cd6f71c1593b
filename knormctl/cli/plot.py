"""`knormctl plot`: the report's figures as PNG or SVG files. Reads only the store."""

from __future__ import annotations

import contextlib
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from knormctl.cli._common import DbOpt, error_boundary, nonempty_path
from knormctl.files import written_together


class ImageFormat(str, Enum):
    png = "png"
    svg = "svg"


def plot(
    run_id: Annotated[int | None, typer.Option("--run-id", metavar="N", help="Plot this run.")] = None,
    last: Annotated[bool, typer.Option("--last", help="Plot the newest run (the default).")] = False,
    group: Annotated[str | None, typer.Option("--group", metavar="NAME", help="Merge the runs tagged with this group.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="FOLDER", parser=nonempty_path, help="Folder for the files (default: ./knormctl-plots/run-N/ or group-NAME/).")] = None,
    fmt: Annotated[ImageFormat, typer.Option("--format", metavar="FMT", help="png or svg.")] = ImageFormat.png,
    db: DbOpt = None,
) -> None:
    """Draw the figures of a stored run and print the paths written, one per line."""
    with error_boundary():
        from knormctl.cli._select import load_samples, select_runs, study_view
        from knormctl.errors import UsageError
        from knormctl.render import figures
        from knormctl.render.summary import build_summary
        from knormctl.store import open_store

        if last and run_id is not None:
            raise UsageError("choose one of --last, --run-id")
        if last and group is not None:
            raise UsageError("--last and --group select different things; give one of them")
        store = open_store(db, readonly=True)  # reading never creates, migrates or writes a database
        if store.upgrade_note:
            print(store.upgrade_note, file=sys.stderr)
        runs = select_runs(store, run_id=run_id, group=group)
        view = study_view(store, runs, group) if group is not None else None
        if view is not None:  # a study: the Pareto view (each run's own figures: plot --run-id N)
            from knormctl.render.figures.pareto import pareto

            drawn = [("knormpress_pareto", lambda: pareto(view))]
        else:
            # Blobs too: the latency figure needs the per-step latencies (numbers are the report's).
            summary = build_summary(runs, load_samples(store, runs, blobs=True))
            drawn = [(spec.filename, lambda spec=spec: spec.draw(summary)) for spec in figures.figures_for(summary)]
        if out is None:
            out = Path("knormctl-plots") / (_group_folder(group) if group else f"run-{runs[0].id}")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        ours = {f"{name}.{fmt.value}" for name in [spec.filename for spec in figures.FIGURES] + ["knormpress_pareto"]}
        drawing = {f"{filename}.{fmt.value}" for filename, _ in drawn}
        others = sorted(p.name for p in out.glob(f"knormpress_*.{fmt.value}") if p.name in ours - drawing) \
            if out.is_dir() else []
        if others:  # another run's figures would stay beside this set, read as one
            raise UsageError(f"--out {out} holds figures this plot does not draw ({', '.join(others)}): another "
                             "run's; choose another folder or remove them")
        created = [p for p in (out, *out.parents) if not p.exists()]  # what a failure removes again
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create --out folder {out}: {exc.strerror}") from None
        paths = [out / f"{filename}.{fmt.value}" for filename, _ in drawn]
        try:
            # The set is written whole: a failure halfway leaves no figure of this run beside
            # older ones in the folder.
            with written_together(paths, "figure") as tmps:
                for (_, draw), tmp in zip(drawn, tmps):
                    fig = draw()
                    # Fixed size: no bbox_inches="tight", so every PNG is exactly figsize x DPI pixels.
                    fig.savefig(tmp, dpi=figures.DPI, format=fmt.value)
                    fig.clear()
        except BaseException:
            for folder in created:  # leaf first; only the empty folders this call made
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        for path in paths:
            print(path)


def _group_folder(group: str) -> str:
    """One folder per group, whatever its name holds ('../x' or 'a/b' named folders elsewhere);
    a name changed to fit keeps a hash of itself, so 'a/b' and 'a_b' do not share a folder."""
    safe = re.sub(r"[^\w.-]+", "_", group)
    if safe != group:
        import hashlib

        safe += "-" + hashlib.sha256(group.encode()).hexdigest()[:8]
    return f"group-{safe}"
