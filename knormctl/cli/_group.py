"""The command group's first and last word: argument spelling before parsing, and every
error as ONE line on stderr with the right exit code.

Exit codes: 2 bad input (Typer's usage errors, knormctl's UsageError), 1 a runtime
failure (including an unexpected exception: one line, the traceback only with --verbose
or KNORMCTL_DEBUG=1), 130 interrupted (143 by SIGTERM: cli/_signals).
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from typer._click.exceptions import ClickException, NoArgsIsHelpError, NoSuchOption
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperGroup
from typer.exceptions import Abort

from knormctl.cli import _signals
from knormctl.cli._common import FLAG, LIST, say_error

_EXTRA = re.compile(r"Got unexpected extra arguments?(?:\(s\))? \((.*)\)")
# Typer converts values with pydantic, whose wording reads like a Python error
_PYDANTIC = re.compile(r"Input should be a valid (integer|number|boolean)(?:, [^.]*)?\.?")
_KIND = {"integer": "an integer", "number": "a number", "boolean": "true or false"}


def dashed(args: list[str], known: set[str]) -> list[str]:
    """``--keep_ratios 0.9`` -> ``--keep-ratios 0.9`` where the dashed name is an option.

    The old scripts spelled options with underscores; rewriting them here keeps them
    working without listing every name twice in ``--help``.
    """
    out = []
    for i, arg in enumerate(args):
        if arg == "--":  # everything after it is positional
            return out + args[i:]
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "_" in name and name.replace("_", "-") in known:
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def extra_args_hint(extras: list[str], args: list[str], list_options: set[str]) -> str:
    """The message for values Typer found no option for; when they follow a list option's
    value (``--keep-ratios 0.9 0.5``), show the comma-separated spelling."""
    shown = " ".join(extras)
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name not in list_options:
            continue
        values = [value] if eq else args[i + 1:i + 2]
        j = i + 1 if eq else i + 2
        rest = []
        while j < len(args) and not args[j].startswith("--"):
            rest.append(args[j])
            j += 1
        if rest and rest[0] == extras[0]:
            joined = ",".join(v.strip(",") for v in values + rest if v.strip(","))
            return (f"unexpected extra argument(s) {shown}: {name} takes one comma-separated list "
                    f"(separate with commas, no spaces: {name} {joined})")
    return f"unexpected extra argument(s) {shown} (each option takes one value; quote values with spaces)"


def _given(opts: list[str], args: list[str]) -> str | None:
    """The value given for an option (``--seed x`` or ``--seed=x``; the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        name, eq, rest = arg.partition("=")
        if name in opts:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def _plain(message: str, exc: ClickException, args: list[str]) -> str:
    """A value Typer could not convert, said without pydantic's wording: "--seed: 'x' is not
    an integer" rather than "Input should be a valid integer, unable to parse string as an
    integer", and "Value error, " dropped from a choice's refusal."""
    message = message.replace("Value error, ", "")
    match = _PYDANTIC.search(message)
    if match is None:
        return message
    param = getattr(exc, "param", None)
    value = _given(list(getattr(param, "opts", ())), args) if getattr(param, "param_type_name", "") == "option" else None
    said = f"{value!r} is not {_KIND[match.group(1)]}" if value is not None else f"not {_KIND[match.group(1)]}"
    return message[:match.start()] + said + message[match.end():]


def _message(exc: ClickException, args: list[str], list_options: set[str]) -> str:
    if isinstance(exc, NoSuchOption):
        close = sorted(exc.possibilities or ())
        return f"unknown option {exc.option_name}" + (f" (did you mean {' or '.join(close)}?)" if close else "")
    match = _EXTRA.fullmatch(exc.format_message()) if isinstance(exc, ClickUsageError) else None
    if match:
        return extra_args_hint(match.group(1).split(), args, list_options)
    return _plain(exc.format_message(), exc, args)


class OneLineErrors(TyperGroup):
    """Usage errors (a bad choice, an out-of-range number, an unknown option) as ONE line on
    stderr with exit code 2, like knormctl's own errors -- not a framed help panel."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = FLAG  # the type column would say <bool>
        return option

    def _options_of(self, args: list[str]) -> tuple[set[str], set[str]]:
        """(every option name, the list options) of the subcommand named in ``args``."""
        command = next((self.commands[a] for a in args if a in self.commands), None)
        if command is None:
            return set(), set()
        names, lists = set(), set()
        for param in command.params:
            names.update(param.opts + param.secondary_opts)
            if getattr(param, "metavar", None) == LIST:
                lists.update(param.opts)
        return names, lists

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        args = list(sys.argv[1:] if args is None else args)
        _signals.reset()
        known, list_options = self._options_of(args)
        args = dashed(args, known)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError:  # bare `knormctl`: show the help as usual
            return super().main(args, prog_name, complete_var, True, **extra)
        except ClickException as exc:
            say_error(_message(exc, args, list_options))
            sys.exit(exc.exit_code)
        except Abort:  # end of input at a prompt
            say_error("aborted")
            sys.exit(1)
        except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback on request
            if "--verbose" in args or "-v" in args or os.environ.get("KNORMCTL_DEBUG"):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            # not every command takes --verbose
            how = "--verbose or KNORMCTL_DEBUG=1" if "--verbose" in known else "KNORMCTL_DEBUG=1"
            say_error(f"unexpected {type(exc).__name__}: {first} (run again with {how} for the traceback)")
            sys.exit(1)
        sys.exit(_signals.exit_code(code) if isinstance(code, int) else 0)
