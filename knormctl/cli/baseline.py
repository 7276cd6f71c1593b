"""`knormctl baseline`: generation with the full cache, through the same engine as sweep."""

from __future__ import annotations

from knormctl.cli import _common as o


def baseline(
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
    repeats: o.RepeatsOpt = 1,
    group: o.GroupOpt = None,
    shard: o.ShardOpt = None,
    json_out: o.JsonOpt = False,
    db: o.DbOpt = None,
) -> None:
    """Measure generation with the full KV cache (the reference every press is compared with)."""
    from knormctl.cli._execute import run_benchmark

    with o.error_boundary():
        run_benchmark(o.run_config("baseline", locals()), db, json_out=json_out)
