"""Shared CLI plumbing: option aliases (grouped into help panels), the error boundary.

Every option of `baseline` and `sweep` is declared here once, as an ``Annotated`` alias
with its help panel, so the command modules stay a list of parameters. Conventions the
error hints in ``cli/__init__.py`` rely on:

- an option that takes a comma-separated list has ``metavar=LIST`` (a value given with
  spaces instead of commas then gets "separate with commas" as its hint);
- names are spelled with dashes only; the old scripts' underscore spellings
  (``--keep_ratios``) are rewritten to dashes before parsing, so they work without
  doubling every name in ``--help``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from knormctl.errors import KnormctlError

# Help panels: `sweep --help` has ~35 options; grouped by the question a user has in mind.
COMPRESS = "What to compress"
MEASURE = "What to measure"
DATA = "Data"
MODEL = "Model and device"
OUTPUT = "Output and store"

LIST = "LIST"  # metavar of every comma-separated list option (see the module docstring)
FLAG = ""  # metavar of on/off flags: the type column would only say <bool>


class PlainCommand(TyperCommand):
    """--help says nothing in the type column of an on/off flag (it would say <bool>), as sweep's
    options do; the other options name what they take with ``metavar=`` where declared."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = FLAG

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = FLAG
        return option


class PlainGroup(TyperGroup):
    """A command group whose --help row says nothing in its type column (it said <bool>)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = FLAG
        return option


class PanelCommand(PlainCommand):
    """A command whose options all sit in panels: --help joins the last one, so no box holding
    only --help heads the page."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.rich_help_panel = OUTPUT
        return option


def _opt(*names: str, panel: str, help: str, metavar: str | None = None):  # noqa: A002 -- typer's name
    return typer.Option(*names, help=help, rich_help_panel=panel, metavar=metavar)


def _not_empty(instead: str):
    """A callback refusing an empty value (what `--db "$UNSET"` passes): it would silently mean
    something else (the default database; a group named '')."""
    def check(value):
        if value is not None and not str(value).strip():
            raise typer.BadParameter(f"empty ({instead})")
        return value
    return check


def nonempty_path(value) -> Path:
    """A typer ``parser`` for path parameters: ``Path("")`` is the current folder, so an empty
    value (``-o "$UNSET"``) would silently write figures or a file there; it is refused."""
    if not str(value).strip():
        raise typer.BadParameter("empty (give a path)")
    return Path(value)


DbOpt = Annotated[
    str | None,
    typer.Option("--db", metavar="PATH|URL", rich_help_panel=OUTPUT,
                 callback=_not_empty("leave it out for $KNORMCTL_DB or the default database"),
                 help="Results database: a path or SQLAlchemy URL (default: $KNORMCTL_DB, else a file in the "
                      "user data dir)."),
]


def say_error(message: str) -> None:
    """``Error: message`` on stderr: one line into a file or pipe (a log is read with grep); on a
    terminal wrapped at its width between words, continued under the message (the terminal
    itself broke a long one mid-word)."""
    import shutil

    text = f"Error: {message}"
    if sys.stderr.isatty():
        text = fill(text, shutil.get_terminal_size((80, 24)).columns, hang=" " * 7)
    print(text, file=sys.stderr)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear line on stderr; return the Exit to raise."""
    say_error(message)
    return typer.Exit(code)


@contextlib.contextmanager
def error_boundary() -> Iterator[None]:
    """Turn knormctl's own errors into one line on stderr and the right exit code."""
    try:
        yield
    except KnormctlError as exc:
        raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code) from None


def fill(text: str, width: int, indent: str = "", hang: str = "") -> str:
    """``text`` wrapped at ``width`` between words only (a spec's parameters, a path stay whole)."""
    import textwrap

    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=hang, break_long_words=False,
                         break_on_hyphens=False)


def on_terminal(text: str, stream=None) -> str:
    """``text`` wrapped between words to the terminal's width when ``stream`` (stdout) is one;
    unchanged into a pipe or file, where a line stays whole for grep."""
    import shutil
    import sys

    stream = stream or sys.stdout
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return text
    return fill(text, shutil.get_terminal_size((80, 24)).columns, hang="    ")


def wrapped(text: str, indent: str = "", hang: str = "    ") -> str:
    """``text`` wrapped to the terminal's width: 80 when not a terminal, at most 100."""
    import shutil

    return fill(text, min(shutil.get_terminal_size((80, 24)).columns, 100), indent, hang)


# --- what to compress (sweep) ----------------------------------------------------------
PressesOpt = Annotated[str, _opt("--presses", panel=COMPRESS, metavar=LIST,
                                 help="Press specs, comma-separated, e.g. knorm,snapkv(window_size=32); "
                                      "all: every press that supports the mode (knormctl presses lists them).")]
KeepRatiosOpt = Annotated[str, _opt("--keep-ratios", panel=COMPRESS, metavar=LIST,
                                    help="Fractions of the cache kept, comma-separated, each in (0, 1].")]
PruneAfterOpt = Annotated[int, _opt("--prune-after", panel=COMPRESS, metavar="N",
                                    help="Cache budget: a layer is cut only when it holds more entries.")]
SkipLayersOpt = Annotated[str, _opt("--skip-layers", panel=COMPRESS, metavar=LIST,
                                    help="Layers never compressed ('' or none: every layer is).")]
CompressModeOpt = Annotated[str | None, _opt(
    "--compress-mode", panel=COMPRESS, metavar="MODE",
    help="decode: cut after every forward; prefill: once after the prefill. Default: decode (lm), "
         "prefill (the question tasks).")]
KeepRecentOpt = Annotated[int, _opt("--keep-recent", panel=COMPRESS, metavar="N",
                                    help="Newest entries never evicted (0: the paper's rule).")]
NSinkOpt = Annotated[int, _opt("--n-sink", panel=COMPRESS, metavar="N",
                               help="Sink entries always kept by the presses that keep sinks (streaming, "
                                    "expected-attention).")]

PrefillChunkOpt = Annotated[int, _opt("--prefill-chunk", panel=COMPRESS, metavar="N",
                                      help="Prefill the prompt N tokens at a time, the press cutting after each "
                                           "chunk, so the cache never holds more than its budget plus one chunk "
                                           "(0: one forward).")]

# --- what to measure -------------------------------------------------------------------
MaxNewOpt = Annotated[int, _opt("--max-new-tokens", panel=MEASURE, metavar="N",
                                help="Tokens generated per sample (EOS does not stop).")]
EvalTokOpt = Annotated[int, _opt("--eval-tokens", panel=MEASURE, metavar="N",
                                 help="Tokens after the prompt scored for ppl_compressed (0: skip).")]
PplMethodOpt = Annotated[str, _opt(
    "--ppl-method", panel=MEASURE, metavar="METHOD",
    help="teacher-forced: prefill the prompt, score --eval-tokens one at a time; stream: feed "
         "prompt + eval tokens one at a time (the original l2compress evaluation; slow).")]
PplSkipOpt = Annotated[int | None, _opt("--ppl-skip", panel=MEASURE, metavar="N",
                                        help="stream: leading tokens not scored (default: --prune-after).")]
SampleOpt = Annotated[bool, _opt("--sample/--greedy", panel=MEASURE, metavar=FLAG,
                                 help="Sample tokens (seeded) instead of greedy decoding.")]
TempOpt = Annotated[float, _opt("--temperature", panel=MEASURE, metavar="T",
                                help="Sampling temperature (with --sample).")]
NoWarmupOpt = Annotated[bool, _opt("--warmup/--no-warmup", panel=MEASURE, metavar=FLAG,
                                   help="Untimed generations before the timed ones.")]
DecodeStepOpt = Annotated[str, _opt("--decode-step", panel=MEASURE, metavar="HOW",
                                    help="launched (the model's attention), static (fixed shapes, knormctl's "
                                         "grouped attention) or graph (static, replayed from a CUDA graph).")]
BatchSizeOpt = Annotated[int, _opt("--batch-size", panel=MEASURE, metavar="B",
                                   help="Generate B samples of equal prompt length together (one batch, one "
                                        "press); each is stored as its own row, with the batch's timing.")]
RepeatsOpt = Annotated[int, _opt("--repeats", panel=MEASURE, metavar="R",
                                 help="Measure every (sample x configuration) cell R rounds; the report "
                                      "compares the rounds.")]

# --- data ------------------------------------------------------------------------------
NumWikiOpt = Annotated[int, _opt("--num-wikitext-samples", panel=DATA, metavar="N",
                                 help="Short (wikitext-like) samples.")]
NumPg19Opt = Annotated[int, _opt("--num-pg19-samples", panel=DATA, metavar="N",
                                 help="Long-text (pg19-like) samples.")]
WikiSrcOpt = Annotated[str, _opt("--wikitext-source", panel=DATA, metavar="SOURCE",
                                 help="wiki-lite (offline), wikitext (Hub), or text:PATH.")]
Pg19SrcOpt = Annotated[str, _opt("--pg19-source", panel=DATA, metavar="SOURCE",
                                 help="wiki-lite-long (offline: the longest wiki-lite articles), pg19 (Hub), "
                                      "or text:PATH.")]
WikiTokOpt = Annotated[int, _opt("--wikitext-prompt-tokens", panel=DATA, metavar="N",
                                 help="Prompt tokens of the short samples.")]
MaxPromptOpt = Annotated[int, _opt("--max-prompt-tokens", panel=DATA, metavar="N",
                                   help="Prompt tokens of the long samples (capped by the model's context).")]
SeedOpt = Annotated[int, _opt("--seed", panel=DATA, metavar="N",
                              help="Chooses the samples (and seeds sampling / the random press).")]

# --- model and device ------------------------------------------------------------------
ModelOpt = Annotated[str, _opt("--model", panel=MODEL, metavar="NAME",
                               help="Hub id, local folder, .gguf file, or the offline alias smollm2-135m.")]
DeviceOpt = Annotated[str, _opt("--device", panel=MODEL, metavar="DEV", help="auto, cpu, cuda[:N] or mps.")]
DeviceMapOpt = Annotated[str | None, _opt("--device-map", panel=MODEL, metavar="HOW",
                                          help="Spread a model too large for one GPU over all of them "
                                               "(accelerate): auto, balanced, balanced_low_0 or sequential.")]
DtypeOpt = Annotated[str, _opt("--dtype", panel=MODEL, metavar="DTYPE", help="float32, bfloat16 or float16.")]
ThreadsOpt = Annotated[int | None, _opt("--threads", panel=MODEL, metavar="N",
                                        help="torch CPU threads (default: torch's choice).")]
TrustOpt = Annotated[bool, _opt("--trust-remote-code", panel=MODEL, metavar=FLAG,
                                help="Allow model code from the Hub (off unless you ask).")]

# --- output and store ------------------------------------------------------------------
JsonOpt = Annotated[bool, _opt("--json", panel=OUTPUT, metavar=FLAG,
                               help="Print the run id and summary as JSON on stdout.")]
GroupOpt = Annotated[str | None, typer.Option("--group", metavar="NAME", rich_help_panel=OUTPUT,
                                              callback=_not_empty("give a name, or leave it out"),
                                              help="Tag runs that belong together (e.g. the shards of one "
                                                   "sweep).")]
ShardOpt = Annotated[str | None, _opt("--shard", panel=OUTPUT, metavar="I/N",
                                      help="Run shard I/N of the samples (whole prompts, every configuration), "
                                           "e.g. 1/4; auto: from a Slurm job array or torchrun.")]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", rich_help_panel=OUTPUT, metavar="FILE", callback=_not_empty("give a study file"),
    help="A study file (TOML): its keys are these options in snake_case; a list of values is an axis; runs the "
         "cross product as one group. Options given here override the file.")]
DryRunOpt = Annotated[bool, _opt("--dry-run", panel=OUTPUT, metavar=FLAG,
                                 help="Print the planned runs, their cells and a time estimate from stored runs; "
                                      "run nothing, load no model.")]
ResumeGroupOpt = Annotated[str | None, _opt("--resume-group", panel=OUTPUT, metavar="NAME",
                                            help="Continue the study stored in group NAME (complete runs are "
                                                 "kept).")]
ResumeOpt = Annotated[int | None, _opt("--resume", panel=OUTPUT, metavar="RUN",
                                       help="Finish the missing cells of an interrupted run with its stored "
                                            "configuration (only --db, --json and --verbose may "
                                            "be given with it; other options are refused).")]
VerboseOpt = Annotated[bool, _opt("--verbose", "-v", panel=OUTPUT, metavar=FLAG,
                                  help="Log lines with their source location; tracebacks for unexpected "
                                       "errors.")]


def run_config(command: str, options: dict, *, validate: bool = True, **parsed):
    """The validated RunConfig of a `baseline`/`sweep` call: every option that names a
    RunConfig field is taken as is; ``parsed`` holds the list options after parsing.
    ``validate=False``: the options override a study file's runs, each validated there with its
    own task (checked here at the default task, niah's --context-lengths was refused)."""
    from dataclasses import fields

    from knormctl.config import RunConfig

    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in options.items() if k in names}
    values["sampling"] = options["sample"]  # --sample/--greedy
    cfg = RunConfig(command=command, **{**values, **parsed})
    return cfg.validate() if validate else cfg


def db_arg(db: str | None) -> str:
    """' --db PATH' for a command a message suggests, when the user named a database (without it
    the suggestion would act on the default database, another one)."""
    import shlex

    from knormctl.store.locations import hide_password

    return f" --db {shlex.quote(hide_password(str(db)))}" if db else ""


def check_db_exists(db: str | None) -> None:
    """The database a command continues or changes must hold knormctl's results: a typo must not
    create an empty SQLite file, nor knormctl's tables in another PostgreSQL database."""
    from sqlalchemy import inspect

    from knormctl.errors import UsageError
    from knormctl.store import open_store, to_url
    from knormctl.store.locations import parse_url, sqlite_file

    path = sqlite_file(parse_url(to_url(db)))
    if path is not None:
        if not path.exists():
            raise UsageError(f"{path} does not exist")
        if path.is_file() and path.stat().st_size == 0:  # SQLite would write knormctl's tables into it
            raise UsageError(f"{path} holds no knormctl results (an empty file)")
        return
    with open_store(db, migrate=False) as store:  # a server: connecting creates nothing
        with store.engine.connect() as conn:
            if not inspect(conn).has_table("runs"):
                raise UsageError(f"{store.url} holds no knormctl results (no runs table)")
