"""What may be given together with `sweep --resume N`.

A resumed run continues with the configuration stored with it: an option that would
change what is measured (--model, --keep-ratios, --device, ...) cannot apply to cells
already measured, so it is refused rather than silently ignored. Only the options that
say where the run is and how to print the summary apply.
"""

from __future__ import annotations

import typer

from knormctl.errors import UsageError

APPLY_WITH_RESUME = ("resume", "db", "json_out", "verbose")  # --resume, --db, --json, --verbose


def refuse_options_given_with_resume(ctx: typer.Context, run_id: int) -> None:
    """One line naming every other option given on the command line (or by the environment)."""
    given = []
    for param in ctx.command.params:
        if param.name in APPLY_WITH_RESUME:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name != "DEFAULT":  # COMMANDLINE, ENVIRONMENT, DEFAULT_MAP, PROMPT
            given.append(param.opts[0] if param.opts else param.name)
    if given:
        raise UsageError(f"--resume {run_id} continues the run with its stored configuration; "
                         f"{', '.join(given)} cannot change it (only --db, --json and --verbose may be given with --resume)")
