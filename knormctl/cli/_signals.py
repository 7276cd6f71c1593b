"""SIGTERM takes the Ctrl-C path, and the exit code says which signal stopped the command.

A sweep or a study turns SIGTERM into ``runner.Interrupted`` (a KeyboardInterrupt), so both
signals keep every finished cell the same way. The exit code is the shell's 128 + signal:
130 for Ctrl-C, 143 for SIGTERM, wherever the interruption lands (in a cell, while the plan
or the summary prints, between a study's runs): the command group's ``main`` asks here.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from collections.abc import Iterator

_seen = {"sigterm": False}


def _raise_interrupted(signum, frame):
    from knormctl.runner import Interrupted

    _seen["sigterm"] = True
    raise Interrupted()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises ``Interrupted``; the previous handler comes back after (in-process
    callers, tests and notebooks, get theirs back)."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(code: int) -> int:
    """An interrupted command's code (130) as the shell reports the signal: 143 after SIGTERM."""
    return 128 + signal.SIGTERM if code == 128 + signal.SIGINT and _seen["sigterm"] else code


def reset() -> None:
    _seen["sigterm"] = False
