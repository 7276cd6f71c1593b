"""`knormctl sweep`: the same samples under every press x keep_ratio, with the full-cache reference."""

from __future__ import annotations

from typing import Annotated

import typer

from knormctl.cli import _common as o
from knormctl.cli import _task_options as t


def sweep(
    keep_ratios: Annotated[str, typer.Option("--keep-ratios", "--keep_ratios", help="Comma-separated, each in (0, 1].")] = "1.0,0.9,0.8,0.7",
    prune_after: Annotated[int, typer.Option("--prune-after", "--prune_after", help="Cache budget: a layer is cut only when it holds more entries.")] = 512,
    skip_layers: Annotated[str, typer.Option("--skip-layers", "--skip_layers", help="Layers never compressed ('' or none: no layer skipped).")] = "0",
    presses: Annotated[str, typer.Option("--presses", help="Comma-separated: knorm, knorm-inverse, random, streaming.")] = "knorm",
    compress_mode: Annotated[str | None, typer.Option("--compress-mode", "--compress_mode", help="decode: cut after every forward; prefill: once after the prefill. Default: decode (lm), prefill (question tasks).")] = None,
    keep_recent: Annotated[int, typer.Option("--keep-recent", help="Newest entries never evicted (0 = the paper's rule).")] = 0,
    n_sink: Annotated[int, typer.Option("--n-sink", help="streaming press: sink entries always kept.")] = 4,
    task: t.TaskOpt = "lm",
    protocol: t.ProtocolOpt = "context",
    chat_template: t.ChatTemplateOpt = "auto",
    context_lengths: t.ContextLengthsOpt = None,
    needle_depths: t.NeedleDepthsOpt = "0,0.25,0.5,0.75,1",
    subtasks: t.SubtasksOpt = None,
    samples_per_task: t.SamplesPerTaskOpt = None,
    haystack: t.HaystackOpt = None,
    ruler_source: t.RulerSourceOpt = "generated",
    hub_dataset: t.HubDatasetOpt = None,
    answer_tokens: t.AnswerTokensOpt = None,
    passkey_lengths: t.PasskeyLengthsOpt = "1024,2048",
    passkey_depths: t.PasskeyDepthsOpt = "0.1,0.5,0.9",
    passkey_seeds: t.PasskeySeedsOpt = 2,
    ppl_method: Annotated[str, typer.Option("--ppl-method", help="teacher-forced: prefill the prompt, score --eval-tokens one at a time; stream: feed prompt + eval tokens one at a time from the start (the original l2compress evaluation; slow).")] = "teacher-forced",
    ppl_skip: Annotated[int | None, typer.Option("--ppl-skip", help="stream: leading tokens not scored (default: --prune-after, where compression starts).")] = None,
    resume: Annotated[int | None, typer.Option("--resume", help="Finish the missing cells of an interrupted run (same config).")] = None,
    model: o.ModelOpt = "smollm2-135m",
    num_wikitext_samples: o.NumWikiOpt = 3,
    num_pg19_samples: o.NumPg19Opt = 2,
    max_new_tokens: o.MaxNewOpt = 100,
    wikitext_source: o.WikiSrcOpt = "wiki-lite",
    pg19_source: o.Pg19SrcOpt = "wiki-lite-long",
    wikitext_prompt_tokens: o.WikiTokOpt = 1024,
    max_prompt_tokens: o.MaxPromptOpt = 2048,
    eval_tokens: o.EvalTokOpt = 128,
    device: o.DeviceOpt = "auto",
    dtype: o.DtypeOpt = "float32",
    threads: o.ThreadsOpt = None,
    seed: o.SeedOpt = 0,
    sample: o.SampleOpt = False,
    temperature: o.TempOpt = 1.0,
    trust_remote_code: o.TrustOpt = False,
    warmup: o.NoWarmupOpt = True,
    group: o.GroupOpt = None,
    shard: o.ShardOpt = None,
    json_out: o.JsonOpt = False,
    db: o.DbOpt = None,
) -> None:
    """Measure the same samples under compression: every press x keep_ratio, plus the full cache."""
    from knormctl.cli._execute import run_benchmark
    from knormctl.config import PRESS_NAMES, parse_float_list, parse_int_list, parse_name_list

    with o.error_boundary():
        if resume is not None:
            run_benchmark(None, db, json_out=json_out, resume=resume)
            return
        cfg = o.run_config(
            "sweep", locals(), keep_ratios=parse_float_list(keep_ratios, "--keep-ratios"),
            skip_layers=parse_int_list(skip_layers, "--skip-layers", allow_empty=True),
            presses=parse_name_list(presses, "--presses", PRESS_NAMES),
            compress_mode=compress_mode or ("decode" if task == "lm" else "prefill"),
            passkey_lengths=parse_int_list(passkey_lengths, "--passkey-lengths"),
            passkey_depths=parse_float_list(passkey_depths, "--passkey-depths"),
            context_lengths=None if context_lengths is None else parse_int_list(context_lengths, "--context-lengths"),
            needle_depths=parse_float_list(needle_depths, "--needle-depths"),
            subtasks=None if subtasks is None else parse_name_list(subtasks, "--subtasks", None))
        run_benchmark(cfg, db, json_out=json_out)
