"""Shared body of `baseline` and `sweep`: store, signals, progress, summary."""

from __future__ import annotations

import json
import signal
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from knormctl.cli._common import fail
from knormctl.config import RunConfig
from knormctl.errors import StoreError

err = Console(stderr=True)  # progress and logs on stderr: stdout stays parseable


def _raise_interrupted(signum, frame):
    from knormctl.runner import Interrupted

    raise Interrupted()


def run_benchmark(cfg: RunConfig | None, db: str | None, *, json_out: bool, resume: int | None = None) -> None:
    from knormctl.runner import resume_config
    from knormctl.store import open_store

    store = open_store(db)
    if store.upgrade_note:
        err.print(store.upgrade_note)
    if resume is not None:
        cfg = resume_config(store, resume)  # refused while its owner is alive, or when complete

    previous = signal.signal(signal.SIGTERM, _raise_interrupted)  # SIGTERM takes the Ctrl-C path
    try:
        _run(cfg, store, json_out, resume)
    finally:
        signal.signal(signal.SIGTERM, previous)  # in-process callers (tests, notebooks) get theirs back


def _run(cfg: RunConfig, store, json_out: bool, resume: int | None) -> None:
    from knormctl.runner import Runner

    runner = Runner(cfg, store, progress=lambda msg: err.log(msg))
    try:
        runner.prepare()  # model, samples, checks: bad input fails here, before any row is written
    except KeyboardInterrupt:
        raise fail("interrupted before the run started; nothing was stored", 130) from None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False, disable=json_out and not err.is_terminal) as bar:
        task = bar.add_task("warm-up", total=len(runner.cells))
        runner.on_cell = lambda done, total, desc: bar.update(task, completed=done, description=desc)
        try:
            outcome = runner.run(resume_run_id=resume)
        except StoreError as exc:  # the database failed mid-run (disk full, lost server): a runtime failure
            bar.stop()
            raise fail(str(exc).splitlines()[0], 1) from None
        except KeyboardInterrupt:
            run_id = getattr(runner, "run_id", None)
            bar.stop()
            if run_id is None:
                raise fail("interrupted before the run started; nothing was stored", 130) from None
            run = store.get_run(run_id)
            raise fail(f"interrupted: run {run_id} keeps {run.samples_done} finished sample(s); "
                       f"finish it with: knormctl sweep --resume {run_id}", 130) from None
    _print_summary(store, outcome, json_out)


def _print_summary(store, outcome, json_out: bool) -> None:
    """The same summary as `knormctl report`, built from the stored rows."""
    from knormctl.render.export import to_json
    from knormctl.render.summary import build_summary

    summary = build_summary([store.get_run(outcome.run_id)], store.samples(outcome.run_id))
    if json_out:
        data = {"run_id": outcome.run_id, "status": outcome.status, "done": outcome.done,
                "failed": outcome.failed, "planned": outcome.planned, **json.loads(to_json(summary))}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    from knormctl.render.tables import make_console, print_summary

    print_summary(summary, make_console())
    print(f"run {outcome.run_id}: {outcome.status}, {outcome.done} cell(s) stored"
          + (f", {outcome.failed} failed" if outcome.failed else "")
          + f". Details: knormctl report --run-id {outcome.run_id}")
