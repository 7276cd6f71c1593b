"""`knormctl baseline`: generation with the full cache, through the same engine as sweep."""

from __future__ import annotations

from knormctl.cli import _common as o


def baseline(
    prefill_chunk: o.PrefillChunkOpt = 0,
    decode_step: o.DecodeStepOpt = "launched",
    max_new_tokens: o.MaxNewOpt = 100,
    eval_tokens: o.EvalTokOpt = 128,
    sample: o.SampleOpt = False,
    temperature: o.TempOpt = 1.0,
    warmup: o.NoWarmupOpt = True,
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
    repeats: o.RepeatsOpt = 1,
    batch_size: o.BatchSizeOpt = 1,
    group: o.GroupOpt = None,
    shard: o.ShardOpt = None,
    json_out: o.JsonOpt = False,
    verbose: o.VerboseOpt = False,
) -> None:
    """Measure generation with the full KV cache (the reference every press is compared with)."""
    from knormctl.cli._execute import run_benchmark

    with o.error_boundary():
        run_benchmark(o.run_config("baseline", locals()), db, json_out=json_out, verbose=verbose)
