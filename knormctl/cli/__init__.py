"""The knormctl command line: every subcommand is registered here, one module each.

Command modules import only typer at module level; the engine (torch) and the store
are imported inside the command bodies so ``knormctl --help`` starts fast.
"""

from __future__ import annotations

import typer

from knormctl.cli import baseline, capacity, export, importing, plot, presses, report, runs, sweep
from knormctl.cli._common import PanelCommand, PlainCommand
from knormctl.cli._group import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    name="knormctl",
    help="Benchmark KV-cache compression (KnormPress and controls) in causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("baseline", cls=PanelCommand)(baseline.baseline)
app.command("sweep", cls=PanelCommand)(sweep.sweep)
app.command("report", cls=PlainCommand)(report.report)
app.command("plot", cls=PlainCommand)(plot.plot)
app.command("export", cls=PlainCommand)(export.export)
app.command("import", cls=PlainCommand)(importing.import_results)
app.add_typer(runs.app, name="runs")
app.command("presses", cls=PlainCommand)(presses.presses)
app.command("capacity", cls=PlainCommand)(capacity.capacity)


def main() -> None:
    app()
