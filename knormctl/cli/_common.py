"""Shared CLI plumbing: option aliases, the error boundary, stderr console."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from knormctl.errors import KnormctlError

DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="Results database: a path or SQLAlchemy URL (default: $KNORMCTL_DB, else a file in the user data dir)."),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear line on stderr; return the Exit to raise."""
    print(f"Error: {message}", file=sys.stderr)
    return typer.Exit(code)


@contextlib.contextmanager
def error_boundary() -> Iterator[None]:
    """Turn knormctl's own errors into one line on stderr and the right exit code."""
    try:
        yield
    except KnormctlError as exc:
        raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code) from None


# Options shared by `baseline` and `sweep` (the old scripts' underscore spellings are aliases).
ModelOpt = Annotated[str, typer.Option("--model", help="Hub id, local folder, .gguf file, or the offline alias smollm2-135m.")]
NumWikiOpt = Annotated[int, typer.Option("--num-wikitext-samples", "--num_wikitext_samples", help="Short (wikitext-like) samples.")]
NumPg19Opt = Annotated[int, typer.Option("--num-pg19-samples", "--num_pg19_samples", help="Long-text (pg19-like) samples.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "--max_new_tokens", help="Tokens generated per sample (EOS does not stop).")]
WikiSrcOpt = Annotated[str, typer.Option("--wikitext-source", help="wiki-lite (offline), wikitext (Hub), or text:PATH.")]
Pg19SrcOpt = Annotated[str, typer.Option("--pg19-source", help="wiki-lite-long (offline: the longest wiki-lite articles), pg19 (Hub), or text:PATH.")]
WikiTokOpt = Annotated[int, typer.Option("--wikitext-prompt-tokens", help="Prompt tokens of the short samples.")]
MaxPromptOpt = Annotated[int, typer.Option("--max-prompt-tokens", "--max_prompt_tokens", help="Prompt tokens of the long samples (capped by the model's context).")]
EvalTokOpt = Annotated[int, typer.Option("--eval-tokens", help="Tokens after the prompt scored teacher-forced for ppl_compressed (0: skip).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Chooses the samples (and seeds sampling / the random press).")]
SampleOpt = Annotated[bool, typer.Option("--sample/--greedy", help="Sample tokens (seeded) instead of greedy decoding.")]
TempOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature (with --sample).")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the Hub (off unless you ask).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the run id and summary as JSON on stdout.")]
NoWarmupOpt = Annotated[bool, typer.Option("--warmup/--no-warmup", help="Untimed warm-up generations before the timed ones.")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", help="Measure every (sample x configuration) cell this many rounds; report compares the rounds.")]
GroupOpt = Annotated[str | None, typer.Option("--group", help="Tag runs that belong together (e.g. the shards of one sweep).")]
ShardOpt = Annotated[str | None, typer.Option("--shard", help="Run shard I/N of the (sample x configuration) cells, e.g. 1/4.")]


def run_config(command: str, options: dict, **parsed):
    """The validated RunConfig of a `baseline`/`sweep` call: every option that names a
    RunConfig field is taken as is; ``parsed`` holds the list options after parsing."""
    from dataclasses import fields

    from knormctl.config import RunConfig

    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in options.items() if k in names}
    values["sampling"] = options["sample"]  # --sample/--greedy
    return RunConfig(command=command, **{**values, **parsed}).validate()
