"""The report's per-configuration table as an image: the same cells as the rich table
(value, paired change, interval), filled by the same verdicts, sized to its rows."""

from __future__ import annotations

import textwrap

from matplotlib.figure import Figure

from knormctl.render.export import header_lines, shown_metrics
from knormctl.render.figures._common import BOOT_TEXT, VERDICT_FILLS, caption, figure, na, suptitle, title
from knormctl.render.format import DELTA, fmt_change, fmt_interval, fmt_value
from knormctl.render.metrics import METRIC
from knormctl.render.rows import ConfigRow
from knormctl.render.summary import Summary

ROW_INCHES = 0.62  # three lines of 9-10 pt text
WIDTH = 18.0


def _names(summary: Summary) -> list[str]:
    return [n for n in shown_metrics(summary) if n not in ("compress_time_s", "ppl_context")]


def _reasons(summary: Summary, names: list[str]) -> list[tuple[str, str]]:
    """(metric label, reason) of every N/A cell among ``names``, numbered in the caption."""
    return sorted({(METRIC[n].label, r.na_reasons[n]) for r in summary.rows for n in names if n in r.na_reasons})


def size(summary: Summary) -> tuple[float, float]:
    """As tall as its rows: no empty space under a short table."""
    notes = len(_reasons(summary, _names(summary))) + bool(summary.flags)
    return WIDTH, 1.6 + 0.35 * (notes + 2) + ROW_INCHES * (len(summary.rows) + 1)


def table(summary: Summary) -> Figure:
    """The report's per-configuration numbers as an image."""
    fig = figure(size(summary))
    ax = fig.subplots()
    ax.axis("off")
    suptitle(fig, title(summary, "report") + "\n" + "; ".join(header_lines(summary)[2:3]), fontsize=12)
    if not summary.rows:
        na(ax, "no samples stored")
        return fig
    names = _names(summary)
    reasons = _reasons(summary, names)

    def cell(r: ConfigRow, n: str) -> str:
        if n in r.na_reasons:
            return f"N/A ({reasons.index((METRIC[n].label, r.na_reasons[n])) + 1})"
        text = fmt_value(n, r.values[n])
        change = fmt_change(n, r.changes[n])
        if change:
            text += f"\n{DELTA} {change}\n{fmt_interval(r.change_intervals[n])}"
        return text

    cells = [[r.label + (f"\n[{r.dataset}]" if r.dataset else ""), f"{r.n_prompts}" + (f" ({r.n_failed})" if r.n_failed else "")]
             + [cell(r, n) for n in names] for r in summary.rows]
    header = ["configuration", "prompts\n(failed)"] + [textwrap.fill(METRIC[n].label, 12) for n in names]
    # columns as wide as what they hold (equal widths cut 'expected-attention 0.75' to 'xpected-attention 0.7',
    # which then read like its 0.25 row); the table still fills the figure's width
    chars = [max(len(line) for text in column for line in str(text).split("\n"))
             for column in zip(header, *cells)]
    widths = [c + 2 for c in chars]
    tbl = ax.table(cellText=cells, colLabels=header, cellLoc="center", bbox=[0, 0, 1, 1],
                   colWidths=[w / sum(widths) for w in widths])
    tbl.auto_set_font_size(False)
    tbl.set_fontsize(10 if len(names) <= 10 else 9)
    for (i, j), c in tbl.get_celld().items():
        if i == 0:
            c.set_text_props(weight="bold")
            c.set_facecolor("#e8e8e8")
        elif j >= 2:
            row, name = summary.rows[i - 1], names[j - 2]
            c.set_facecolor(VERDICT_FILLS.get(row.verdicts[name], "white"))
            c.set_gid(f"{row.config_key}|{name}|cell")
    notes = [f"({i + 1}) {label} N/A: {textwrap.shorten(why, 160)}" for i, (label, why) in enumerate(reasons)]
    if summary.flags:
        notes.append(f"{len(summary.flags)} honesty flag(s) apply: run `{summary.header.report_command}` "
                     "to read them before quoting these numbers.")
    caption(fig, "\n".join([f"Cells: median over prompts (fractions: mean); {DELTA}: median of per-prompt changes vs "
                            f"the full cache (fractions: mean, in pp) with its {BOOT_TEXT}. Green better, red worse, "
                            f"white no detectable difference, yellow a TTFT timing artifact."] + notes))
    return fig
