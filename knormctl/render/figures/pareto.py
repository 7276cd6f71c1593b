"""The figure to decide from: quality against KV memory held (and against decode TPOT), one
point per press x setting, one colour per press, the Pareto frontier drawn, one row of
panels per scale (a model and the settings that change its full cache: ``render.study``).
Reads ``render.study.StudyView`` (the same numbers as the report)."""

from __future__ import annotations

import textwrap

from matplotlib import ticker as mticker
from matplotlib.figure import Figure

from knormctl.render.figures._common import caption, figure, label_points, press_color, press_marker
from knormctl.render.study import BUDGETS, StudyView

GID = "pareto"  # artists carry gids so tests can read the drawn data back


def size(view: StudyView) -> tuple[float, float]:
    return 14.0, 1.5 + 5.0 * max(1, len(view.scales))


def _panel(ax, view: StudyView, scale: str, x_attr: str, xi_attr: str, xlabel: str,
           frontier_line: bool) -> list[tuple[float, float, str]]:
    """Draw one panel; the frontier's labels (x, y, text) are returned, to be placed once the
    figure's layout is final (legend and caption included)."""
    labels: list[tuple[float, float, str]] = []
    pts = [p for p in view.points_on(scale) if p.quality is not None and getattr(p, x_attr) is not None]
    if not pts:
        why = next((b.na for b in view.best if b.scale == scale and b.na), f"N/A: no {view.quality_kind} stored")
        ax.text(0.5, 0.5, textwrap.fill(f"{scale}: {why}", _chars(ax)), ha="center", va="center",
                transform=ax.transAxes, color="#666666", gid=f"{GID}|{scale}|{x_attr}|na")
        ax.set_xticks([])
        ax.set_yticks([])
        return labels
    k = 100.0 if view.higher_quality else 1.0
    for p in pts:
        x, y = getattr(p, x_attr) * 100.0, p.quality * k
        color = press_color(p.press)
        xi, yi = getattr(p, xi_attr), p.quality_interval
        if xi is not None:
            ax.hlines([y], xi[0] * 100.0, xi[1] * 100.0, colors=color, linewidth=1.0, alpha=0.7, zorder=2)
        if yi is not None:
            ax.vlines([x], yi[0] * k, yi[1] * k, colors=color, linewidth=1.0, alpha=0.7, zorder=2)
        ax.scatter([x], [y], s=70 if p.on_frontier else 40, color="white" if p.is_reference else color,
                   edgecolors=color, linewidths=1.5, marker=press_marker(p.press), zorder=3,
                   label="full cache" if p.is_reference else p.press.split("(", 1)[0],
                   gid=f"{GID}|{scale}|{x_attr}|{p.key}")
    _not_complete(ax, view, scale, pts)
    if frontier_line:
        front = sorted((p for p in pts if p.on_frontier), key=lambda p: p.kv_held)
        # one label per name: full caches of runs that differ only in press-only settings are
        # one point, tied on the frontier, each named 'full cache'
        labels = list({p.name_on_scale: (p.kv_held * 100.0, p.quality * k, p.name_on_scale)
                       for p in reversed(front)}.values())[::-1]
        ax.plot([p.kv_held * 100.0 for p in front], [p.quality * k for p in front], color="black",
                linewidth=1.2, linestyle="--", zorder=1, label="Pareto frontier", gid=f"{GID}|{scale}|frontier")
        for b in BUDGETS[:-1]:
            ax.axvline(b * 100.0, color="#bbbbbb", linewidth=0.8, linestyle=":", zorder=0)
    if not view.higher_quality:
        # ratios: a log axis gives 1.0-1.2 (where good presses sit) room beside a 3x outlier; the
        # axis fits the points, so an interval of a few prompts may run off it (said in the caption)
        ys = [p.quality for p in pts]
        ax.set_yscale("log")
        lo, hi = min(ys) / 1.03, max(ys) * 1.15
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(mticker.FixedLocator(
            [t for t in (0.9, 0.95, 1, 1.05, 1.1, 1.2, 1.5, 2, 3, 5, 10, 20, 50) if lo <= t <= hi]))
        ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)" if view.higher_quality else "perplexity ratio to the full cache")
    # the scale on lines of its own, wrapped to the panel: a scale named by a model path and its
    # settings ran past the figure's edges, over the next panel's title and under the legend
    ax.set_title(f"{textwrap.fill(scale + ':', _chars(ax))}\n{view.quality_kind} vs {xlabel.split(' (')[0]}",
                 fontsize=11)
    if view.higher_quality:
        ax.margins(y=0.15)  # accuracy at 100% sits on the top edge: room for the frontier's labels
    ax.grid(True, alpha=0.3)
    return labels


def _chars(ax) -> int:
    """Characters of 11-pt text that fit across a panel (~11 per inch; a panel is ~38% of the figure)."""
    return max(30, int(ax.figure.get_figwidth() * 0.38 * 11))


def _not_complete(ax, view: StudyView, scale: str, pts) -> None:
    """A word in the panel when its runs are not complete (the report's flags say it too): an
    interrupted run that stored only its full-cache cells otherwise draws one unexplained point."""
    lines = []
    if all(p.is_reference for p in pts):
        lines.append("only the full cache stored")
    for rid in sorted({p.run_id for p in view.points_on(scale)}):
        h = view.summaries[rid].header
        if h.status != "complete":
            lines.append(f"run {rid} {h.status.replace('_', ' ')}: {h.cells_text}")
    if lines:
        ax.text(0.02, 0.02, "\n".join(lines), transform=ax.transAxes, ha="left", va="bottom", fontsize=8,
                color="#b00000", gid=f"{GID}|{scale}|status")


def pareto(view: StudyView) -> Figure:
    fig = figure(size(view))
    axes = fig.subplots(max(1, len(view.scales)), 2, squeeze=False)
    names = {}
    for row, scale in enumerate(view.scales or ["(no model)"]):
        names[row] = _panel(axes[row][0], view, scale, "kv_held", "kv_interval",
                             "KV memory held (% of the full cache)", True)
        _panel(axes[row][1], view, scale, "tpot_ratio", "tpot_interval", "decode TPOT (% of the full cache)", False)
    handles, labels = [], []  # every panel's: the first scale may have drawn nothing (no reference)
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    unique = dict(zip(labels, handles))
    if unique:
        fig.legend(unique.values(), unique.keys(), loc="outside right upper")
    better = "higher accuracy" if view.higher_quality else "a lower perplexity ratio (log axis)"
    caption(fig, f"Study {view.name}. Each point is one configuration of one run, against that run's own full "
                 f"cache ({better} is better; less KV and lower TPOT are cheaper). Lines through a point: "
                 f"95% intervals (paired bootstrap over prompts; Wilson or bootstrap for accuracy; the axes fit "
                 f"the points, so a wide interval may run off them). Larger points "
                 f"and the dashed line: the Pareto frontier (no other configuration is as good in both KV held "
                 f"and quality and better in one; among the settings of a press and keep ratio, those on the "
                 f"most prompts). Dotted lines: the 25/50/75% budgets named in the report.")
    label_points(fig, [(axes[row][0], items) for row, items in names.items() if items], fontsize=8, gid=f"{GID}|label")
    return fig
