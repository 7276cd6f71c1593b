"""Shared body of `baseline` and `sweep`: store, signals, progress, summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console

from knormctl.cli._common import check_db_exists, db_arg, fail, fill, on_terminal
from knormctl.cli._progress import cell_progress
from knormctl.cli._signals import sigterm_interrupts
from knormctl.config import RunConfig
from knormctl.errors import RunNotOwned, StoreError, UsageError


LONG_RUN_S = 600  # an estimate longer than this gets a line on how to stop and resume


class Log:
    """Timestamped lines on stderr (stdout stays parseable). On a terminal they wrap at its width
    between words, continued under the message (an 80-column terminal broke them mid-word);
    into a file or pipe never: a log file is read with grep. The source location -- the engine
    or runner code that reported the line -- only with --verbose."""

    def __init__(self, verbose: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.verbose = verbose

    def __call__(self, message: str) -> None:
        stamp = f"[{time.strftime('%H:%M:%S')}] "
        line = stamp + message
        if self.verbose:
            caller = sys._getframe(1)  # whoever reported it, not this file
            line += f"  ({Path(caller.f_code.co_filename).name}:{caller.f_lineno})"
        if self.console.is_terminal:
            line = fill(line, self.console.width, hang=" " * len(stamp))
        # markup/highlight off: messages hold paths and intervals like "(0, 1]"
        self.console.print(line, soft_wrap=True, markup=False, highlight=False, emoji=False)


def run_benchmark(cfg: RunConfig | None, db: str | None, *, json_out: bool, resume: int | None = None,
                  verbose: bool = False) -> None:
    from knormctl.runner import resume_config
    from knormctl.store import open_store
    from knormctl.store.db import open_store_for_run

    log = Log(verbose)
    if resume is not None:
        check_db_exists(db)  # a run is continued in a database that exists: a typo creates none
    store = open_store(db) if resume is not None else open_store_for_run(db)  # a new file: once the run starts
    if store.upgrade_note:
        log(store.upgrade_note)
    if resume is not None:
        cfg = resume_config(store, resume, db_arg(db))  # refused while its owner is alive, or when complete
    else:
        refuse_what_the_group_cannot_hold(store, cfg, db)

    with sigterm_interrupts():  # SIGTERM takes the Ctrl-C path (the exit code says which: cli/_signals)
        _run(cfg, store, json_out, resume, log, verbose, db=db)


def refuse_what_the_group_cannot_hold(store, cfg: RunConfig, db: str | None) -> None:
    """A run that its --group would misread is refused: a shard the group already holds for the
    same sweep (its cells would be read as repeats of the first copy's: n=2 x2 where one round
    was measured), and perplexity beside accuracy (the study view ranks one quality measure: an
    lm run read under a question task's 'accuracy' column was all N/A, as a study file refuses)."""
    if not cfg.group:
        return
    from knormctl.render.study import config_settings, run_settings

    stored = store.runs_in_group(cfg.group)
    other = next((r for r in stored if (r.task in ("lm", None)) != (cfg.task == "lm")), None)
    if other is not None:
        raise UsageError(f"group {cfg.group!r} holds {'perplexity' if cfg.task != 'lm' else 'question-task'} runs "
                         f"(run {other.id}: task {other.task or 'lm'}); task {cfg.task} cannot share it (its report "
                         f"ranks one quality measure): give it another --group")
    if not cfg.shard:
        return
    mine = config_settings(cfg.to_dict())
    for run in stored:
        if run.shard == cfg.shard and run.model_requested == cfg.model and run_settings(run) == mine:
            raise UsageError(f"group {cfg.group!r} already holds shard {cfg.shard} of this sweep (run {run.id}, "
                             f"{run.status}); finish it with `knormctl sweep --resume {run.id}{db_arg(db)}`, or "
                             f"delete it first (knormctl runs delete {run.id}{db_arg(db)})")


def _quiet_libraries(verbose: bool) -> None:
    """One voice on stderr: no transformers / huggingface_hub progress bars (a load or a
    download is announced by our own log line). --verbose keeps their defaults."""
    if verbose:
        return
    import huggingface_hub.utils
    import transformers

    transformers.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _run(cfg: RunConfig, store, json_out: bool, resume: int | None, log: Log, verbose: bool, *,
         loaded=None, summary: bool = True, interrupt_hint: str | None = None, db: str | None = None):
    """One run, with progress and estimates on stderr; its summary on stdout (``summary``).
    ``loaded``: a model already in memory (studies); ``interrupt_hint``: the command that continues
    it (a study's), else ``sweep --resume N`` with the ``db`` the user named. Returns (outcome, the
    loaded model)."""
    from knormctl import estimate
    from knormctl.runner import Runner

    _quiet_libraries(verbose)
    runner = Runner(cfg, store, progress=log)
    def resume_hint(run_id: int) -> str:
        return interrupt_hint or f"knormctl sweep --resume {run_id}{db_arg(db)}"

    try:
        runner.prepare(loaded)  # model, samples, checks: bad input fails here, before any row is written
    except KeyboardInterrupt:
        if resume is not None:  # the run being resumed keeps what it had
            kept = store.get_run(resume).samples_done
            raise fail(f"interrupted before the resumed run went on: run {resume} keeps {kept} finished cell(s); "
                       f"finish it with: {resume_hint(resume)}", 130) from None
        if interrupt_hint and cfg.group and store.runs_in_group(cfg.group):  # a study with runs stored
            raise fail(f"interrupted before this run of the study started (nothing of it was stored); finish the "
                       f"study with: {interrupt_hint}", 130) from None
        raise fail("interrupted before the run started; nothing was stored", 130) from None
    stored = _announce_plan(runner, cfg, store, resume, log)
    progress = cell_progress(log.console, log, len(runner.cells))
    if not cfg.warmup:
        progress.measuring()

    def warmed_up(results: list) -> None:
        guess = None
        if not stored and resume is None:  # a resumed run's remaining cells: the live ETA says it
            guess = estimate.from_warmup(results, runner.warm_prompt_tokens, runner.cells, runner.samples,
                                         runner.new_tokens, cfg.ppl_method, batch_rows=runner.warm_rows)
        if guess:
            log(f"estimate: ~{estimate.format_duration(guess.seconds)} for {estimate.count(len(runner.cells), 'cell')} "
                f"({guess.basis})")
        if (guess or stored) and (guess or stored).seconds > LONG_RUN_S:
            log(f"Ctrl-C stops it at any time: finished cells are kept, and "
                f"`{resume_hint(runner.run_id)}` measures the rest")
        progress.measuring()

    runner.on_warmed_up = warmed_up
    runner.on_cell = progress.update
    try:
        try:
            outcome = runner.run(resume_run_id=resume)
        finally:
            progress.close()  # before any message: a live bar would draw over it
    except StoreError as exc:  # the database failed mid-run (disk full, lost server): a runtime failure
        run_id = getattr(runner, "run_id", None)
        then = (f"; run {run_id} keeps the cells stored before it: once the database is back, finish it with: "
                f"{resume_hint(run_id)}") if run_id is not None and not isinstance(exc, RunNotOwned) else ""
        raise fail(str(exc).splitlines()[0] + then, 1) from None
    except KeyboardInterrupt:
        run_id = getattr(runner, "run_id", None)
        if run_id is None:
            raise fail("interrupted before the run started; nothing was stored", 130) from None
        run = store.get_run(run_id)
        raise fail(f"interrupted: run {run_id} keeps {run.samples_done} finished cell(s); "
                   f"finish it with: {resume_hint(run_id)}", 130) from None
    if summary:
        _print_summary(store, outcome, json_out, db)
    return outcome, runner.loaded


def _announce_plan(runner, cfg: RunConfig, store, resume: int | None, log: Log):
    """The plan line, and the estimate from a stored run when there is one (returned)."""
    from knormctl import estimate

    mine = len({c.sample_index for c in runner.cells})  # this shard's samples (all, unsharded)
    log(estimate.plan_line(len(runner.cells), mine, runner.configs, runner.new_tokens,
                           cfg.eval_tokens if cfg.task == "lm" else 0,  # question tasks score answers
                           repeats=cfg.repeats))
    largest = max(len(batch) for batch in runner.batches)
    if largest < cfg.batch_size:  # said now: the report's throughput is per row of the batches that ran
        log(f"--batch-size {cfg.batch_size}: batches of at most {largest} row(s) here (only prompts of equal "
            f"length batch together; {estimate.count(mine, 'sample')} in this run)")
    stored = None if resume is not None else estimate.from_stored_run(store, cfg, len(runner.cells))
    if stored:
        log(f"estimate: ~{estimate.format_duration(stored.seconds)} ({stored.basis})")
    elif not cfg.warmup and resume is None:
        log("estimate: after the first cell (no warm-up to time)")
    return stored


def _print_summary(store, outcome, json_out: bool, db: str | None) -> None:
    """The same summary as `knormctl report`, built from the stored rows."""
    from knormctl.render.export import to_json
    from knormctl.render.summary import build_summary

    summary = build_summary([store.get_run(outcome.run_id)], store.samples(outcome.run_id))
    stored = outcome.done + outcome.skipped_existing  # a resumed run's kept cells are stored too
    if json_out:
        data = {"run_id": outcome.run_id, "status": outcome.status, "done": stored, "measured": outcome.done,
                "kept": outcome.skipped_existing, "failed": outcome.failed, "planned": outcome.planned,
                **json.loads(to_json(summary))}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    from knormctl.render.tables import make_console, print_summary

    print_summary(summary, make_console())
    # the command on a line of its own: at 80 columns the sentence and the command did not fit one
    print(on_terminal(f"run {outcome.run_id}: {outcome.status}, {stored} cell(s) stored"
                  + (f" ({outcome.done} measured now, {outcome.skipped_existing} kept)" if outcome.skipped_existing
                     else "")
                  + (f", {outcome.failed} failed" if outcome.failed else "") + "."))
    print(f"Details: knormctl report --run-id {outcome.run_id}{db_arg(db)}")
