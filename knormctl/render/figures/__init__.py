"""Matplotlib figures built from a ``Summary``. Each function RETURNS a Figure; only the
``plot`` command saves it (optimum-benchmark's plot_utils habit).

Headless: the Agg backend is chosen before anything from matplotlib draws, and figures
are plain ``matplotlib.figure.Figure`` objects that pyplot never tracks (nothing to close).
Every number drawn is one the report prints (the ``Summary``'s), coloured by the same
verdicts; a metric with no value anywhere becomes a labelled empty panel ("N/A: reason").

``speed``: per-configuration speed, memory and quality figures; ``table``: the report
table as an image; ``tasks``: question-task accuracy and the needle heat-map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from matplotlib.figure import Figure

from knormctl.render.figures import speed, table as table_figure, tasks
from knormctl.render.figures._common import DPI
from knormctl.render.summary import Summary


@dataclass(frozen=True)
class FigureSpec:
    name: str
    filename: str  # without extension; the first four keep the old visualize_results.py names
    draw: Callable[[Summary], Figure]
    size: Callable[[Summary], tuple[float, float]]  # inches; some grow with rows or panels
    applies: Callable[[Summary], bool] = lambda s: True


def _fixed(w: float, h: float) -> Callable[[Summary], tuple[float, float]]:
    return lambda s: (w, h)


FIGURES = (
    FigureSpec("comprehensive", "knormpress_comprehensive", speed.comprehensive, _fixed(16, 9.5)),
    FigureSpec("summary", "knormpress_summary", speed.summary_figure, speed.summary_size),
    FigureSpec("tradeoff", "knormpress_tradeoff", speed.tradeoff, _fixed(12, 8)),
    FigureSpec("table", "knormpress_table", table_figure.table, table_figure.size),
    FigureSpec("quality", "knormpress_quality", speed.quality, _fixed(14, 6.5)),
    FigureSpec("latency", "knormpress_latency", speed.latency, _fixed(14, 7)),
    FigureSpec("accuracy", "knormpress_accuracy", tasks.accuracy, tasks.accuracy_size, lambda s: bool(s.tasks)),
    FigureSpec("needle_heatmap", "knormpress_needle_heatmap", tasks.needle_heatmap, tasks.needle_size,
               lambda s: bool(s.needle_cells)),
)


def figures_for(s: Summary) -> list[FigureSpec]:
    """The figures that make sense for this summary (task figures only where questions were scored)."""
    return [f for f in FIGURES if f.applies(s)]


__all__ = ["DPI", "FIGURES", "FigureSpec", "figures_for"]
