"""Speed, memory and quality figures of the per-configuration rows: every number drawn is
a ``ConfigRow`` value, change or interval (the json's), coloured by the report's verdict."""

from __future__ import annotations

from collections import defaultdict

from matplotlib.figure import Figure

from knormctl.render.export import na_notes, shown_metrics
from knormctl.render.figures._common import (
    BOOT_TEXT, NOISE_BAND, VERDICT_COLORS, VERDICT_FILLS, caption, dodge, errbar, figure, fit, keep_ratio_axis,
    label_points, legend_outside, na, press_color, press_marker, reason, scale, suptitle, title, xticks)
from knormctl.render.format import DELTA, fmt_change, fmt_interval
from knormctl.render.metrics import METRIC
from knormctl.render.summary import Summary


def _noise_note(summary: Summary) -> str:
    # an assumed noise's source already says "assumed: ..." (as the report's header shows it)
    how = "measured: " if summary.noise_measured else ""
    return f"grey band: this run's timing noise \u00b1{summary.noise_pct:.1f}% ({how}{summary.noise_source})"


def _n_note(summary: Summary) -> str:
    ns = sorted({r.n_prompts for r in summary.rows})
    return f"n = {ns[0]} prompts per configuration" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]} prompts per configuration"


def _na_mark(ax, i: int, row) -> None:
    """A configuration's missing bar: N/A, with why when every one of its cells failed."""
    why = f"\n({row.n_failed} failed)" if row.n_prompts == 0 and row.n_failed else ""
    ax.text(i, 0, "N/A" + why, ha="center", va="bottom", color="#666666", fontsize=9,
            gid=f"{row.config_key}|na|text")


def _bars(ax, summary: Summary, name: str, what: str) -> None:
    """One bar per configuration: the median over prompts. No error bar: prompts differ (in
    length, in text), so an interval of the median would show the prompt mix, not the press;
    the paired changes carry the uncertainty."""
    rows = summary.rows
    ax.set_title(what)
    if all(r.values[name] is None for r in rows):
        na(ax, reason(summary, name))
        return
    k, unit = scale(name)
    for i, r in enumerate(rows):
        v = r.values[name]
        if v is None:
            _na_mark(ax, i, r)
            continue
        ax.bar(i, v * k, color="white" if r.is_reference else press_color(r), edgecolor=press_color(r),
               hatch="//" if r.is_reference else None, gid=f"{r.config_key}|{name}|value")
    ax.set_xlim(-0.6, len(rows) - 0.4)  # an N/A mark in the last place stays inside
    ax.set_ylabel(f"{METRIC[name].label} ({unit})" if unit else METRIC[name].label)
    xticks(ax, [r.label for r in rows])


def _change_bars(ax, summary: Summary, name: str, what: str) -> None:
    """One bar per compressed configuration: its paired change with the 95% bootstrap interval,
    coloured by the verdict; timings get the run's noise band."""
    rows = [r for r in summary.rows if not r.is_reference]
    ax.set_title(what)
    if not rows or all(r.changes[name] is None for r in rows):
        na(ax, reason(summary, name, compared=True))
        return
    m = METRIC[name]
    ends = []
    for i, r in enumerate(rows):
        c = r.changes[name]
        if c is None:
            _na_mark(ax, i, r)
            continue
        verdict = r.verdicts[name]
        hatch = "//" if verdict == "artifact" else None  # compression cannot change the prefill
        ax.bar(i, c, color="white" if hatch else VERDICT_COLORS[verdict], edgecolor=VERDICT_COLORS[verdict],
               hatch=hatch, gid=f"{r.config_key}|{name}|change")
        errbar(ax, i, r.change_intervals[name], f"{r.config_key}|{name}|ci")
        ends += [c] + list(r.change_intervals[name] or ())
    band = (-summary.noise_pct, summary.noise_pct) if m.timing else ()
    if band:
        ax.axhspan(*band, color=NOISE_BAND, zorder=0)
    ax.set_ylim(*fit(ends, include=(0.0, *band)))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel(f"{DELTA} paired vs full cache ({m.change_unit})")
    xticks(ax, [r.label for r in rows])


def comprehensive(summary: Summary) -> Figure:
    """Six panels: TTFT, TPOT, end-to-end throughput; TTFT change, TPOT change, perplexity."""
    fig = figure((16, 9.5))
    axes = fig.subplots(2, 3)
    _bars(axes[0, 0], summary, "ttft_s", "time to first token (median)")
    _bars(axes[0, 1], summary, "tpot_s", "time per output token (median)")
    _bars(axes[0, 2], summary, "throughput_tps", "end-to-end throughput, prefill included (median)")
    _change_bars(axes[1, 0], summary, "ttft_s", "TTFT change (paired)")
    _change_bars(axes[1, 1], summary, "tpot_s", "TPOT change (paired)")
    ax = axes[1, 2]
    _bars(ax, summary, "ppl_compressed", "perplexity under compression (median)")
    # the full cache's number, as the report gives it (configurations may cover other prompts)
    ref = summary.reference
    # the same quantity as the bars (the prompt's own perplexity, ppl_context, is another text's:
    # a line at it put a 97%-worse configuration below "the full model")
    full = None if ref is None else ref.values["ppl_compressed"]
    note = ""
    if full is not None and any(r.values["ppl_compressed"] is not None for r in summary.rows):
        ax.axhline(full, color="black", linestyle="--", linewidth=1, gid=f"{ref.config_key}|ppl_compressed|line")
        note = "; dashed: the full cache's perplexity of the same text (its median)"
    suptitle(fig, title(summary, "KnormPress benchmark"))
    caption(fig, f"Top row and perplexity: medians over prompts (hatched: the full cache; no error bars, since prompts "
                 f"differ in length and text: the changes carry the uncertainty). "
                 f"Bottom: the median of per-prompt changes vs the full cache, error bars = {BOOT_TEXT}; green better, "
                 f"red worse, grey no detectable difference, hatched a TTFT timing artifact.\n"
                 f"{_n_note(summary) if summary.rows else ''}; {_noise_note(summary)}{note}."
                 + "".join(f"\n{line}." for line in na_notes(summary, ("ttft_s", "tpot_s", "throughput_tps",
                                                                           "ppl_compressed"))))
    return fig


def summary_size(summary: Summary) -> tuple[float, float]:
    n = sum(1 for r in summary.rows if not r.is_reference)
    return 15.0, max(4.5, 2.4 + 0.7 * n)


def summary_figure(data: Summary) -> Figure:
    """Every directional metric's paired change (and interval), one row per configuration,
    cells filled by the report's verdict."""
    fig = figure(summary_size(data))
    ax = fig.subplots()
    names = [n for n in shown_metrics(data) if METRIC[n].better is not None]
    rows = [r for r in data.rows if not r.is_reference]
    suptitle(fig, title(data, "every metric against the full cache (paired change)"))
    if data.reference is None or not rows:
        na(ax, "no full-cache reference in this run" if data.reference is None else "only the full-cache reference was run")
        return fig
    from matplotlib.patches import Rectangle

    for i, r in enumerate(rows):
        for j, n in enumerate(names):
            verdict = r.verdicts[n]
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=VERDICT_FILLS.get(verdict, "white"),
                                   edgecolor="#cccccc", gid=f"{r.config_key}|{n}|cell"))
            change = r.changes[n]
            text = ("N/A" + (f"\n({r.n_failed} failed)" if r.n_prompts == 0 and r.n_failed else "")
                    if change is None else f"{fmt_change(n, change)}\n{fmt_interval(r.change_intervals[n])}")
            ax.text(j, i, text, ha="center", va="center", fontsize=10, color="#222222", gid=f"{r.config_key}|{n}|text")
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([METRIC[n].label for n in names], rotation=20, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r.label for r in rows])
    ax.tick_params(length=0)
    caption(fig, f"Each cell: the median over prompts of each prompt's change vs the full cache (fractions: mean, "
                 f"in pp) and its {BOOT_TEXT}. Green better, red worse, white no detectable difference (interval "
                 f"contains 0, or a timing within the run's noise \u00b1{data.noise_pct:.1f}%), yellow a TTFT "
                 f"timing artifact. {_n_note(data)}." + "".join(f"\n{line}." for line in na_notes(data, names)))
    return fig


def tradeoff(summary: Summary) -> Figure:
    """End-to-end throughput change (x) vs perplexity change (y), both paired with intervals."""
    fig = figure((12, 8))
    ax = fig.subplots()
    suptitle(fig, title(summary, "speed vs quality trade-off"))
    xn, yn = "throughput_tps", "ppl_compressed"
    rows = [r for r in summary.rows if not r.is_reference and r.changes[xn] is not None and r.changes[yn] is not None]
    if not rows:
        missing = yn if all(r.changes[yn] is None for r in summary.rows) else xn
        na(ax, reason(summary, missing, compared=True))
        return fig
    xs, ys = [r.changes[xn] for r in rows], [r.changes[yn] for r in rows]
    x_ends = xs + [e for r in rows for e in (r.change_intervals[xn] or ())]
    y_ends = ys + [e for r in rows for e in (r.change_intervals[yn] or ())]
    noise = summary.noise_pct
    x_lim, y_lim = fit(x_ends, include=(0.0, -noise, noise)), fit(y_ends)
    ax.set_xlim(*x_lim)
    ax.set_ylim(*y_lim)
    if x_lim[1] > 0 and y_lim[0] < 0:
        ax.fill_between([0, x_lim[1]], y_lim[0], 0, color=VERDICT_COLORS["better"], alpha=0.08, zorder=0)
        ax.text(x_lim[1], y_lim[0], "desirable: faster, perplexity not worse ", ha="right", va="bottom",
                color=VERDICT_COLORS["better"], fontsize=10)
    ax.axvspan(-noise, noise, color=NOISE_BAND, zorder=0)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    seen = set()
    for r, x, y in zip(rows, xs, ys):
        errbar(ax, x, r.change_intervals[xn], f"{r.config_key}|{xn}|ci", color=press_color(r), horizontal=True, y=y,
               cap=0.01 * (y_lim[1] - y_lim[0]))
        errbar(ax, x, r.change_intervals[yn], f"{r.config_key}|{yn}|ci", color=press_color(r),
               cap=0.006 * (x_lim[1] - x_lim[0]))
        ax.scatter([x], [y], s=60, color=press_color(r), marker=press_marker(r.press),
                   label=None if r.press in seen else r.press, zorder=5, gid=f"{r.config_key}|{xn},{yn}|change")
        seen.add(r.press)
    ax.scatter([0], [0], marker="*", s=160, color="black", label="full cache", zorder=5)
    ax.set_xlabel("end-to-end throughput change vs full cache (%, paired)  \u2192 faster")
    ax.set_ylabel("perplexity change vs full cache (%, paired)  \u2191 worse")
    legend_outside(fig, ax)
    caption(fig, f"Points: the median over prompts of each prompt's change; bars: {BOOT_TEXT}. {_n_note(summary)}. "
                 f"{_noise_note(summary)}.")
    label_points(fig, [(ax, [(x, y, r.label) for r, x, y in zip(rows, xs, ys)])], gid="tradeoff|label")
    return fig


def quality(summary: Summary) -> Figure:
    """Perplexity under compression vs keep_ratio (left: median; right: paired change)."""
    fig = figure((14, 6.5))
    left, right = fig.subplots(1, 2)
    suptitle(fig, title(summary, "perplexity under compression vs keep ratio"))
    name = "ppl_compressed"
    by_press = defaultdict(list)
    for r in summary.rows:
        if not r.is_reference and r.values[name] is not None:
            by_press[r.press].append(r)
    if not by_press:
        na(left, reason(summary, name, compared=True))
        na(right, reason(summary, name, compared=True))
        return fig
    for k, (press, rows) in enumerate(by_press.items()):
        rows.sort(key=lambda r: r.keep_ratio)
        color = press_color(rows[0])
        xs = [r.keep_ratio + dodge(k, len(by_press)) for r in rows]
        for ax, field, kind in ((left, "values", "value"), (right, "changes", "change")):
            pts = [(x, getattr(r, field)[name], r) for x, r in zip(xs, rows) if getattr(r, field)[name] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=press_marker(press), color=color,
                    label=press, gid=f"{press}|{name}|{kind}")
            if kind == "change":
                for x, _, r in pts:
                    errbar(ax, x, r.change_intervals[name], f"{r.config_key}|{name}|ci", color=color, cap=0.006)
    ref = summary.reference
    if ref is not None and ref.values[name] is not None:
        left.axhline(ref.values[name], color="black", linestyle="--", label="full cache")
    right.axhline(0, color="black", linestyle="--")
    for ax, what in ((left, "perplexity of the continuation (median)"),
                     (right, "\u0394 perplexity vs full cache (%, paired)")):
        ax.set_xlabel("keep ratio (fraction of KV entries kept at each cut)")
        ax.set_ylabel(what)
        keep_ratio_axis(ax, [r.keep_ratio for rows in by_press.values() for r in rows])  # left = no compression
    legend_outside(fig, left)
    caption(fig, f"Left: median over prompts (dashed: the full cache's); no error bars, since prompts differ. Right: "
                 f"the median of per-prompt changes vs the full cache, error bars = {BOOT_TEXT}. {_n_note(summary)}.")
    return fig


def latency(summary: Summary) -> Figure:
    """Per-step decode latency (inter-token latency) distribution per configuration."""
    fig = figure((14, 7))
    ax = fig.subplots()
    suptitle(fig, title(summary, "inter-token latency per decode step"))
    rows = [r for r in summary.rows if summary.step_latencies.get(r.config_key)]
    if not rows:
        na(ax, "no per-step latencies stored (or loaded) for this run")
        return fig
    data = [[x * 1e3 for x in summary.step_latencies[r.config_key]] for r in rows]
    parts = ax.boxplot(data, positions=range(len(rows)), widths=0.6, showfliers=True, patch_artist=True,
                       flierprops={"markersize": 2, "alpha": 0.4})
    for patch, r in zip(parts["boxes"], rows):
        patch.set_facecolor(press_color(r))
        patch.set_alpha(0.5)
    xticks(ax, [r.label for r in rows])
    ax.set_ylabel("inter-token latency (ms)")
    steps = sorted({len(summary.step_latencies[r.config_key]) for r in rows})
    caption(fig, f"Every decode step of every prompt pooled ({steps[0]}" + (f"-{steps[-1]}" if len(steps) > 1 else "")
                 + " steps per configuration). Boxes: quartiles; whiskers: 1.5 IQR; dots: outliers.")
    return fig

