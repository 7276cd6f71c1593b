"""Question-task figures: accuracy vs keep ratio (one panel per task x context length) and
the needle heat-map (depth x length, one panel per configuration). Every number drawn is a
``TaskRow`` or ``NeedleCell`` value or interval (the json's)."""

from __future__ import annotations

import math
from collections import defaultdict

from matplotlib.figure import Figure

from knormctl.render.export import task_label
from knormctl.render.figures._common import (
    CI_TEXT, caption, dodge, errbar, figure, keep_ratio_axis, legend_outside, na, press_color, press_marker, suptitle, title)
from knormctl.render.rows import REFERENCE_KEY
from knormctl.render.summary import Summary
from knormctl.render.tasks import TaskRow


def _headline_rows(summary: Summary) -> dict[tuple, list[TaskRow]]:
    """Per (task, length): the mean over subtasks where a task has several, else its one subtask."""
    has_mean = {(t.task, t.context_length) for t in summary.tasks if t.subtask is None}
    panels: dict[tuple, list[TaskRow]] = defaultdict(list)
    for t in summary.tasks:
        if (t.subtask is None) == ((t.task, t.context_length) in has_mean):
            panels[(t.task, t.context_length)].append(t)
    return dict(sorted(panels.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)))


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return cols, max(1, math.ceil(n / cols))


def accuracy_size(summary: Summary) -> tuple[float, float]:
    cols, rows = _grid(len(_headline_rows(summary)), 3)
    return 5.5 * cols + 2.5, 4.3 * rows + 1.6


def accuracy(summary: Summary) -> Figure:
    """Accuracy vs keep_ratio, one line per press, one panel per task x context length."""
    panels = _headline_rows(summary)
    cols, rows = _grid(len(panels), 3)
    fig = figure(accuracy_size(summary))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    suptitle(fig, title(summary, "task accuracy vs keep ratio"))
    if not panels:
        na(axes[0], "no scored questions in this run")
        return fig
    methods = set()
    for ax, ((task, length), trows) in zip(axes, panels.items()):
        ax.set_title(f"{task_label(trows[0])}" + (f", {length} tokens" if length else ""))
        by_press = defaultdict(list)
        for t in trows:
            methods.add(t.interval_method)
            if t.is_reference:
                ax.axhline(t.accuracy * 100, color="black", linestyle="--", label="full cache",
                           gid=f"{t.config_key}|{task}|{length}|value")
                if t.interval:
                    ax.axhspan(t.interval[0] * 100, t.interval[1] * 100, color="black", alpha=0.07, zorder=0)
            else:
                by_press[t.press].append(t)
        for k, (press, prs) in enumerate(by_press.items()):
            prs.sort(key=lambda t: t.keep_ratio)
            color = press_color(press)
            xs = [t.keep_ratio + dodge(k, len(by_press)) for t in prs]
            ax.plot(xs, [t.accuracy * 100 for t in prs], marker=press_marker(press), color=color,
                    label=press, gid=f"{press}|{task}|{length}|value")
            for x, t in zip(xs, prs):
                errbar(ax, x, t.interval, f"{t.config_key}|{task}|{length}|ci", 100.0, color=color, cap=0.006)
        ax.set_ylim(-4, 104)
        ax.set_xlabel("keep ratio")
        ax.set_ylabel("accuracy (%)")
        keep_ratio_axis(ax, [t.keep_ratio for prs in by_press.values() for t in prs])
    for ax in axes[len(panels):]:
        ax.axis("off")
    legend_outside(fig, axes[0])
    ns = sorted({t.n for trows in panels.values() for t in trows})
    named = sorted(m for m in methods if m)
    intervals = (f"Error bars and the grey band (full cache): {CI_TEXT} ({', '.join(named)}). " if named else
                 "No error bars: no 95% interval could be computed for these points (the report's task table "
                 "says N/A for them). ")
    caption(fig, "Accuracy = mean score over questions (a mean over subtasks weighs each subtask equally). "
                 + intervals + f"n = {ns[0]}" + (f"-{ns[-1]}" if len(ns) > 1 else "") + " questions per point.")
    return fig


def _needle_keys(summary: Summary) -> list[str]:
    keys = list(dict.fromkeys(c.config_key for c in summary.needle_cells))
    order = {r.config_key: i for i, r in enumerate(summary.rows)}
    return sorted(keys, key=lambda k: (k != REFERENCE_KEY, order.get(k, len(order)), k))


def needle_size(summary: Summary) -> tuple[float, float]:
    cols, rows = _grid(len(_needle_keys(summary)), 4)
    return 3.9 * cols + 1.6, 3.3 * rows + 1.5


def needle_heatmap(summary: Summary) -> Figure:
    """Accuracy by needle depth (y) and context length (x), one panel per configuration."""
    keys = _needle_keys(summary)
    cols, rows = _grid(len(keys), 4)
    fig = figure(needle_size(summary))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    suptitle(fig, title(summary, "accuracy by needle depth and context length"))
    if not keys:
        na(axes[0], "no questions with a needle depth in this run")
        return fig
    import numpy as np

    depths = sorted({c.needle_depth for c in summary.needle_cells})
    lengths = sorted({c.context_length for c in summary.needle_cells}, key=lambda x: x or 0)
    image = None
    for ax, key in zip(axes, keys):
        cells = [c for c in summary.needle_cells if c.config_key == key]
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in cells:
            grid[depths.index(c.needle_depth), lengths.index(c.context_length)] = c.accuracy * 100
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", gid=f"{key}|needle|image")
        for c in cells:
            dark = not 25 < c.accuracy * 100 < 75
            binary = c.accuracy * c.n == round(c.accuracy * c.n)
            text = f"{round(c.accuracy * c.n)}/{c.n}" if binary else f"{c.accuracy:.0%}"
            ax.text(lengths.index(c.context_length), depths.index(c.needle_depth), text, ha="center", va="center",
                    fontsize=10, color="white" if dark else "black")
        ax.set_title(cells[0].label if cells else key)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels(["?" if x is None else str(x) for x in lengths])
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
    for ax in axes[len(keys):]:
        ax.axis("off")
    fig.colorbar(image, ax=list(axes[:len(keys)]), label="accuracy (%)", shrink=0.9)
    subtasks = sorted({sub for c in summary.needle_cells for sub in c.subtasks})
    caption(fig, f"Cells: questions answered right / asked at that depth and length (every subtask with a needle "
                 f"pooled: {', '.join(subtasks)}). With few questions per cell one answer moves a cell by a lot: "
                 f"see the report's {CI_TEXT}s.")
    return fig
