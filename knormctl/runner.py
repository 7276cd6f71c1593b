"""Runs a baseline or sweep: the glue between the engine (a library) and the store.

Order of work: validate input, load the model, cut the samples -- all before a run
row exists, so bad input leaves nothing behind. Then a warm-up, then for each
sample every configuration, the order rotating from sample to sample so that drift
and a cold start cannot favour one configuration. One commit per finished cell.
"""

from __future__ import annotations

import os
import shlex
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from knormctl import __version__
from knormctl.config import PressConfig, RunConfig, parse_shard
from knormctl.errors import UsageError
from knormctl.store import models as m
from knormctl.tasks.catalog import QUESTION_TASKS
from knormctl.tasks.prompt import QuestionSample


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler so SIGINT and SIGTERM take the same path."""


@dataclass
class Cell:
    sample_index: int
    config: PressConfig


@dataclass
class Outcome:
    run_id: int
    status: str
    done: int = 0
    failed: int = 0
    planned: int = 0
    skipped_existing: int = 0


def plan_cells(n_samples: int, configs: list[PressConfig], shard: str | None) -> list[Cell]:
    """Every (sample x configuration), configurations rotated per sample; then this shard's share."""
    cells = []
    n = len(configs)
    for i in range(n_samples):
        for j in range(n):
            cells.append(Cell(i, configs[(i + j) % n]))
    if shard:
        k, total = parse_shard(shard)
        cells = [c for idx, c in enumerate(cells) if idx % total == k - 1]
    return cells


def prompt_budget(asked: int, max_positions: int | None, max_new: int, eval_tokens: int) -> int:
    """Prompt tokens so that prompt + new tokens + evaluated tokens fit the model's context."""
    if max_positions is None:
        return asked
    room = max_positions - max_new - eval_tokens
    if room < 16:
        raise UsageError(f"the model's context ({max_positions} tokens) cannot hold --max-new-tokens {max_new} "
                         f"+ --eval-tokens {eval_tokens} and a prompt")
    return min(asked, room)


def load_samples(cfg: RunConfig, loaded, progress: Callable[[str], None], records=None) -> list:
    """The run's samples: wikitext-like (short) first, then pg19-like (long); or a question
    task's prompts (``records``: what ``tasks.build.fetch_records`` fetched from the Hub)."""
    from knormctl.engine.text import make_samples

    tok, maxpos = loaded.tokenizer, loaded.max_positions
    if cfg.task in QUESTION_TASKS:
        from knormctl.tasks.build import make_samples as task_samples

        return task_samples(cfg, tok, maxpos, progress, records)
    samples = []
    if cfg.num_wikitext_samples:
        n_tok = prompt_budget(cfg.wikitext_prompt_tokens, maxpos, cfg.max_new_tokens, cfg.eval_tokens)
        samples += make_samples(cfg.wikitext_source, cfg.num_wikitext_samples, tok, n_tok, cfg.eval_tokens,
                                cfg.seed, progress=progress)
    if cfg.num_pg19_samples:
        n_tok = prompt_budget(cfg.max_prompt_tokens, maxpos, cfg.max_new_tokens, cfg.eval_tokens)
        samples += make_samples(cfg.pg19_source, cfg.num_pg19_samples, tok, n_tok, cfg.eval_tokens,
                                cfg.seed + 1, progress=progress)
    return samples


def sample_fields(sample, pc: PressConfig, res=None, ppl_context=None, error: str | None = None, *,
                  protocol: str | None = None, answer: str | None = None) -> dict:
    """The store row for one cell (``res`` is a GenerationResult, or None when it failed).

    Question samples also get their task columns; ``answer`` is the generated text as
    scored (up to the first EOS), ``protocol`` what was compressed.
    """
    row = dict(
        task="lm", dataset=sample.dataset, doc_id=str(sample.doc_id), doc_title=sample.doc_title,
        char_offset=sample.char_offset, text_hash=sample.text_hash, prompt_tokens=len(sample.prompt_ids),
        config_key=pc.key, press=pc.press, keep_ratio=pc.keep_ratio, prune_after=pc.prune_after,
        skip_layers=",".join(map(str, pc.skip_layers)), compress_mode=pc.mode, keep_recent=pc.keep_recent,
        ppl_context=ppl_context, error=error,
    )
    question = isinstance(sample, QuestionSample)
    if question:
        row.update(task=sample.task, subtask=sample.subtask, protocol=protocol, answers_json=sample.answers,
                   needle_depth=sample.needle_depth, context_length=sample.context_length,
                   question_tokens=sample.question_tokens, score_metric=sample.metric)
        extra = {k: v for k, v in sample.extra.items() if k in ("chance", "truncated") and v is not None}
        if extra:
            row["extra_json"] = extra
    if res is not None:
        row.update(
            new_tokens=res.new_tokens, ttft_s=res.ttft_s, tpot_s=res.tpot_s, itl_p50_s=res.itl_p50_s,
            itl_p90_s=res.itl_p90_s, itl_p99_s=res.itl_p99_s, throughput_tps=res.throughput_tps,
            total_s=res.total_s, peak_mem_bytes=res.memory.bytes, peak_mem_kind=res.memory.kind,
            peak_mem_reason=res.memory.reason, kv_bytes_peak=res.kv_bytes_peak, kv_bytes_final=res.kv_bytes_final,
            kv_entries_peak=res.kv_entries_peak, kv_entries_final=res.kv_entries_final,
            compress_events=res.compress_events, compress_time_s=res.compress_time_s,
            ppl_compressed=res.ppl_compressed, eval_tokens=res.eval_tokens, generated_text=res.text,
            generated_ids_json=res.token_ids, step_latencies_json=res.step_latencies_s,
        )
        if question:
            from knormctl.tasks.scoring import score

            scored = res.text if answer is None else answer
            row["score"] = score(sample.metric, scored, sample.answers, subtask=sample.subtask,
                                 all_classes=sample.extra.get("all_classes"))
            if scored != res.text:  # what was scored, when the output goes on past an EOS
                row["extra_json"] = {**row.get("extra_json", {}), "answer": scored}
    return row


def token_match(ids: list[int], reference: list[int]) -> float | None:
    """Fraction of positions where the output equals the full-cache output."""
    n = min(len(ids), len(reference))
    return sum(a == b for a, b in zip(ids, reference)) / n if n else None


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
                 on_cell: Callable[[int, int, str], None] = lambda done, total, desc: None):
        self.cfg, self.store, self.progress, self.on_cell = cfg, store, progress, on_cell

    def prepare(self):
        """Everything that can fail on bad input, before any row is written."""
        import torch

        from knormctl.engine.compress import check_skip_layers
        from knormctl.engine.models import load_model
        from knormctl.engine.text import validate_source

        import transformers

        transformers.logging.disable_progress_bar()  # our own progress is on stderr; keep one bar
        cfg = self.cfg
        if cfg.num_wikitext_samples and cfg.task == "lm":
            validate_source(cfg.wikitext_source)
        if cfg.num_pg19_samples and cfg.task == "lm":
            validate_source(cfg.pg19_source)
        if cfg.task in ("passkey", "ruler", "niah"):
            validate_source(cfg.haystack_source)
        records = None
        if cfg.task in QUESTION_TASKS:
            from knormctl.tasks.build import fetch_records

            records = fetch_records(cfg)  # a missing Hub dataset fails here, before the model loads
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                 trust_remote_code=cfg.trust_remote_code, progress=self.progress)
        check_skip_layers(cfg.skip_layers, self.loaded.num_layers)
        self.configs = cfg.press_configs()
        self.samples = load_samples(cfg, self.loaded, self.progress, records)
        self.cells = plan_cells(len(self.samples), self.configs, cfg.shard)
        from knormctl.tasks.scoring import stop_ids

        self.stop_ids = stop_ids(self.loaded.tokenizer, self.loaded.model)

    def start(self, resume_run_id: int | None = None) -> int:
        from knormctl.engine.env import get_environment

        cfg, lm = self.cfg, self.loaded
        self.prior_references = []
        if resume_run_id is not None:
            self.run_id = resume_run_id
            self.prior_references = [s for s in self.store.samples(resume_run_id, with_blobs=True)
                                     if s.config_key == "none" and s.error is None]
            self._check_resume_samples()
            self.store.reopen_run(resume_run_id)  # running again, owned by this process (pid, host, heartbeat)
            return resume_run_id
        env = get_environment(lm.device)
        self.run_id = self.store.create_run(
            command=cfg.command, task=cfg.task, model_requested=cfg.model, config=cfg.to_dict(),
            command_line=shlex.join(["knormctl", *sys.argv[1:]]), env=env, group_name=cfg.group,
            shard=cfg.shard, samples_planned=len(self.cells), dtype=lm.dtype, device=lm.device,
            knormctl_version=__version__, git_commit=env.get("git_commit"))
        self.store.update_run(self.run_id, model_resolved=lm.resolved, model_hash=lm.model_hash)
        return self.run_id

    def _check_resume_samples(self) -> None:
        stored = {s.sample_index: s.text_hash for s in self.store.samples(self.run_id)}
        for i, sample in enumerate(self.samples):
            if i in stored and stored[i] != sample.text_hash:
                raise UsageError(f"cannot resume run {self.run_id}: sample {i} no longer has the same text "
                                 "(the text source or tokenizer changed)")

    def warm_up(self) -> None:
        """Untimed generations first, so no configuration pays for a cold start."""
        from knormctl.engine.loop import run_generation

        planned = list({c.config.key: c.config for c in self.cells}.values())
        # the full cache, plus one compressing configuration to warm the eviction kernels
        warm = [pc for pc in planned if pc.is_baseline][:1] + [pc for pc in planned if not pc.is_baseline][:1]
        for pc in warm:
            ids, question = self._split(self.samples[0])
            run_generation(self.loaded.model, ids, pc, min(4, self._new_tokens(self.samples[0])), question_ids=question)

    def _new_tokens(self, sample) -> int:
        return sample.max_new_tokens if isinstance(sample, QuestionSample) else self.cfg.max_new_tokens

    def _split(self, sample) -> tuple[list[int], list[int] | None]:
        """(ids prefilled and compressed, ids fed after the cut) under the run's protocol."""
        if not isinstance(sample, QuestionSample):
            return sample.prompt_ids, None
        from knormctl.tasks.protocol import split

        return split(sample, self.cfg.protocol)

    def run(self, resume_run_id: int | None = None) -> Outcome:
        run_id = self.start(resume_run_id)
        done_before = self.store.done_cells(run_id) if resume_run_id is not None else set()
        if resume_run_id is not None:
            self.store.delete_failed_cells(run_id)
        out = Outcome(run_id=run_id, status=m.RUNNING, planned=len(self.cells))
        beat = _Heartbeat(self.store, run_id)
        try:
            if self.cfg.warmup:
                self.progress("warm-up (untimed)")
                self.warm_up()
            self._run_cells(out, done_before)
        except KeyboardInterrupt:
            out.status = m.INTERRUPTED
            self.store.finish_run(run_id, m.INTERRUPTED,
                                  error=f"interrupted: {out.done + out.skipped_existing} of {out.planned} cells finished")
            raise
        except BaseException as exc:
            self.store.finish_run(run_id, m.FAILED, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            beat.stop()
        out.status = m.COMPLETE_WITH_ERRORS if out.failed else m.COMPLETE
        self.store.finish_run(run_id, out.status)
        return out

    def _run_cells(self, out: Outcome, done_before: set) -> None:
        from knormctl.engine.loop import run_generation
        from knormctl.engine.quality import context_perplexity

        lm, cfg = self.loaded, self.cfg
        ppl_ctx: dict[int, float] = {}
        outputs: dict[int, dict[str, list[int]]] = {}  # sample -> config key -> generated ids
        for row in self.prior_references:  # a resumed run's finished full-cache outputs
            outputs.setdefault(row.sample_index, {})["none"] = row.generated_ids_json
        for n, cell in enumerate(self.cells):
            i, pc = cell.sample_index, cell.config
            sample = self.samples[i]
            desc = f"sample {i + 1}/{len(self.samples)} {pc.key}"
            if (i, pc.key) in done_before:
                out.skipped_existing += 1
                self.on_cell(n + 1, len(self.cells), desc + " (kept)")
                continue
            try:
                if i not in ppl_ctx and cfg.task == "lm":
                    ppl_ctx[i] = context_perplexity(lm.model, sample.prompt_ids)
                ids, question = self._split(sample)
                res = run_generation(lm.model, ids, pc, self._new_tokens(sample), sampling=cfg.sampling,
                                     temperature=cfg.temperature, seed=cfg.seed + i, tokenizer=lm.tokenizer,
                                     question_ids=question)
                if sample.eval_ids:
                    res.ppl_compressed, res.eval_tokens = self._quality(sample, pc)
                row = sample_fields(sample, pc, res, ppl_ctx.get(i), **self._task_fields(sample, res))
            except (RuntimeError, ValueError, MemoryError) as exc:  # OOM, CUDA errors, a failing press
                if os.environ.get("KNORMCTL_DEBUG"):
                    traceback.print_exc()
                row = sample_fields(sample, pc, None, ppl_ctx.get(i), error=f"{type(exc).__name__}: {exc}",
                                    **self._task_fields(sample, None))
                out.failed += 1
                res = None
            self.store.add_sample(self.run_id, sample_index=i, **row)
            if res is not None:
                out.done += 1
                outs = outputs.setdefault(i, {})
                outs[pc.key] = res.token_ids
                self._update_token_match(i, outs, pc.key)
            self.on_cell(n + 1, len(self.cells), desc)

    def _task_fields(self, sample, res) -> dict:
        """protocol and scored answer for a question sample (nothing for an lm sample)."""
        if not isinstance(sample, QuestionSample):
            return {}
        from knormctl.tasks.scoring import answer_text

        answer = None if res is None else answer_text(res.token_ids, self.loaded.tokenizer, self.stop_ids)
        return {"protocol": self.cfg.protocol, "answer": answer}

    def _quality(self, sample, pc: PressConfig) -> tuple[float | None, int]:
        """ppl_compressed and how many tokens it scored, by the configured method."""
        from knormctl.engine.quality import compressed_perplexity, stream_perplexity

        if self.cfg.ppl_method == "stream":
            chunk = sample.prompt_ids + sample.eval_ids
            skip = self.cfg.prune_after if self.cfg.ppl_skip is None else self.cfg.ppl_skip
            return stream_perplexity(self.loaded.model, chunk, pc, skip), max(0, len(chunk) - 1 - skip)
        return compressed_perplexity(self.loaded.model, sample.prompt_ids, sample.eval_ids, pc), len(sample.eval_ids)

    def _update_token_match(self, i: int, outs: dict[str, list[int]], new_key: str) -> None:
        """Compare with the full-cache output of the same sample, whichever finished first."""
        ref = outs.get("none")
        if ref is None:
            return
        keys = outs if new_key == "none" else [new_key]
        self.store.set_token_match(self.run_id, i, {k: token_match(outs[k], ref) for k in keys})
