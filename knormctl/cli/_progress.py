"""Progress of a run's cells on stderr: a live bar on a terminal, plain lines in a log.

A live bar draws nothing when stderr is a file or a CI log (rich only prints it at the
end), so there the same numbers -- cells done/total, elapsed, ETA -- come as plain log
lines: after a finished cell at most every ``every_s`` seconds (the first and the last
cell always), and a "still working" line when one cell runs longer than ``quiet_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from knormctl.estimate import format_duration

EVERY_S = 10.0  # a log gets at most one line per 10 s from finished cells (a fast GPU sweep has thousands)
QUIET_S = 60.0  # ... and one at least every minute while a long cell runs


class PlainProgress:
    """Cells done, elapsed and ETA as plain lines through ``log``."""

    def __init__(self, log: Callable[[str], None], total: int, *, every_s: float = EVERY_S, quiet_s: float = QUIET_S,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.total, self.every_s, self.quiet_s, self.clock = log, total, every_s, quiet_s, clock
        self.started = self.last_line = self.cells_started = clock()
        self.done = self.fresh = 0  # fresh: cells measured now (a resumed run's kept cells are not)
        self.desc = "warm-up"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="knormctl-progress", daemon=True)
        self._ticker.start()

    def measuring(self) -> None:
        """The warm-up is over: cells start now (the ETA's clock starts here)."""
        with self._lock:
            self.cells_started = self.last_line = self.clock()  # the estimate line was just said
            self.desc = ""

    def eta(self) -> str:
        if not self.fresh:
            return "ETA after the first cell"
        per_cell = (self.clock() - self.cells_started) / self.fresh
        return f"ETA {format_duration(per_cell * (self.total - self.done))}"

    def _status(self) -> str:
        return (f"{self.done}/{self.total} cells, {format_duration(self.clock() - self.started)} elapsed, "
                f"{self.eta()}")

    def update(self, done: int, total: int, desc: str) -> None:
        with self._lock:
            kept = desc.endswith("(kept)")
            self.done, self.total, self.desc = done, total, desc
            self.fresh += 0 if kept else 1
            now = self.clock()
            if kept and done < total:
                return
            if self.fresh == 1 or done >= total or now - self.last_line >= self.every_s:
                self.last_line = now
                self.log(f"{self._status()} ({desc})" if done < total else
                         f"{done}/{total} cells done in {format_duration(now - self.started)}")

    def _tick(self) -> None:
        while not self._stop.wait(min(self.quiet_s, 5.0)):
            with self._lock:
                now = self.clock()
                if now - self.last_line >= self.quiet_s and self.done < self.total:
                    self.last_line = now
                    if self.desc == "warm-up":
                        self.log(f"still warming up ({format_duration(now - self.started)} elapsed)")
                    else:
                        self.log(f"still working on cell {self.done + 1} of {self.total} "
                                 f"({format_duration(now - self.started)} elapsed, {self.eta()})")

    def close(self) -> None:
        self._stop.set()


class BarProgress:
    """The same on a terminal: one live rich bar."""

    COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())

    def __init__(self, console: Console, total: int):
        self.bar = Progress(*self.COLUMNS, console=console, transient=False)
        self.bar.start()
        self.task = self.bar.add_task("warm-up", total=total)

    def measuring(self) -> None:
        self.bar.update(self.task, description="cells")

    def update(self, done: int, total: int, desc: str) -> None:
        self.bar.update(self.task, completed=done, total=total, description=desc)

    def close(self) -> None:
        self.bar.stop()


def cell_progress(console: Console, log: Callable[[str], None], total: int) -> PlainProgress | BarProgress:
    """A bar when stderr is a terminal, else plain lines."""
    return BarProgress(console, total) if console.is_terminal else PlainProgress(log, total)
