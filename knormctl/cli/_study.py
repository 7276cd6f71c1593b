"""`sweep --config study.toml`: plan, dry-run, run and continue a study (knormctl/study.py).

A study runs its planned runs one after the other, all in one group named after the study,
reusing a loaded model while model, dtype and device stay the same. Running the same study
again continues it: complete runs are kept, an interrupted run is resumed, missing runs
start. ``--resume-group NAME`` does the same from the database alone (the resolved study
is stored with every run).
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from knormctl.cli._common import db_arg, wrapped
from knormctl.errors import KnormctlError, UsageError

# options that say where and how to print, not what to measure: never study overrides
NOT_OVERRIDES = ("config", "dry_run", "db", "json_out", "verbose", "resume", "resume_group", "group")


def given_options(ctx) -> list[str]:
    """Parameter names given on the command line (or by the environment)."""
    out = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name != "DEFAULT":
            out.append(param.name)
    return out


def overrides_from(ctx, cli_cfg) -> dict[str, Any]:
    """The command line's options as study overrides: field name -> parsed value."""
    from dataclasses import fields

    names = {f.name for f in fields(cli_cfg)}
    out = {}
    for name in given_options(ctx):
        if name in NOT_OVERRIDES:
            continue
        field = "sampling" if name == "sample" else name
        if field in names:
            out[field] = getattr(cli_cfg, field)
    return out


def planned_cells(cfg) -> int | None:
    """Cells a run will measure (its shard's, for a plain sweep's --dry-run: studies are never
    sharded), without loading the model or cutting texts (None: not known before the texts
    are cut)."""
    from knormctl.config import planned_samples
    from knormctl.plan import check_shard_has_samples, plan_cells

    n = planned_samples(cfg)
    if n is None:
        return None
    check_shard_has_samples(n, cfg.shard)  # as the run itself would refuse it, after loading the model
    return len(plan_cells(n, cfg.press_configs(), cfg.shard, max(1, getattr(cfg, "repeats", 1) or 1)))


def _check_group_is_the_studys(store, study, db: str | None) -> list:
    """The runs stored in the study's group; refused (one line) when some are not this study's."""
    stored = store.runs_in_group(study.name)
    planned = {r.key for r in study.runs}
    foreign = [r for r in stored if _stored_key(r) not in planned]
    if foreign:
        raise UsageError(f"group {study.name!r} already holds {len(foreign)} run(s) that are not part of this study "
                         f"(e.g. run {foreign[0].id}); give the study another name (name = ... or --group), or "
                         f"delete them: knormctl runs delete {' '.join(str(r.id) for r in foreign[:5])}{db_arg(db)}")
    return stored


def refuse_what_the_machine_cannot_run(cfg) -> None:
    """What a run refuses about this machine before it loads a model: a device that is not here,
    a CUDA graph without CUDA (the default --device auto lands on the CPU here). Imports torch
    only for a run that names a device or a CUDA graph."""
    if cfg.device_map is not None or (cfg.device in ("auto", "cpu") and cfg.decode_step != "graph"):
        return
    from knormctl.engine.models import resolve_device
    from knormctl.options import check_loaded_decode_step

    check_loaded_decode_step(cfg.decode_step, resolve_device(cfg.device))


def print_plan(study, db: str | None, json_out: bool, *, plain: bool = False) -> None:
    """--dry-run: the planned runs, their cells and a time estimate from stored runs; loads no model.
    ``plain``: a plain sweep's (not a study: its group may hold other sweeps or shards, and
    nothing in it is kept or resumed by the study's rules)."""
    from knormctl import estimate
    from knormctl.store import COMPLETE, COMPLETE_WITH_ERRORS, RUNNING, open_store
    from knormctl.store.liveness import owner
    from knormctl.store.locations import check_sqlite_file, is_default, parse_url, sqlite_file, to_url

    for run in study.runs:  # the run's own refusal, said by the plan too
        refuse_what_the_machine_cannot_run(run.config)
    store = None
    url = to_url(db)
    path = sqlite_file(parse_url(url))
    if path is not None and not is_default(db):  # a place the real run cannot write to is refused as it would
        check_sqlite_file(path)  # (the default's folder the run creates)
    try:
        store = open_store(url, readonly=True)
    except KnormctlError:
        store = None  # nothing to estimate from: no database yet, or an older schema the run upgrades
        if path is None or (path.exists() and path.stat().st_size > 0):
            from knormctl.store.db import check_open_for_run

            check_open_for_run(url)  # the real run's refusal (foreign tables, a newer schema, no server)
    by_key = {}
    if store is not None:
        try:  # the real run would be refused: the plan says so too
            if not plain:
                by_key = {_stored_key(r): r for r in _check_group_is_the_studys(store, study, db)}
            else:
                from knormctl.cli._execute import refuse_what_the_group_cannot_hold

                refuse_what_the_group_cannot_hold(store, study.runs[0].config, db)
        except UsageError:
            store.close()
            raise
    rows, total_cells, total_s, uncounted, no_history = [], 0, 0.0, False, False
    for run in study.runs:
        cells = planned_cells(run.config)
        stored = by_key.get(run.key)
        if stored is not None and stored.status in (COMPLETE, COMPLETE_WITH_ERRORS):
            rows.append((run, 0, None, f"kept: run {stored.id}, {stored.status}"))
            continue
        if stored is not None and stored.status == RUNNING:  # its owner lives: the real run stops there
            rows.append((run, 0, None, f"running now (run {stored.id}, {owner(stored)}): the study would stop "
                                       "here until it ends"))
            continue
        if stored is not None:  # what a resume measures: the cells not stored, and failed ones again
            cells = None if cells is None else max(0, cells - stored.samples_done)
            state = f"resumes run {stored.id} ({stored.status}, {stored.samples_done} cells kept)"
        else:
            state = None
        if cells == 0:  # nothing left to measure: nothing to estimate
            rows.append((run, 0, None, state))
            continue
        guess = None
        if store is not None and cells:
            guess = estimate.from_stored_run(store, run.config, cells) or estimate.from_model_runs(
                store, run.config, cells)
        rows.append((run, cells, guess, state))
        total_cells += cells or 0
        if cells is None:  # a Hub dataset: as many cells as it has records
            uncounted = True
        elif guess is None:
            no_history = True
        else:
            total_s += guess.seconds
    if store is not None:
        store.close()
    if json_out:
        import json

        sys.stdout.write(json.dumps({
            "study": study.name, "runs": [
                {"index": r.index + 1, "model": r.config.model, "varying": r.varying, "cells": cells,
                 "estimate_s": None if g is None else g.seconds, "estimate_basis": None if g is None else g.basis,
                 "stored": state}
                for r, cells, g, state in rows],
            "cells": None if uncounted else total_cells,
            "estimate_s": None if uncounted or no_history else total_s}, indent=2, default=str) + "\n")
        return
    print(wrapped(f"study {study.name}: {len(study.runs)} run(s)"
                  + (f", varying {', '.join(study.axes)}" if study.axes else "")))
    for run, cells, guess, state in rows:
        what = ", ".join(f"{k}={v}" for k, v in {**run.varying, "shard": run.config.shard}.items()
                         if k != "model" and v is not None)
        head = f"{run.index + 1:>3}. {run.config.model}" + (f" ({what})" if what else "")
        if state is not None and cells == 0:  # kept, running now, or nothing left to resume
            print(wrapped(f"{head}: {state}", indent="  ", hang="       "))
            continue
        print(wrapped(head + f": {cells if cells is not None else '?'} cells"
                      + (f" to measure, {state}" if state else "")
                      + (f", ~{estimate.format_duration(guess.seconds)} ({guess.basis})" if guess else ", no estimate"),
                      indent="  ", hang="       "))
    which = "some runs" if total_s else "it" if len(rows) == 1 else "any run"
    why = [reason for reason, holds in (
        ("a Hub dataset's cells are counted only once it is read", uncounted),
        ("no stored run of its model on this host", no_history)) if holds]
    when = (f"~{estimate.format_duration(total_s)}" if not why else
            (f"at least ~{estimate.format_duration(total_s)}; " if total_s else "")
            + f"no estimate for {which} ({'; '.join(why)})")
    count = total_cells if not uncounted else f"at least {total_cells}" if total_cells else "?"
    print(wrapped(f"total: {count} cell{'' if count == 1 else 's'}, {when}. Nothing was run (--dry-run)."))


def _stored_key(run) -> str | None:
    from knormctl.study import normalized_key

    key = ((run.config_json or {}).get("study") or {}).get("key")
    return None if key is None else normalized_key(key)


def run_study(study, db: str | None, *, json_out: bool, verbose: bool) -> None:
    """Run (or continue) every planned run of ``study``, then print the study's report."""
    from knormctl.cli._execute import Log, _run
    from knormctl.cli._signals import sigterm_interrupts
    from knormctl.runner import resume_config
    from knormctl.store import COMPLETE, COMPLETE_WITH_ERRORS
    from knormctl.store.db import open_store_for_run

    log = Log(verbose)
    store = open_store_for_run(db)  # a new file is created when the first run starts, not by a refused one
    if store.upgrade_note:
        log(store.upgrade_note)
    stored = _check_group_is_the_studys(store, study, db)
    by_key = {}
    for r in stored:  # the newest run of each planned key
        by_key[_stored_key(r)] = r
    # Continuing the study: its stored plan (the command line's overrides included) and database
    # (interrupted before any of its runs was stored, nothing is kept and _run says so).

    hint = f"knormctl sweep --resume-group {shlex.quote(study.name)}{db_arg(db)}"
    loaded = None
    with sigterm_interrupts():
        for planned_run in study.runs:
            n = f"study {study.name}, run {planned_run.index + 1} of {len(study.runs)}"
            what = ", ".join(f"{k}={v}" for k, v in planned_run.varying.items())
            existing = by_key.get(planned_run.key)
            if existing is not None and existing.status in (COMPLETE, COMPLETE_WITH_ERRORS):
                log(f"{n}: kept (run {existing.id}, {existing.status})" + (f" [{what}]" if what else ""))
                continue
            log(f"{n}" + (f" [{what}]" if what else "") + (f": resuming run {existing.id}" if existing else ""))
            cfg = planned_run.config
            if existing is not None:
                cfg = resume_config(store, existing.id, db_arg(db))  # refused while its owner is alive
            _, loaded = _run(cfg, store, json_out, None if existing is None else existing.id, log, verbose,
                             loaded=loaded, summary=False, interrupt_hint=hint, db=db)
    _print_study(store, study.name, json_out, db)


def _print_study(store, group: str, json_out: bool, db: str | None) -> None:
    from knormctl.cli._select import select_runs, study_view
    from knormctl.render import study_output

    runs = select_runs(store, group=group)
    view = study_view(store, runs, group, db)
    if view is None:  # one run (or its shards): the usual summary
        from knormctl.render.summary import build_summary
        from knormctl.render.tables import make_console, print_summary

        from knormctl.cli._select import load_samples

        summary = build_summary(runs, load_samples(store, runs))
        if json_out:
            from knormctl.render.export import to_json

            sys.stdout.write(to_json(summary))
        else:
            print_summary(summary, make_console())
        return
    if json_out:
        sys.stdout.write(study_output.study_text(view, "json"))
    else:
        from knormctl.render.tables import make_console

        study_output.print_study(view, make_console())
    print(f"study {group}: {len(runs)} run(s).\nDetails: knormctl report --group {shlex.quote(group)}{db_arg(db)}",
          file=sys.stderr)  # the command on a line of its own (80 columns)


def stored_study(store, group: str, db: str | None = None):
    """The study stored with the runs of ``group`` (for --resume-group)."""
    from knormctl.study import study_from_stored

    runs = store.runs_in_group(group)
    if not runs:
        raise UsageError(f"no runs in group {group!r} in {store.url}")
    resolved = next(((r.config_json or {}).get("study") for r in reversed(runs)  # the newest plan
                     if (r.config_json or {}).get("study")), None)
    if resolved is None:
        raise UsageError(f"group {group!r} is not a study (its runs were not planned from a study file); "
                         "resume its runs one by one with --resume N")
    try:
        return study_from_stored({k: v for k, v in resolved.items() if k not in ("index", "key", "key_ids")})
    except UsageError as exc:  # stored by an older knormctl whose planning allowed it
        raise UsageError(f"group {group!r} was planned under rules this knormctl refuses ({exc}), so it cannot "
                         f"be continued as a study; read it with `knormctl report --group {shlex.quote(group)}{db_arg(db)}`, or "
                         "resume its runs one by one with --resume N") from None


def study_command(ctx, cli_cfg, config: str | None, db: str | None, *, group: str | None, json_out: bool,
                  verbose: bool, dry_run: bool) -> None:
    """`sweep --config FILE [--dry-run]`, or `sweep --dry-run` for a plain sweep."""
    from knormctl.study import load_study, plan_study

    if config is not None:
        study = load_study(config, overrides=overrides_from(ctx, cli_cfg), name=group)
    else:  # a plain sweep, planned as a study of one run
        data = {k: v for k, v in overrides_from(ctx, cli_cfg).items() if k != "shard"}
        study = plan_study(data, path="the command line", name=group or cli_cfg.group or "sweep")
        for run in study.runs:  # a plain sweep may be one shard of many: its plan is the shard's cells
            run.config.shard = cli_cfg.shard
    if dry_run:
        print_plan(study, db, json_out, plain=config is None)
        return
    run_study(study, db, json_out=json_out, verbose=verbose)


def resume_study(ctx, group: str, db: str | None, *, json_out: bool, verbose: bool, dry_run: bool) -> None:
    """`sweep --resume-group NAME`: the stored study, continued."""
    from knormctl.store import open_store

    given = [n for n in given_options(ctx) if n not in ("resume_group", "db", "json_out", "verbose", "dry_run")]
    if given:
        raise UsageError(f"--resume-group {group} continues the study as stored; "
                         f"{', '.join('--' + n.replace('_', '-') for n in given)} cannot change it "
                         "(only --db, --json, --verbose and --dry-run may be given with --resume-group)")
    with open_store(db, readonly=True) as store:
        study = stored_study(store, group, db)
    if dry_run:
        print_plan(study, db, json_out)
        return
    run_study(study, db, json_out=json_out, verbose=verbose)
