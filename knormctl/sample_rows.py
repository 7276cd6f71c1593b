"""The run's samples: cut from their text source (or a question task's prompts) within the
model's context, and each measured cell as the row the store keeps."""

from __future__ import annotations

from collections.abc import Callable

from knormctl.config import PressConfig, RunConfig
from knormctl.errors import UsageError
from knormctl.tasks.catalog import QUESTION_TASKS
from knormctl.tasks.prompt import QuestionSample


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


def config_columns(pc: PressConfig) -> dict:
    """A configuration as every stored cell of it records it (what the report labels it by)."""
    return dict(config_key=pc.key, press=pc.spec, keep_ratio=pc.keep_ratio, prune_after=pc.prune_after,
                skip_layers=",".join(map(str, pc.skip_layers)), compress_mode=pc.mode, keep_recent=pc.keep_recent)


def config_labels(configs: list[PressConfig]) -> dict[str, str]:
    """Each configuration's label as the report prints it ('knorm 0.5', 'snapkv 0.5 pa=64' where
    prune_after varies), for progress lines: the report's own rule on the columns cells store."""
    from types import SimpleNamespace

    from knormctl.render.rows import labels_for

    return labels_for({pc.key: SimpleNamespace(**config_columns(pc)) for pc in configs})


def sample_fields(sample, pc: PressConfig, res=None, ppl_context=None, error: str | None = None, *,
                  protocol: str | None = None, answer: str | None = None, repeat: int = 0) -> dict:
    """The store row for one cell (``res`` is a GenerationResult, or None when it failed).

    Question samples also get their task columns; ``answer`` is the generated text as
    scored (up to the first EOS), ``protocol`` what was compressed.
    """
    row = dict(
        task="lm", repeat=repeat, dataset=sample.dataset, doc_id=str(sample.doc_id), doc_title=sample.doc_title,
        char_offset=sample.char_offset, text_hash=sample.text_hash, prompt_tokens=len(sample.prompt_ids),
        **config_columns(pc), ppl_context=ppl_context, error=error,
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
