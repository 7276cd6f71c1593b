"""A study's view as text: rich tables, json / csv / markdown, and the HTML page.

Every format reads the same ``StudyView`` (``render.study``): one table per model with the
settings that vary, the leaderboard, and the best configuration per memory budget.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from knormctl.render.study import (BUDGETS, StudyPoint, StudyView, budget_sentences, fmt_quality, fmt_ratio,
                                   leaderboard_setting, study_flags)

LEGEND = ("quality: {kind} vs the run's own full cache ({better} is better); KV held and TPOT: ratio to the full "
          "cache; [95% intervals] (paired bootstrap over prompts, Wilson/bootstrap for accuracy); * on the "
          "Pareto frontier (no other configuration is as good in both KV held and quality and better in one; among "
          "the settings of a press and keep ratio, those on the most prompts)")


def legend(view: StudyView) -> str:
    text = LEGEND.format(kind=view.quality_kind, better="higher" if view.higher_quality else "lower")
    split = view.scale_axes
    if split:  # the frontiers are per scale, not per model: say so where a table shows several
        text += (f"; frontiers and budgets per model and {', '.join(split)} (runs that differ in "
                 f"{'it' if len(split) == 1 else 'them'} have different full caches: their ratios do not compare)")
    return text


def model_columns(view: StudyView) -> list[str]:
    return [*view.axes, "configuration", "n", view.quality_kind, "KV held", "TPOT", "*"]


def model_rows(view: StudyView, model: str, sep: str = " ") -> list[list[str]]:
    def order(p: StudyPoint):
        return (p.order, not p.is_reference, p.press, -p.keep_ratio)

    return [[*p.settings.values(), p.label, str(p.n_prompts), fmt_quality(view, p.quality, p.quality_interval, sep),
             fmt_ratio(p.kv_held, p.kv_interval, sep), fmt_ratio(p.tpot_ratio, p.tpot_interval, sep),
             "*" if p.on_frontier else ""] for p in sorted(view.points_of(model), key=order)]


LEADERBOARD = "{kind} at each keep ratio (each press's best setting on the most prompts)"


def leaderboard_columns(view: StudyView, scale: str) -> tuple[list[str], list[float]]:
    ratios = sorted({kr for by_scale in view.leaderboard.values() for kr in by_scale.get(scale, {})}, reverse=True)
    return ["press"] + [f"keep {kr:g}" for kr in ratios], ratios


def leaderboard_rows(view: StudyView, scale: str, sep: str = " ") -> list[list[str]]:
    """One row per press; a cell is its best point's quality, and the setting that won where
    the study measured several ('prune_after=512')."""
    _, ratios = leaderboard_columns(view, scale)
    rows = []
    for press, by_scale in sorted(view.leaderboard.items(), key=lambda kv: (kv[0] != "none", kv[0])):
        if scale not in by_scale:
            continue
        row = ["full cache" if press == "none" else press]
        for kr in ratios:
            p = by_scale[scale].get(kr)
            if p is None:
                row.append("")
                continue
            setting = leaderboard_setting(view, p)
            row.append(fmt_quality(view, p.quality, p.quality_interval, sep) + (f"{sep}{setting}" if setting else ""))
        rows.append(row)
    return rows


def print_study(view: StudyView, console) -> None:
    from rich import box
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from knormctl.render.tables import fits, part_title, print_bullet, split_tables

    console.print(Panel(f"study {view.name}: {view.runs_line}, models: {', '.join(view.models)}"
                        + (f"\nvarying: {', '.join(view.axes)}" if view.axes else ""),
                        title="knormctl report --group", title_align="left"))
    # Numbers are never cut: the metric columns split over as many tables as the width needs
    # (as the run report's), each repeating what says which point a line is. Those words may
    # wrap (a long setting or model path), the numbers may not; when the settings' own columns
    # leave no room for one metric (three or four axes at 80 columns), they share one column,
    # 'bfloat16 | 0 | none'.
    cols = model_columns(view)
    label = len(view.axes)
    metrics = list(range(label + 2, len(cols) - 1))  # quality, KV held, TPOT (the last column is the mark)
    for model in view.models:
        rows = model_rows(view, model, sep="\n")

        def build(chunk, part, parts, model=model, rows=rows, merged=False):
            table = Table(title=part_title(model, part, parts), title_justify="left", box=box.SIMPLE_HEAD)
            keys = [" | ".join(view.axes)] if merged and label else cols[:label]
            for name in [*keys, cols[label]]:  # the settings and the configuration, its frontier mark beside it
                table.add_column(name, overflow="fold")
            for i in (label + 1, *chunk):  # n, then this part's metrics
                table.add_column(cols[i], justify="right", no_wrap=True)
            for row in rows:
                settings = [" | ".join(row[:label])] if merged and label else row[:label]  # a list holds commas
                config = f"{row[label]} {row[-1]}" if row[-1] else row[label]  # a column of its own: the first
                table.add_row(*settings, config, *(row[i] for i in (label + 1, *chunk)))  # one rich drops
            return table

        if label > 1 and not fits(console, build(metrics[:1], 0, 0)):
            build = partial(build, merged=True)
        for table in split_tables(console, metrics, build):
            console.print(table)
    for scale in view.scales:
        cols_lb, ratios = leaderboard_columns(view, scale)
        rows_lb = leaderboard_rows(view, scale, sep="\n")
        # the title on a line of its own: as the table's title it wrapped at the table's width,
        # a narrow column of words when the study has one or two keep ratios
        console.print(Text(f"leaderboard, {scale}: " + LEADERBOARD.format(kind=view.quality_kind), style="italic"))

        def board(chunk, part, parts, cols_lb=cols_lb, rows_lb=rows_lb):
            table = Table(title=f"({part}/{parts})" if parts > 1 else None, title_justify="left", box=box.SIMPLE_HEAD)
            table.add_column(cols_lb[0], no_wrap=True)
            for i in chunk:  # a winning setting may wrap at its commas; the quality and interval are single words
                table.add_column(cols_lb[i], justify="right", overflow="fold")
            for row in rows_lb:
                table.add_row(row[0], *(row[i] for i in chunk))
            return table

        for table in split_tables(console, list(range(1, len(ratios) + 1)), board):
            console.print(table)
    console.print(Text("best configuration per memory budget:", style="bold"))
    for line in budget_sentences(view):
        print_bullet(console, line)
    console.print(Text(legend(view), style="dim"))
    flags = study_flags(view)
    if flags:
        console.print(Text("Read before quoting these numbers:", style="bold yellow"))
        for line in flags:
            print_bullet(console, line)


def study_text(view: StudyView, fmt: str) -> str:
    from knormctl.render.export import _json, csv_text, markdown_table, md_escape

    if fmt == "json":
        return _json(view.to_dict())
    if fmt == "csv":
        cols = ["model", *view.axes, "scale", "run_id", "config_key", "label", "press", "keep_ratio", "n_prompts",
                "quality", "quality_ci_lo", "quality_ci_hi", "kv_held", "kv_ci_lo", "kv_ci_hi", "tpot_ratio",
                "tpot_ci_lo", "tpot_ci_hi", "on_frontier"]
        recs = []
        for p in view.points:
            rec: dict[str, Any] = dict(model=p.model, scale=p.scale, run_id=p.run_id, config_key=p.config_key,
                                       label=p.label, press=p.press, keep_ratio=p.keep_ratio, n_prompts=p.n_prompts,
                                       quality=p.quality, kv_held=p.kv_held, tpot_ratio=p.tpot_ratio,
                                       on_frontier=p.on_frontier, **p.settings)
            for name, iv in (("quality", p.quality_interval), ("kv", p.kv_interval), ("tpot", p.tpot_interval)):
                rec[f"{name}_ci_lo"], rec[f"{name}_ci_hi"] = iv if iv else (None, None)
            recs.append(rec)
        return csv_text(cols, recs)
    out = [md_escape(f"- study {view.name}: {view.runs_line}; models {', '.join(view.models)}"
                     + (f"; varying {', '.join(view.axes)}" if view.axes else "")), ""]
    for model in view.models:
        out.append(f"**{md_escape(model)}**\n")
        out.append(markdown_table(model_columns(view), model_rows(view, model)))
    for scale in view.scales:
        cols, _ = leaderboard_columns(view, scale)
        out.append(f"**leaderboard, {md_escape(scale)}** ({md_escape(LEADERBOARD.format(kind=view.quality_kind))})\n")
        out.append(markdown_table(cols, leaderboard_rows(view, scale)))
    out.append("\n".join(f"- {md_escape(line)}" for line in budget_sentences(view)) + "\n")
    out.append(md_escape(legend(view)) + "\n")
    flags = study_flags(view)
    if flags:
        out.append("\n".join(f"- {md_escape(line)}" for line in flags) + "\n")
    return "\n".join(out)


def study_page(view: StudyView) -> str:
    from knormctl.render.figures import DPI
    from knormctl.render.figures.pareto import pareto
    from knormctl.render.html import HtmlFigure, HtmlPage, HtmlTable, figure_png, render_page

    tables = [HtmlTable(title=model, columns=model_columns(view), rows=model_rows(view, model),
                        caption=legend(view)) for model in view.models]
    for scale in view.scales:
        cols, _ = leaderboard_columns(view, scale)
        tables.append(HtmlTable(title=f"leaderboard, {scale}: " + LEADERBOARD.format(kind=view.quality_kind),
                                columns=cols, rows=leaderboard_rows(view, scale)))
    tables.append(HtmlTable(title="best configuration per memory budget", columns=["model and budget"],
                            rows=[[line] for line in budget_sentences(view)]))
    fig = pareto(view)
    page = HtmlPage(title=f"knormctl study {view.name}", header=[f"models: {', '.join(view.models)}",
                                                                 f"varying: {', '.join(view.axes) or '-'}",
                                                                 f"budgets: {', '.join(f'{b:.0%}' for b in BUDGETS)}"],
                    tables=tables, figures=[HtmlFigure("Pareto view", figure_png(fig, DPI))],
                    notes=study_flags(view))
    fig.clear()
    return render_page(page)
