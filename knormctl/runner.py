"""Runs a baseline or sweep: the glue between the engine (a library) and the store.

Order of work: validate input, load the model, check that the engine can handle it
(family, transformers' cache), cut the samples -- all before a run row exists, so bad
input leaves nothing behind. Then a warm-up of every planned configuration, then for
each round (``--repeats``) and sample every configuration, the order rotating from
sample to sample and round to round so that drift and a cold start cannot favour one
configuration (the plan: knormctl/plan.py). One commit per finished cell (its row:
knormctl/sample_rows.py).
"""

from __future__ import annotations

import os
import shlex
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from knormctl import __version__
from knormctl.config import PressConfig, RunConfig
from knormctl.launch import launcher_device
from knormctl.errors import RunNotOwned, StoreError, UsageError
from knormctl.plan import Cell, check_shard_has_samples, plan_batches, plan_cells, warm_up_plan
from knormctl.sample_rows import config_labels, load_samples, sample_fields
from knormctl.stats import token_match  # the one definition, shared with the report
from knormctl.store import models as m
from knormctl.store.liveness import owner
from knormctl.store.locations import hide_password
from knormctl.tasks.catalog import QUESTION_TASKS
from knormctl.tasks.prompt import QuestionSample


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler so SIGINT and SIGTERM take the same path."""


@dataclass
class Outcome:
    run_id: int
    status: str
    done: int = 0
    failed: int = 0
    planned: int = 0
    skipped_existing: int = 0


def resume_config(store, run_id: int, db_arg: str = "") -> RunConfig:
    """The stored configuration of a run that ``--resume`` may continue. Refused with one line when
    the run does not exist, is complete, or its owner is still alive (same host: its pid and start
    time; another host: a fresh heartbeat). ``Store.reopen_run`` checks again, atomically.
    ``db_arg`` (' --db PATH') names the database in the command a refusal suggests."""
    run = store.get_run(run_id)  # a 'running' run whose owner is gone reads as interrupted
    if run is None:
        raise UsageError(f"run {run_id} does not exist in {store.url}")
    if run.status == m.COMPLETE:
        raise UsageError(f"run {run_id} is complete: nothing to resume")
    if run.status == m.RUNNING:
        raise UsageError(f"run {run_id} is still running ({owner(run)}); resume it once that process has stopped")
    try:
        cfg = RunConfig.from_dict(run.config_json).validate(local=False)
    except UsageError as exc:  # stored by an older knormctl whose checks allowed it
        raise UsageError(f"run {run_id} was stored under rules this knormctl refuses ({exc}), so it cannot be "
                         f"resumed; read it with `knormctl report --run-id {run_id}{db_arg}`") from None
    cfg.check_local_inputs()  # this machine's model and texts: their own message
    return cfg


def _block(split: list[tuple[list[int], list[int] | None]]):
    """(ids, question) of a batch's rows for run_generation: one row as plain lists (batch 1,
    as before), several as lists of rows."""
    if len(split) == 1:
        return split[0]
    return [ids for ids, _ in split], (None if split[0][1] is None else [q for _, q in split])


class _Heartbeat:
    """Refreshes the run's heartbeat while cells run, so readers on other hosts can tell a
    long forward pass from a dead process (add_sample beats too, but a cell can be long)."""

    def __init__(self, store, run_id: int, every_s: float = 60.0):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(store, run_id, every_s), daemon=True)
        self._thread.start()

    def _loop(self, store, run_id, every_s) -> None:
        while not self._stop.wait(every_s):
            try:
                store.heartbeat(run_id)
            except Exception:  # a missed beat is harmless; never kill the sweep for it
                pass

    def stop(self) -> None:
        self._stop.set()


class Runner:
    """One baseline/sweep execution against one store."""

    def __init__(self, cfg: RunConfig, store, *, progress: Callable[[str], None] = lambda s: None,
                 on_cell: Callable[[int, int, str], None] = lambda done, total, desc: None,
                 on_warmed_up: Callable[[list], None] = lambda results: None):
        self.cfg, self.store, self.progress, self.on_cell = cfg, store, progress, on_cell
        self.on_warmed_up = on_warmed_up  # gets the warm-up's results: the CLI estimates the run's length from them

    def prepare(self, loaded=None):
        """Everything that can fail on bad input, before any row is written. ``loaded``: a model
        already in memory (a study's previous run of the same model, dtype and device)."""
        import torch

        from knormctl.options import check_skip_layers
        from knormctl.engine.models import load_model
        from knormctl.engine.support import check_model

        import transformers

        transformers.logging.disable_progress_bar()  # our own progress is on stderr; keep one bar
        cfg = self.cfg  # validated (run_config, resume_config, a study's plan): sources and model path checked
        records = None
        if cfg.task in QUESTION_TASKS:
            from knormctl.tasks.build import fetch_records

            records = fetch_records(cfg)  # a missing Hub dataset fails here, before the model loads
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = launcher_device(cfg.device, torch.cuda.is_available())  # torchrun: cuda:LOCAL_RANK
        if cfg.device_map is not None and device != cfg.device:
            raise UsageError(f"--device-map {cfg.device_map} under torchrun: every rank would place the model "
                             "over every GPU; run one process per mapped model")
        if loaded is not None and (loaded.requested, loaded.dtype, loaded.device_map) == \
                (cfg.model, cfg.dtype, cfg.device_map) and (cfg.device == "auto" or loaded.device.startswith(device)):
            self.loaded = loaded
        else:
            self.loaded = load_model(cfg.model, dtype=cfg.dtype, device=device,
                                     trust_remote_code=cfg.trust_remote_code, progress=self.progress,
                                     device_map=cfg.device_map)
        check_skip_layers(cfg.skip_layers, self.loaded.num_layers)
        self.configs = cfg.press_configs()
        self.labels = config_labels(self.configs)  # 'knorm 0.5', as the report names them
        check_model(self.loaded.model, self.configs, skip_layers=cfg.skip_layers, decode_step=cfg.decode_step,
                    device=self.loaded.device)
        self.samples = load_samples(cfg, self.loaded, self.progress, records)
        check_shard_has_samples(len(self.samples), cfg.shard)
        cells = plan_cells(len(self.samples), self.configs, cfg.shard, cfg.repeats)
        self.batches = plan_batches(cells, cfg.batch_size, self._shape)
        self.cells = [c for batch in self.batches for c in batch]  # one per stored row, in run order
        # the longest answer of the run (question tasks size answers per subtask)
        self.new_tokens = max(self._new_tokens(s) for s in self.samples)
        self._check_keep_recent()
        from knormctl.tasks.scoring import stop_ids

        self.stop_ids = stop_ids(self.loaded.tokenizer, self.loaded.model)

    def start(self, resume_run_id: int | None = None) -> int:
        from knormctl.engine.env import get_environment

        cfg, lm = self.cfg, self.loaded
        self.prior_outputs = []
        self.store.mark_stale_runs()  # a writer records what readers only show: runs whose owner is gone
        if resume_run_id is not None:
            self.run_id = resume_run_id
            # Every finished output, not only the references: a compressed cell stored before the
            # interruption gets its token match when its sample's reference is measured now.
            self.prior_outputs = [s for s in self.store.samples(resume_run_id, with_blobs=True)
                                  if s.error is None and s.generated_ids_json is not None]
            self._check_resume_samples()
            self._check_resume_set_up(get_environment(lm.device))
            # running again, owned by this process (pid, host, heartbeat); refused if another process took it
            self.store.reopen_run(resume_run_id)
            return resume_run_id
        env = get_environment(lm.device)
        self.run_id = self.store.create_run(
            command=cfg.command, task=cfg.task, model_requested=cfg.model, config=cfg.to_dict(),
            command_line=shlex.join(["knormctl", *map(hide_password, sys.argv[1:])]), env=env, group_name=cfg.group,
            shard=cfg.shard, samples_planned=len(self.cells), dtype=lm.dtype, device=lm.device,
            knormctl_version=__version__, git_commit=env.get("git_commit"))
        self.store.update_run(self.run_id, model_resolved=lm.resolved, model_hash=lm.model_hash,
                              attn_implementation=lm.attn_implementation)
        return self.run_id

    def _check_resume_set_up(self, env: dict) -> None:
        """The cells still to measure pair with the finished ones prompt by prompt: they must run
        in the run's set-up (the report header's machine fields; another host of the same
        set-up may go on). A field the run did not record is not compared."""
        import socket
        from types import SimpleNamespace

        from knormctl.render.header import DIFFER_LABELS, MACHINE_FIELDS, machine_of

        stored = machine_of(self.store.get_run(self.run_id))
        here = machine_of(SimpleNamespace(id=None, hostname=socket.gethostname(), device=self.loaded.device,
                                          env_json=env, dtype=self.loaded.dtype, knormctl_version=__version__,
                                          git_commit=env.get("git_commit")))
        differs = [f"{DIFFER_LABELS[f]} {getattr(stored, f)} -> {getattr(here, f)}" for f in MACHINE_FIELDS
                   if f not in self._resume_ignores(stored) and getattr(stored, f) is not None
                   and _resume_value(f, getattr(stored, f)) != _resume_value(f, getattr(here, f))]
        if differs:
            raise UsageError(f"cannot resume run {self.run_id} here: its set-up differs in {', '.join(differs)}; "
                             "its finished cells and the rest would pool two set-ups (resume it where it ran, "
                             "or start a new run)")

    @staticmethod
    def _resume_ignores(stored) -> set[str]:
        """Fields a resume may change: the host (same set-up elsewhere), and on a GPU the CPU
        threads (torchrun sets OMP_NUM_THREADS=1 for its ranks; the GPU does the work)."""
        return {"hostname"} | ({"threads"} if str(stored.device or "").startswith("cuda") else set())

    def _check_resume_samples(self) -> None:
        stored = {s.sample_index: s.text_hash for s in self.store.samples(self.run_id)}
        for i, sample in enumerate(self.samples):
            if i in stored and stored[i] != sample.text_hash:
                raise UsageError(f"cannot resume run {self.run_id}: sample {i} no longer has the same text "
                                 "(the text source or tokenizer changed)")

    def warm_up(self, done: set = frozenset()) -> list:
        """Untimed generations first, so no configuration pays for a cold start (see
        ``warm_up_plan``): every configuration still to measure runs before any is timed (a
        resumed run warms up only what it has left: ``done`` holds the stored (sample,
        configuration, round) cells). Returns their results, full cache first (their speed is a
        first estimate of the run's length), and sets ``warm_rows`` and ``warm_prompt_tokens``
        (they run the batch of the longest prompt left)."""
        from knormctl.engine.loop import run_generation

        todo = [b for b in self.batches if not all((c.sample_index, c.config.key, c.repeat) in done for c in b)]
        if not todo:
            return []
        self.progress("warm-up (untimed)")
        planned = list({c.config.key: c.config for b in todo for c in b}.values())
        # the batch of the longest prompt, as many rows as the largest batch: the shapes the run allocates
        longest = max(todo, key=lambda b: (len(self.samples[b[0].sample_index].prompt_ids), len(b)))
        split = [self._split(self.samples[c.sample_index]) for c in longest]
        ids, question = _block(split)
        self.warm_rows = len(split)
        self.warm_prompt_tokens = len(split) * (len(split[0][0]) + len(split[0][1] or ()))
        return [run_generation(self.loaded.model, ids, pc, n, question_ids=question,
                               prefill_chunk=self.cfg.prefill_chunk, decode_step=self.cfg.decode_step)
                for pc, n in warm_up_plan(planned, self.new_tokens)]

    def _shape(self, i: int) -> tuple:
        """What must be equal for samples to batch: prompt and question lengths, new tokens."""
        ids, question = self._split(self.samples[i])
        return len(ids), len(question or ()), self._new_tokens(self.samples[i])

    def _new_tokens(self, sample) -> int:
        return sample.max_new_tokens if isinstance(sample, QuestionSample) else self.cfg.max_new_tokens

    def _check_keep_recent(self) -> None:
        """The planned check (``RunConfig.validate``) again on the samples' real lengths."""
        from knormctl.plan import refuse_keep_recent_over_budget

        shortest = min(len(self._split(s)[0]) for s in self.samples)
        longest = max(len(s.prompt_ids) for s in self.samples) + self.new_tokens
        refuse_keep_recent_over_budget(self.cfg.keep_recent, self.configs, shortest, longest)

    def _split(self, sample) -> tuple[list[int], list[int] | None]:
        """(ids prefilled and compressed, ids fed after the cut) under the run's protocol."""
        if not isinstance(sample, QuestionSample):
            return sample.prompt_ids, None
        from knormctl.tasks.protocol import split

        return split(sample, self.cfg.protocol)

    def run(self, resume_run_id: int | None = None) -> Outcome:
        run_id = self.start(resume_run_id)
        done_before = ({(s.sample_index, s.config_key, s.repeat) for s in self.store.samples(run_id) if s.error is None}
                       if resume_run_id is not None else set())
        if resume_run_id is not None:
            self.store.delete_failed_cells(run_id)
        out = Outcome(run_id=run_id, status=m.RUNNING, planned=len(self.cells))
        beat = _Heartbeat(self.store, run_id)
        try:
            if self.cfg.warmup:
                self.on_warmed_up(self.warm_up(done_before))
            self._run_cells(out, done_before)
        except KeyboardInterrupt as exc:  # why, not how far: the report counts the stored cells itself
            out.status = m.INTERRUPTED
            why = "stopped by SIGTERM" if isinstance(exc, Interrupted) else "stopped by Ctrl-C (SIGINT)"
            self._end_after_failure(run_id, m.INTERRUPTED, why)
            raise
        except BaseException as exc:
            self._end_after_failure(run_id, m.FAILED, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            beat.stop()
        out.status = m.COMPLETE_WITH_ERRORS if out.failed else m.COMPLETE
        self.store.finish_run(run_id, out.status)
        return out

    def _end_after_failure(self, run_id: int, status: str, why: str) -> None:
        """Mark the run ended while an error (or an interrupt) propagates. When the database is
        what failed (a lost server), this fails too: the first error is the one to report, and
        the run, left 'running' with no live owner, reads as interrupted and resumes."""
        try:
            self.store.finish_run(run_id, status, error=why)
        except RunNotOwned:  # another process owns it now: not this one's to end
            pass
        except StoreError as exc:
            self.progress(f"could not mark run {run_id} {status} ({str(exc).splitlines()[0]})")

    def _run_cells(self, out: Outcome, done_before: set) -> None:
        """Every batch of cells (one cell each at --batch-size 1). A batch runs again when any
        of its rows is missing (resume); the rows already stored are not stored twice."""
        from knormctl.engine.quality import context_perplexity

        cfg = self.cfg
        ppl_ctx: dict[int, float] = {}
        outputs: dict[tuple[int, int], dict[str, list[int]]] = {}  # (sample, repeat) -> config key -> ids
        unmatched = set()
        for row in self.prior_outputs:  # a resumed run's finished outputs
            outputs.setdefault((row.sample_index, row.repeat), {})[row.config_key] = row.generated_ids_json
            if row.token_match is None:
                unmatched.add((row.sample_index, row.repeat))
        for i, r in sorted(unmatched):  # an interruption between storing a cell and its token match
            if "none" in outputs[(i, r)]:
                self._update_token_match(i, r, outputs[(i, r)], "none")
        n = 0
        for batch in self.batches:
            pc, r = batch[0].config, batch[0].repeat
            kept = [(c.sample_index, pc.key, r) in done_before for c in batch]  # stored by an earlier attempt
            results, error = (None, None) if all(kept) else self._generate(batch, ppl_ctx, context_perplexity)
            for k, cell in enumerate(batch):
                i, sample = cell.sample_index, self.samples[cell.sample_index]
                n += 1
                desc = f"sample {i + 1}/{len(self.samples)} {self.labels[pc.key]}"
                if cfg.repeats > 1:
                    desc += f" round {r + 1}/{cfg.repeats}"
                if kept[k]:  # not stored twice
                    out.skipped_existing += 1
                    self.on_cell(n, len(self.cells), desc + " (kept)")
                    continue
                res = None if results is None else results[k]
                if res is not None:
                    row = sample_fields(sample, pc, res, ppl_ctx.get(i), repeat=r, **self._task_fields(sample, res))
                else:
                    row = sample_fields(sample, pc, None, ppl_ctx.get(i), error=error, repeat=r,
                                        **self._task_fields(sample, None))
                    out.failed += 1
                row["batch_size"] = len(batch)
                self.store.add_sample(self.run_id, sample_index=i, **row)
                if res is not None:
                    out.done += 1
                    outs = outputs.setdefault((i, r), {})
                    outs[pc.key] = res.token_ids
                    self._update_token_match(i, r, outs, pc.key)
                self.on_cell(n, len(self.cells), desc)

    def _generate(self, batch: list[Cell], ppl_ctx: dict, context_perplexity):
        """(one GenerationResult per row, None) or (None, the error) for one batch of cells.
        Perplexities are per sample (batch 1): the context's and, in the first round, the
        compressed one."""
        from knormctl.engine.loop import run_generation

        lm, cfg = self.loaded, self.cfg
        pc, r = batch[0].config, batch[0].repeat
        rows = [c.sample_index for c in batch]
        samples = [self.samples[i] for i in rows]
        try:
            for i, sample in zip(rows, samples):
                if i not in ppl_ctx and cfg.task == "lm":
                    ppl_ctx[i] = context_perplexity(lm.model, sample.prompt_ids)
            ids, question = _block([self._split(s) for s in samples])
            stop = cfg.stop_at_eos and isinstance(samples[0], QuestionSample)
            seeds = [cfg.seed + i for i in rows]
            res = run_generation(lm.model, ids, pc, self._new_tokens(samples[0]),
                                 sampling=cfg.sampling, temperature=cfg.temperature,
                                 seed=seeds[0] if len(seeds) == 1 else seeds, tokenizer=lm.tokenizer,
                                 question_ids=question, prefill_chunk=cfg.prefill_chunk,
                                 stop_ids=self.stop_ids if stop else None, decode_step=cfg.decode_step)
            results = res.split()
            for i, sample, one in zip(rows, samples, results):
                if sample.eval_ids and r == 0:  # quality is deterministic: measured in the first round only
                    one.ppl_compressed, one.eval_tokens = self._quality(sample, pc, cfg.seed + i)
            return results, None
        except (RuntimeError, ValueError, MemoryError) as exc:  # OOM, CUDA errors, a failing press
            if os.environ.get("KNORMCTL_DEBUG"):
                traceback.print_exc()
            return None, f"{type(exc).__name__}: {exc}"

    def _task_fields(self, sample, res) -> dict:
        """protocol and scored answer for a question sample (nothing for an lm sample)."""
        if not isinstance(sample, QuestionSample):
            return {}
        from knormctl.tasks.scoring import answer_text

        answer = None if res is None else answer_text(res.token_ids, self.loaded.tokenizer, self.stop_ids)
        return {"protocol": self.cfg.protocol, "answer": answer}

    def _quality(self, sample, pc: PressConfig, seed: int) -> tuple[float | None, int]:
        """ppl_compressed and how many tokens it scored, by the configured method."""
        from knormctl.engine.quality import compressed_perplexity, stream_perplexity

        model = self.loaded.model
        if self.cfg.ppl_method == "stream":
            chunk = sample.prompt_ids + sample.eval_ids
            skip = self.cfg.prune_after if self.cfg.ppl_skip is None else self.cfg.ppl_skip
            return stream_perplexity(model, chunk, pc, skip, seed=seed), max(0, len(chunk) - 1 - skip)
        return (compressed_perplexity(model, sample.prompt_ids, sample.eval_ids, pc, seed=seed,
                                      prefill_chunk=self.cfg.prefill_chunk), len(sample.eval_ids))

    def _update_token_match(self, i: int, repeat: int, outs: dict[str, list[int]], new_key: str) -> None:
        """Compare with the full-cache output of the same sample and repeat, whichever finished first."""
        ref = outs.get("none")
        if ref is None:
            return
        keys = outs if new_key == "none" else [new_key]
        self.store.set_token_match(self.run_id, i, {k: token_match(outs[k], ref) for k in keys}, repeat=repeat)


def _resume_value(field: str, value):
    """What a resume compares: a CUDA device by its kind, not its index (a torchrun rank stored
    cuda:1 resumes on cuda:0; the device model is compared on its own)."""
    if field == "device" and isinstance(value, str) and value.startswith("cuda"):
        return "cuda"
    return value
