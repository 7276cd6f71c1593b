"""One self-contained HTML page: the report's tables and figures, nothing fetched.

Figures are embedded as base64 PNG (``data:`` URIs) and the style sheet is inline, so
the file can be mailed, attached to an issue or opened from a laptop without the
database or knormctl. The page holds the same numbers as the other formats: callers
pass the already formatted cells of the tables the report prints.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
ul.header { list-style: none; padding: 0; font-family: ui-monospace, Menlo, monospace; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: bottom; text-align: left; color: #666; font-size: 0.85em; padding-top: 0.3em; }
.better { color: #1e7a3a; } .worse { color: #b3261e; } .noise, .same { color: #888; }
.artifact { color: #9a6700; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
ul.flags li { margin-bottom: 0.4em; }
"""


@dataclass
class Cell:
    text: str
    css: str | None = None  # e.g. "better", "worse", "noise"


@dataclass
class HtmlTable:
    title: str
    columns: list[str]
    rows: list[list[Cell | str]]
    caption: str | None = None


@dataclass
class HtmlFigure:
    title: str
    png: bytes
    caption: str | None = None


@dataclass
class HtmlPage:
    title: str
    header: list[str] = field(default_factory=list)
    tables: list[HtmlTable] = field(default_factory=list)
    figures: list[HtmlFigure] = field(default_factory=list)
    notes_title: str = "Read before quoting these numbers"
    notes: list[str] = field(default_factory=list)


def _cell(c: Cell | str, tag: str = "td") -> str:
    if not isinstance(c, Cell):
        c = Cell(str(c))
    cls = f' class="{html.escape(c.css)}"' if c.css else ""
    body = "<br>".join(html.escape(part) for part in c.text.split("\n"))
    return f"<{tag}{cls}>{body}</{tag}>"


def _table(t: HtmlTable) -> str:
    head = "".join(_cell(c, "th") for c in t.columns)
    body = "\n".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return f"<h2>{html.escape(t.title)}</h2>\n<table>{cap}\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


def _figure(f: HtmlFigure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    cap = f"<figcaption>{html.escape(f.caption)}</figcaption>" if f.caption else ""
    return (f'<figure><h2>{html.escape(f.title)}</h2><img alt="{html.escape(f.title)}" '
            f'src="data:image/png;base64,{data}">{cap}</figure>')


def render_page(page: HtmlPage) -> str:
    """The whole document as one string (UTF-8, no external resources)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(page.title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(page.title)}</h1>",
    ]
    if page.header:
        parts.append('<ul class="header">' + "".join(f"<li>{html.escape(h)}</li>" for h in page.header) + "</ul>")
    parts += [_table(t) for t in page.tables]
    if page.notes:
        parts.append(f"<h2>{html.escape(page.notes_title)}</h2>")
        parts.append('<ul class="flags">' + "".join(f"<li>{html.escape(n)}</li>" for n in page.notes) + "</ul>")
    parts += [_figure(f) for f in page.figures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def figure_png(fig, dpi: int) -> bytes:
    """A matplotlib Figure as PNG bytes (the same size the `plot` command saves)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def tables_from_records(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> HtmlTable:
    return HtmlTable(title=title, columns=list(columns), rows=[["" if v is None else str(v) for v in r] for r in rows])


# ----------------------------------------------------------------------------- the report page

def summary_page(summary, *, figures: bool = True, samples=None) -> str:
    """The report of one run (or a merged group) as one page: the same header, tables, flags and
    numbers as ``report --format markdown``, the verdict colours of the rich tables, and the
    figures ``plot`` draws (same code, embedded)."""
    from knormctl.render.export import (
        accuracy_text, cell_text, header_lines, legend_lines, shown_metrics, task_label)
    from knormctl.render.metrics import METRIC

    names = shown_metrics(summary)
    lead = ["dataset"] if summary.by_dataset else []
    rows = []
    for r in summary.rows:
        cells: list[Cell | str] = ([r.dataset or ""] if summary.by_dataset else []) + [
            Cell(r.label, "ref" if r.is_reference else None), str(r.n_prompts), str(r.n_failed)]
        cells += [Cell(cell_text(r, n, sep="\n"), r.verdicts.get(n)) for n in names]
        rows.append(cells)
    tables = [HtmlTable(title="configurations", columns=lead + ["configuration", "prompts", "failed"]
                        + [METRIC[n].label for n in names], rows=rows, caption=" ".join(legend_lines(summary)))]
    if summary.tasks:
        tables.append(HtmlTable(
            title="question tasks", columns=["task", "length", "configuration",
                                             "accuracy [95% CI] (correct/n), Δ paired [95% CI]", "full cache near chance"],
            rows=[[task_label(t), str(t.context_length or ""), t.label, Cell(accuracy_text(t), t.verdict),
                   "yes" if t.near_chance else ""] for t in summary.tasks]))
    if samples is not None:
        from knormctl.render.summary import SAMPLE_FIELDS, sample_rows

        recs = sample_rows(samples)
        tables.append(tables_from_records("samples", SAMPLE_FIELDS, [[rec[c] for c in SAMPLE_FIELDS] for rec in recs]))
    page = HtmlPage(title=f"knormctl report \u2014 {summary.header.title}, {summary.header.model}",
                    header=header_lines(summary), tables=tables, notes=[f.message for f in summary.flags])
    if figures:
        from knormctl.render.figures import DPI, figures_for

        specs = figures_for(summary)
        if summary.by_dataset:  # the other figures draw one bar per row: each dataset's, unlabelled
            specs = [spec for spec in specs if spec.name == "table"]
            page.notes.append(f"--by-dataset: only the table figure is drawn (it names each row's dataset); "
                              f"`{summary.header.report_command.replace('report', 'plot', 1)}` draws the others")
        for spec in specs:
            fig = spec.draw(summary)
            page.figures.append(HtmlFigure(title=spec.name.replace("_", " "), png=figure_png(fig, DPI)))
            fig.clear()
    return render_page(page)
