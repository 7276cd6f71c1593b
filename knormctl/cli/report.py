"""`knormctl report`: tables (or json / csv / markdown) from stored runs. Reads only the store."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from knormctl.cli._common import DbOpt, error_boundary, nonempty_path
from knormctl.cli._select import load_samples, select_runs, study_view  # noqa: F401  (plot, tests use them)


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"
    html = "html"


def report(
    last: Annotated[bool, typer.Option("--last", help="Report the newest run (the default).")] = False,
    run_id: Annotated[int | None, typer.Option("--run-id", metavar="N", help="Report this run.")] = None,
    list_runs: Annotated[bool, typer.Option("--list", help="List recent runs instead.")] = False,
    compare: Annotated[tuple[int, int] | None, typer.Option(
        "--compare", metavar="A B", help="The same configurations of runs A and B side by side, with B/A.")] = None,
    samples: Annotated[bool, typer.Option("--samples", help="Also show every sample row.")] = False,
    tasks: Annotated[bool, typer.Option(
        "--tasks", help="With --format csv: the question-task accuracy rows instead of the configurations.")] = False,
    by_dataset: Annotated[bool, typer.Option("--by-dataset", help="One table block per dataset.")] = False,
    fmt: Annotated[Format, typer.Option(
        "--format", metavar="FMT", help="table (rich), or json / csv / markdown / html (one self-contained page with the "
                         "figures) on stdout or into --output.")] = Format.table,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", parser=nonempty_path, help="Write json / csv / markdown / html into this file instead of stdout.")] = None,
    group: Annotated[str | None, typer.Option("--group", metavar="NAME", help="Merge the runs tagged with this group.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, metavar="N", help="How many runs --list shows (20).")] = None,
    db: DbOpt = None,
) -> None:
    """Show a stored run or group: medians, paired changes with 95% intervals, accuracy, flags.

    A study (a group whose runs differ in model or settings) is shown side by side: leaderboards, the Pareto frontier of quality vs KV held, the best configuration per budget.
    """
    with error_boundary():
        from knormctl.errors import UsageError
        from knormctl.render import export, summary as sm
        from knormctl.render.compare import compare as compare_runs, same_model
        from knormctl.store import open_store

        if sum([last, run_id is not None, list_runs, compare is not None]) > 1:
            raise UsageError("choose one of --last, --run-id, --list, --compare")
        if last and group is not None:  # --last picks the newest run, --group a group's runs
            raise UsageError("--last and --group select different things; give one of them")
        if compare is not None and group is not None:
            raise UsageError("--group cannot be used with --compare (it compares the two runs it names)")
        # an option the chosen view would ignore is refused, not dropped
        if limit is not None and not list_runs:
            raise UsageError("--limit applies to --list")
        if tasks and fmt is not Format.csv:
            raise UsageError("--tasks applies to --format csv (the other formats show the task rows with the rest)")
        view_of = [("--samples", samples), ("--tasks", tasks)] + [("--by-dataset", by_dataset)] * list_runs
        ignored = [flag for flag, on in view_of if on] if list_runs or compare is not None else []
        if ignored:  # they read one run or group (--by-dataset: --compare too)
            raise UsageError(f"{', '.join(ignored)} cannot be used with {'--list' if list_runs else '--compare'}")
        with_samples = [flag for flag, on in (("--tasks", tasks), ("--by-dataset", by_dataset)) if on]
        if samples and with_samples:  # --samples lists every sample: there is nothing for them to change
            raise UsageError(f"{', '.join(with_samples)} cannot be used with --samples (it lists every sample)")
        if output is not None and fmt is Format.table:
            raise UsageError("--output needs --format json, csv, markdown or html (tables go to the terminal)")
        if fmt is Format.html and (list_runs or compare is not None):
            raise UsageError("--format html shows one run or a group; use json/csv/markdown for --list and --compare")
        emit = _writer(output)
        store = open_store(db, readonly=True)  # reading never creates, migrates or writes a database
        if output is not None:
            from knormctl.files import refuse_the_database

            refuse_the_database(output, store.path, "--output")
        if store.upgrade_note:
            print(store.upgrade_note, file=sys.stderr)
        if fmt is Format.table:
            from knormctl.render import tables
            console = tables.make_console()

        if list_runs:
            runs = store.list_runs(limit=limit or 20, group=group)
            if not runs and group is not None:  # as `report --group NAME` says it: a name that matches nothing
                raise UsageError(f"no runs in group {group!r} in {store.url}")
            if not runs:
                print(f"no runs in {store.url}", file=sys.stderr)
            if fmt is not Format.table:
                emit(export.runs_text(runs, fmt.value))
            elif runs:
                tables.print_runs(runs, console)
        elif compare is not None:
            a, b = (sm.build_summary(r, load_samples(store, r), by_dataset=by_dataset)
                    for r in (select_runs(store, run_id=i) for i in compare))
            if not same_model(a.header, b.header):
                raise UsageError(f"runs {compare[0]} and {compare[1]} used different models "
                                 f"({a.header.model} vs {b.header.model}); --compare needs the same model")
            cmp = compare_runs(a, b)
            if fmt is Format.table:
                tables.print_comparison(cmp, console)
            else:
                emit(export.comparison_text(cmp, fmt.value))
        else:
            runs = select_runs(store, run_id=run_id, group=group)
            # the terminal's lines name --db in the commands they suggest; a file to share does not
            view = study_view(store, runs, group, db if fmt is Format.table else None) if group is not None else None
            if view is not None:  # runs that differ in model or settings: read run by run, side by side
                ignored = [flag for flag, on in (("--samples", samples), ("--tasks", tasks),
                                                 ("--by-dataset", by_dataset)) if on]
                if ignored:  # the study view has none of them: refused, not dropped
                    raise UsageError(f"{', '.join(ignored)} cannot be used with study {group!r}: read one of its "
                                     f"runs with --run-id (its runs: {', '.join(str(r.id) for r in runs)})")
                _print_study(view, fmt, emit, console if fmt is Format.table else None)
                return
            rows = load_samples(store, runs, blobs=fmt is Format.html)  # html: the figures' per-step latencies
            summary = sm.build_summary(runs, rows, by_dataset=by_dataset)
            if fmt is Format.table:
                tables.print_summary(summary, console, rows if samples else None)
            elif fmt is Format.html:
                from knormctl.render.html import summary_page

                emit(summary_page(summary, samples=rows if samples else None))
            else:
                if tasks and not summary.tasks:  # a header alone, said: not read as a run with no answers
                    print(f"{summary.header.title} (task {summary.header.task}) has no question-task rows: the "
                          f"csv holds only its header", file=sys.stderr)
                emit(export.summary_text(summary, fmt.value, rows if samples else None, tasks=tasks))


def _print_study(view, fmt: Format, emit, console) -> None:
    from knormctl.render import study_output

    if fmt is Format.table:
        study_output.print_study(view, console)
    elif fmt is Format.html:
        emit(study_output.study_page(view))
    else:
        emit(study_output.study_text(view, fmt.value))


def _writer(output: Path | None):
    """stdout, or the file (written whole to a temporary name first: never half a report)."""
    if output is None:
        return lambda text: print(text, end="")

    def write(text: str) -> None:
        from knormctl.errors import UsageError
        from knormctl.files import written_whole

        if output.is_dir():
            raise UsageError(f"--output {output} is a folder")
        with written_whole(output, "--output") as tmp:
            tmp.write_text(text, encoding="utf-8")
        print(output, file=sys.stderr)

    return write
