"""`knormctl sweep`: the same samples under every press x keep_ratio, with the full-cache reference."""

from __future__ import annotations

import typer

from knormctl.cli import _common as o
from knormctl.cli import _task_options as t


def sweep(
    ctx: typer.Context,
    presses: o.PressesOpt = "knorm",
    keep_ratios: o.KeepRatiosOpt = "1.0,0.9,0.8,0.7",
    prune_after: o.PruneAfterOpt = 512,
    skip_layers: o.SkipLayersOpt = "0",
    compress_mode: o.CompressModeOpt = None,
    keep_recent: o.KeepRecentOpt = 0,
    n_sink: o.NSinkOpt = 4,
    prefill_chunk: o.PrefillChunkOpt = 0,
    decode_step: o.DecodeStepOpt = "launched",
    task: t.TaskOpt = "lm",
    protocol: t.ProtocolOpt = "context",
    chat_template: t.ChatTemplateOpt = "auto",
    context_lengths: t.ContextLengthsOpt = None,
    needle_depths: t.NeedleDepthsOpt = "0,0.25,0.5,0.75,1",
    subtasks: t.SubtasksOpt = None,
    samples_per_task: t.SamplesPerTaskOpt = None,
    answer_tokens: t.AnswerTokensOpt = None,
    passkey_lengths: t.PasskeyLengthsOpt = "1024,2048",
    passkey_depths: t.PasskeyDepthsOpt = "0.1,0.5,0.9",
    passkey_seeds: t.PasskeySeedsOpt = 2,
    max_new_tokens: o.MaxNewOpt = 100,
    eval_tokens: o.EvalTokOpt = 128,
    ppl_method: o.PplMethodOpt = "teacher-forced",
    ppl_skip: o.PplSkipOpt = None,
    sample: o.SampleOpt = False,
    temperature: o.TempOpt = 1.0,
    warmup: o.NoWarmupOpt = True,
    haystack: t.HaystackOpt = None,
    ruler_source: t.RulerSourceOpt = "generated",
    hub_dataset: t.HubDatasetOpt = None,
    num_wikitext_samples: o.NumWikiOpt = 3,
    num_pg19_samples: o.NumPg19Opt = 2,
    wikitext_source: o.WikiSrcOpt = "wiki-lite",
    pg19_source: o.Pg19SrcOpt = "wiki-lite-long",
    wikitext_prompt_tokens: o.WikiTokOpt = 1024,
    max_prompt_tokens: o.MaxPromptOpt = 2048,
    seed: o.SeedOpt = 0,
    model: o.ModelOpt = "smollm2-135m",
    device: o.DeviceOpt = "auto",
    device_map: o.DeviceMapOpt = None,
    dtype: o.DtypeOpt = "float32",
    threads: o.ThreadsOpt = None,
    trust_remote_code: o.TrustOpt = False,
    db: o.DbOpt = None,
    config: o.ConfigOpt = None,
    dry_run: o.DryRunOpt = False,
    resume: o.ResumeOpt = None,
    repeats: o.RepeatsOpt = 1,
    batch_size: o.BatchSizeOpt = 1,
    resume_group: o.ResumeGroupOpt = None,
    group: o.GroupOpt = None,
    shard: o.ShardOpt = None,
    json_out: o.JsonOpt = False,
    verbose: o.VerboseOpt = False,
) -> None:
    """Measure the same samples under compression: every press x keep_ratio, plus the full cache."""
    from knormctl.cli._execute import run_benchmark
    from knormctl.options import parse_float_list, parse_int_list, parse_name_list
    from knormctl.press_spec import parse_press_list

    with o.error_boundary():
        if resume_group is not None:
            from knormctl.cli._study import resume_study

            resume_study(ctx, resume_group, db, json_out=json_out, verbose=verbose, dry_run=dry_run)
            return
        if resume is not None:
            from knormctl.cli._resume import refuse_options_given_with_resume

            refuse_options_given_with_resume(ctx, resume)
            run_benchmark(None, db, json_out=json_out, resume=resume, verbose=verbose)
            return
        cfg = o.run_config(
            "sweep", locals(), validate=config is None, keep_ratios=parse_float_list(keep_ratios, "--keep-ratios"),
            skip_layers=parse_int_list(skip_layers, "--skip-layers", allow_empty=True),
            presses=parse_press_list(presses),
            compress_mode=compress_mode,  # None: the task's default (RunConfig.validate)
            passkey_lengths=parse_int_list(passkey_lengths, "--passkey-lengths"),
            passkey_depths=parse_float_list(passkey_depths, "--passkey-depths"),
            context_lengths=None if context_lengths is None else parse_int_list(context_lengths, "--context-lengths"),
            needle_depths=parse_float_list(needle_depths, "--needle-depths"),
            subtasks=None if subtasks is None else parse_name_list(subtasks, "--subtasks", None))
        if config is None:  # a study file's tasks may differ by run: its own rules apply there
            from knormctl.cli._study import given_options
            from knormctl.config import refuse_options_of_other_tasks

            refuse_options_of_other_tasks(cfg.task, given_options(ctx))
        if config is not None or dry_run:
            from knormctl.cli._study import study_command

            study_command(ctx, cfg, config, db, group=group, json_out=json_out, verbose=verbose, dry_run=dry_run)
            return
        run_benchmark(cfg, db, json_out=json_out, verbose=verbose)
