"""The knormctl command line: every subcommand is registered here, one module each.

Command modules import only typer at module level; the engine (torch) and the store
are imported inside the command bodies so ``knormctl --help`` starts fast.
"""

from __future__ import annotations

import sys

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

from knormctl.cli import baseline, plot, presses, report, sweep


class OneLineErrors(TyperGroup):
    """Usage errors (a bad choice, an out-of-range number, an unknown option) as ONE line on
    stderr with exit code 2, like knormctl's own errors -- not a framed help panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError:  # bare `knormctl`: show the help as usual
            return super().main(args, prog_name, complete_var, True, **extra)
        except ClickException as exc:
            print(f"Error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="knormctl",
    help="Benchmark KV-cache compression (KnormPress and controls) in causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("baseline")(baseline.baseline)
app.command("sweep")(sweep.sweep)
app.command("report")(report.report)
app.command("plot")(plot.plot)
app.command("presses")(presses.presses)


def main() -> None:
    app()
