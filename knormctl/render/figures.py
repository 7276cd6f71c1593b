"""Matplotlib figures built from a ``Summary``. Each function RETURNS a Figure; only
the ``plot`` command saves it (optimum-benchmark's plot_utils habit).

Headless: the Agg backend is chosen before anything from matplotlib draws, and
figures are plain ``matplotlib.figure.Figure`` objects that pyplot never tracks, so
there is no global figure registry to leak into (nothing to close).

A metric with no value anywhere becomes a labelled empty panel ("N/A: reason").
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: before any canvas is created

from matplotlib.figure import Figure  # noqa: E402

from knormctl.render.export import cell_text, header_lines, shown_metrics  # noqa: E402
from knormctl.render.summary import METRIC, ConfigRow, Summary  # noqa: E402

DPI = 100  # saved size in pixels = figure size in inches x DPI
RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
      "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 14}
PRESS_COLORS = {"none": "#444444", "knorm": "#1f77b4", "knorm-inverse": "#d62728", "random": "#7f7f7f",
                "streaming": "#2ca02c", "snapkv": "#ff7f0e", "tova": "#8c564b", "expected-attention": "#ffbb78",
                "keydiff": "#e377c2", "pyramidkv": "#bcbd22", "adakv": "#17becf", "criticalkv": "#aec7e8"}
PRESS_MARKERS = {"knorm": "o", "knorm-inverse": "v", "random": "s", "streaming": "D", "snapkv": "^",
                 "tova": "<", "expected-attention": ">", "keydiff": "P", "pyramidkv": "X", "adakv": "*",
                 "criticalkv": "h"}
GOOD, BAD, NEUTRAL = "#2a9d4b", "#c0392b", "#9e9e9e"
DODGE = 0.008  # keep_ratio offset between presses, so equal values stay visible


def _figure(size: tuple[float, float]) -> Figure:
    with matplotlib.rc_context(RC):
        return Figure(figsize=size, dpi=DPI, layout="constrained")


def _title(summary: Summary, what: str) -> str:
    return f"{what} \u2014 {summary.header.title}, {summary.header.model}"


def _family(press: str) -> str:
    """'snapkv(window_size=32)' -> 'snapkv': parameterised specs share their press's colour."""
    return press.split("(", 1)[0]


def _color(row: ConfigRow) -> str:
    return PRESS_COLORS.get(_family(row.press), "#9467bd")


def _na(ax, reason: str) -> None:
    """An empty panel that says why it is empty."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, f"N/A: {reason}", ha="center", va="center", wrap=True, color="#666666",
            transform=ax.transAxes, fontsize=11)


def _reason(summary: Summary, name: str, compared: bool = False) -> str:
    """Why a panel is empty. ``compared``: the panel needs compressed configurations (and the
    reference, for changes) besides the metric itself."""
    if not summary.rows:
        return "no samples stored for this run"
    if compared and all(r.is_reference for r in summary.rows):
        return "only the full-cache reference was run"
    if name == "peak_mem_bytes":
        reasons = sorted({r.peak_mem_reason for r in summary.rows if r.peak_mem_reason})
        if reasons:
            return "; ".join(reasons)
    if name in ("ppl_compressed", "ppl_context") and summary.header.task == "passkey":
        return "no perplexity in a passkey run"
    if compared and summary.reference is None:
        return "no full-cache reference in this run"
    return f"no {METRIC[name].label} stored for this run"


def _xticks(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")


def _scale(name: str) -> tuple[float, str]:
    unit = METRIC[name].unit
    return {"s": (1e3, "ms"), "B": (1 / 2**20, "MiB"), "tok/s": (1.0, "tokens/s")}.get(unit, (1.0, ""))


def _bars(ax, summary: Summary, name: str, title: str) -> None:
    """One bar per configuration: the median, whiskers from the smallest to the largest sample."""
    rows = summary.rows
    if all(r.values[name] is None for r in rows):
        ax.set_title(title)
        _na(ax, _reason(summary, name))
        return
    k, unit = _scale(name)
    for i, r in enumerate(rows):
        v = r.values[name]
        if v is None:
            ax.text(i, 0, "N/A", ha="center", va="bottom", color="#666666")
            continue
        ax.bar(i, v * k, color=_color(r), alpha=0.6 if r.is_reference else 0.9, yerr=_whiskers(r, name, k),
               capsize=3)
    ax.set_title(title)
    ax.set_ylabel(f"{METRIC[name].label} ({unit})" if unit else METRIC[name].label)
    _xticks(ax, [r.label for r in rows])


def _whiskers(row: ConfigRow, name: str, scale: float):
    """Asymmetric error bar (median - min, max - median), or None for one sample or a mean."""
    span, v = row.span.get(name), row.values[name]
    if span is None or v is None or span[0] == span[1]:
        return None
    return [[max(0.0, (v - span[0]) * scale)], [max(0.0, (span[1] - v) * scale)]]


def _ttft_artifacts(summary: Summary) -> set[str]:
    return {r.config_key for r in summary.rows if r.verdicts["ttft_s"] == "artifact"}


def _dedup_legend(ax, loc: str = "best") -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), loc=loc)


def _change_bars(ax, summary: Summary, name: str, title: str) -> None:
    rows = [r for r in summary.rows if not r.is_reference]
    if not rows or all(r.changes[name] is None for r in rows):
        ax.set_title(title)
        _na(ax, _reason(summary, name, compared=True))
        return
    if METRIC[name].timing:
        ax.axhspan(-summary.noise_pct, summary.noise_pct, color="#dddddd", zorder=0,
                   label=f"noise \u00b1{summary.noise_pct:.1f}%")
    artifacts = _ttft_artifacts(summary) if name == "ttft_s" else set()
    for i, r in enumerate(rows):
        c = r.changes[name]
        if c is None:
            ax.text(i, 0, "N/A", ha="center", va="bottom", color="#666666")
            continue
        if r.config_key in artifacts:  # compression cannot change the prefill: not a gain, not a loss
            ax.bar(i, c, color="white", edgecolor=NEUTRAL, hatch="//", label="timing artifact (see report)")
            continue
        ax.bar(i, c, color={"better": GOOD, "worse": BAD}.get(r.verdicts[name] or "", NEUTRAL))
    if artifacts or METRIC[name].timing:
        _dedup_legend(ax)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(title)
    ax.set_ylabel("change vs full cache (%)")
    _xticks(ax, [r.label for r in rows])


def comprehensive(summary: Summary) -> Figure:
    """Six panels: TTFT, TPOT, throughput, TTFT change, throughput change, perplexity."""
    fig = _figure((16, 9))
    axes = fig.subplots(2, 3)
    _bars(axes[0, 0], summary, "ttft_s", "time to first token (median)")
    _bars(axes[0, 1], summary, "tpot_s", "time per output token (median)")
    _bars(axes[0, 2], summary, "throughput_tps", "decode throughput (median)")
    _change_bars(axes[1, 0], summary, "ttft_s", "TTFT change")
    _change_bars(axes[1, 1], summary, "throughput_tps", "throughput change")
    ax = axes[1, 2]
    _bars(ax, summary, "ppl_compressed", "perplexity under compression (median)")
    ctx = [r.values["ppl_context"] for r in summary.rows if r.values["ppl_context"] is not None]
    if ctx and any(r.values["ppl_compressed"] is not None for r in summary.rows):
        ax.axhline(min(ctx), color="black", linestyle="--", linewidth=1, label="ppl of the prompt (full model)")
        ax.legend(loc="lower right")
    fig.suptitle(_title(summary, "KnormPress benchmark"))
    return fig


SUMMARY_METRICS = ("ttft_s", "tpot_s", "itl_p90_s", "throughput_tps", "peak_mem_bytes", "kv_bytes_peak",
                   "kv_bytes_final", "ppl_compressed", "token_match", "accuracy")


def summary(data: Summary) -> Figure:
    """Every metric as % of the full-cache reference (100% = no change), one row per configuration."""
    fig = _figure((14, 8))
    ax = fig.subplots()
    ref = data.reference
    names = [n for n in SUMMARY_METRICS if n in shown_metrics(data)]
    rows = [r for r in data.rows if not r.is_reference]
    fig.suptitle(_title(data, "all metrics relative to the full cache (100%)"))
    if ref is None or not rows:
        _na(ax, "no full-cache reference in this run" if ref is None else "only the full-cache reference was run")
        return fig
    import numpy as np

    pct = np.full((len(rows), len(names)), np.nan)
    goodness = np.zeros_like(pct)
    for i, r in enumerate(rows):
        for j, n in enumerate(names):
            v, base = r.values[n], ref.values[n]
            if v is not None and base:
                pct[i, j] = v / base * 100.0
                sign = 1 if METRIC[n].better == "higher" else -1
                # within noise, or a timing artifact: neither better nor worse
                goodness[i, j] = sign * (pct[i, j] - 100.0) if r.verdicts[n] in ("better", "worse") else 0.0
    artifacts = _ttft_artifacts(data)
    ax.imshow(np.clip(goodness, -30, 30), cmap="RdYlGn", vmin=-30, vmax=30, aspect="auto")
    for i, r in enumerate(rows):
        for j, n in enumerate(names):
            text = "N/A" if math.isnan(pct[i, j]) else f"{pct[i, j]:.0f}%"
            if n == "ttft_s" and r.config_key in artifacts:
                text += "*"
            ax.text(j, i, text, ha="center", va="center", fontsize=10, color="#222222")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([METRIC[n].label for n in names], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r.label for r in rows])
    ax.set_xlabel("metric (value as % of the full cache; green = better, red = worse, pale = within noise"
                  + ("; * = TTFT change beyond noise: a timing artifact, see the report)" if artifacts else ")"))
    ax.set_ylabel("configuration")
    return fig


def tradeoff(summary: Summary) -> Figure:
    """Throughput change (x) vs perplexity change (y); bottom right is the place to be."""
    fig = _figure((11, 8))
    ax = fig.subplots()
    fig.suptitle(_title(summary, "speed vs quality trade-off"))
    rows = [r for r in summary.rows if not r.is_reference
            and r.changes["throughput_tps"] is not None and r.changes["ppl_compressed"] is not None]
    if not rows:
        missing = "ppl_compressed" if all(r.changes["ppl_compressed"] is None for r in summary.rows) else "throughput_tps"
        _na(ax, _reason(summary, missing, compared=True))
        return fig
    xs = [r.changes["throughput_tps"] for r in rows]
    ys = [r.changes["ppl_compressed"] for r in rows]
    pad_x = max(2 * summary.noise_pct, max(abs(x) for x in xs) * 1.25)
    pad_y = max(1.0, max(abs(y) for y in ys) * 1.25)
    ax.set_xlim(-pad_x, pad_x)
    ax.set_ylim(-pad_y, pad_y)
    ax.fill_between([0, pad_x], -pad_y, 0, color=GOOD, alpha=0.10)
    ax.text(pad_x * 0.97, -pad_y * 0.95, "desirable: faster and\nlower or equal perplexity",
            ha="right", va="bottom", color=GOOD, fontsize=11)
    ax.axvspan(-summary.noise_pct, summary.noise_pct, color="#eeeeee", zorder=0,
               label=f"timing noise \u00b1{summary.noise_pct:.1f}%")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    seen = set()
    for r, x, y in zip(rows, xs, ys):
        ax.scatter(x, y, s=60, color=_color(r), marker=PRESS_MARKERS.get(_family(r.press), "o"),
                   label=None if r.press in seen else r.press, zorder=3)
        seen.add(r.press)
        ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.scatter(0, 0, marker="*", s=160, color="black", label="full cache", zorder=3)
    ax.set_xlabel("throughput change vs full cache (%)  \u2192 faster")
    ax.set_ylabel("perplexity change vs full cache (%)  \u2191 worse")
    ax.legend(loc="upper left")
    return fig


def table(summary: Summary) -> Figure:
    """The report's per-configuration numbers as an image."""
    fig = _figure((18, 8))
    ax = fig.subplots()
    ax.axis("off")
    fig.suptitle(_title(summary, "report") + "\n" + "; ".join(header_lines(summary)[2:4]), fontsize=12)
    if not summary.rows:
        _na(ax, "no samples stored")
        return fig
    names = [n for n in shown_metrics(summary) if n != "compress_time_s"]
    reasons = sorted({r.peak_mem_reason for r in summary.rows if r.peak_mem_reason})
    notes = [f"peak memory N/A ({i + 1}): {textwrap.shorten(why, 160)}" for i, why in enumerate(reasons)]

    def cell(r: ConfigRow, n: str) -> str:
        if n == "peak_mem_bytes" and r.peak_mem_reason:
            return f"N/A ({reasons.index(r.peak_mem_reason) + 1})"
        return cell_text(r, n).replace(" (", "\n(", 1)

    cells = [[r.label + (f"\n[{r.dataset}]" if r.dataset else ""), f"{r.n_samples} ({r.n_failed})"]
             + [cell(r, n) for n in names] for r in summary.rows]
    header = ["configuration", "n (failed)"] + [textwrap.fill(METRIC[n].label, 12) for n in names]
    foot = 0.04 * (len(notes) + bool(summary.flags))
    height = min(1.0 - foot, 0.09 * (len(cells) + 1))  # rows of comfortable height, never past the notes
    tbl = ax.table(cellText=cells, colLabels=header, cellLoc="center", bbox=[0, 1.0 - height, 1, height])
    tbl.auto_set_font_size(False)
    tbl.set_fontsize(10 if len(cells) <= 12 else 8)
    for (i, j), c in tbl.get_celld().items():
        if i == 0:
            c.set_text_props(weight="bold")
            c.set_facecolor("#e8e8e8")
        elif j >= 2:
            verdict = summary.rows[i - 1].verdicts[names[j - 2]]
            c.set_facecolor({"better": "#dff3e4", "worse": "#f8dddd", "artifact": "#fff3cd"}.get(verdict or "", "white"))
    if summary.flags:
        notes.append(f"{len(summary.flags)} honesty flag(s) apply: run `knormctl report --run-id "
                     f"{summary.header.run_ids[0]}` to read them before quoting these numbers.")
    for k, note in enumerate(notes):
        ax.text(0, 0.0 + 0.04 * (len(notes) - 1 - k), note, transform=ax.transAxes, fontsize=10, va="bottom")
    return fig


def _vs_keep_ratio(summary: Summary, name: str, what: str, ylabel: str, scale: float = 1.0,
                   error_bars: bool = True) -> Figure:
    """A metric against keep_ratio: one line per press, the full cache as a dashed line."""
    fig = _figure((11, 7))
    ax = fig.subplots()
    fig.suptitle(_title(summary, what))
    by_press = defaultdict(list)
    for r in summary.rows:
        if not r.is_reference and r.values[name] is not None:
            by_press[r.press].append(r)
    if not by_press:
        _na(ax, _reason(summary, name, compared=True))
        return fig
    for k, (press, rows) in enumerate(by_press.items()):
        rows.sort(key=lambda r: r.keep_ratio)
        bars = [_whiskers(r, name, scale) or [[0.0], [0.0]] for r in rows]
        ax.errorbar([r.keep_ratio + k * DODGE for r in rows], [r.values[name] * scale for r in rows],
                    yerr=[[b[0][0] for b in bars], [b[1][0] for b in bars]] if error_bars else None,
                    marker=PRESS_MARKERS.get(press, "o"), capsize=4, markersize=7, color=PRESS_COLORS.get(press),
                    label=press)
    ref = summary.reference
    if ref is not None and ref.values[name] is not None:
        ax.axhline(ref.values[name] * scale, color="black", linestyle="--", label="full cache")
    ax.set_xlabel("keep ratio (fraction of KV entries kept at each cut)")
    ax.set_ylabel(ylabel)
    ax.invert_xaxis()  # left = no compression, right = most compression
    ax.legend(loc="best")
    return fig


def quality(summary: Summary) -> Figure:
    """ppl_compressed vs keep_ratio, one line per press, error bars = 1 s.d. over samples."""
    return _vs_keep_ratio(summary, "ppl_compressed", "perplexity under compression vs keep ratio",
                          "perplexity of the continuation (median, \u00b11 s.d. over samples)")


def latency(summary: Summary) -> Figure:
    """Per-step decode latency (inter-token latency) distribution per configuration."""
    fig = _figure((14, 7))
    ax = fig.subplots()
    fig.suptitle(_title(summary, "inter-token latency per decode step"))
    rows = [r for r in summary.rows if summary.step_latencies.get(r.config_key)]
    if not rows:
        _na(ax, "no per-step latencies stored (or loaded) for this run")
        return fig
    data = [[x * 1e3 for x in summary.step_latencies[r.config_key]] for r in rows]
    parts = ax.boxplot(data, positions=range(len(rows)), widths=0.6, showfliers=True, patch_artist=True,
                       flierprops={"markersize": 2, "alpha": 0.4})
    for patch, r in zip(parts["boxes"], rows):
        patch.set_facecolor(_color(r))
        patch.set_alpha(0.5)
    _xticks(ax, [r.label for r in rows])
    ax.set_ylabel("inter-token latency (ms)")
    ax.set_xlabel("configuration (boxes: quartiles; whiskers: 1.5 IQR; dots: outliers)")
    return fig


def passkey_accuracy(summary: Summary) -> Figure:
    """Passkey accuracy vs keep_ratio, one line per press (all lengths and depths pooled)."""
    fig = _vs_keep_ratio(summary, "accuracy", "passkey retrieval accuracy vs keep ratio", "passkey accuracy (%)",
                         scale=100.0, error_bars=False)
    fig.axes[0].set_ylim(-5, 105)
    return fig


def _heatmap_config(summary: Summary) -> str | None:
    """The knorm configuration that compresses most, else the first press, else the reference."""
    keys = {c.config_key for c in summary.passkey_cells}
    rows = [r for r in summary.rows if r.config_key in keys]
    knorm = sorted((r for r in rows if r.press == "knorm"), key=lambda r: r.keep_ratio)
    others = [r for r in rows if not r.is_reference]
    pick = knorm or others or rows
    return pick[0].config_key if pick else None


def passkey_heatmap(summary: Summary, config_key: str | None = None) -> Figure:
    """Accuracy by passkey depth (y) and context length (x) for one configuration."""
    fig = _figure((10, 7))
    ax = fig.subplots()
    key = config_key or _heatmap_config(summary)
    label = next((r.label for r in summary.rows if r.config_key == key), key or "")
    fig.suptitle(_title(summary, f"passkey accuracy by depth and length: {label}"))
    cells = [c for c in summary.passkey_cells if c.config_key == key]
    if not cells:
        _na(ax, "no passkey answers stored for this run")
        return fig
    import numpy as np

    depths = sorted({c.passkey_depth for c in cells})
    lengths = sorted({c.passkey_length for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c.passkey_depth), lengths.index(c.passkey_length)] = (c.accuracy or 0.0) * 100
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for c in cells:
        extreme = c.accuracy is not None and not 0.25 < c.accuracy < 0.75  # dark red / dark green cells
        ax.text(lengths.index(c.passkey_length), depths.index(c.passkey_depth), f"{c.correct}/{c.n} correct",
                ha="center", va="center", fontsize=12, color="white" if extreme else "black")
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([str(x) for x in lengths])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth (% of the context)")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return fig


@dataclass(frozen=True)
class FigureSpec:
    name: str
    filename: str  # without extension; the first four keep the old visualize_results.py names
    draw: Callable[[Summary], Figure]
    passkey_only: bool = False


FIGURES = (
    FigureSpec("comprehensive", "knormpress_comprehensive", comprehensive),
    FigureSpec("summary", "knormpress_summary", summary),
    FigureSpec("tradeoff", "knormpress_tradeoff", tradeoff),
    FigureSpec("table", "knormpress_table", table),
    FigureSpec("quality", "knormpress_quality", quality),
    FigureSpec("latency", "knormpress_latency", latency),
    FigureSpec("passkey_accuracy", "knormpress_passkey_accuracy", passkey_accuracy, passkey_only=True),
    FigureSpec("passkey_heatmap", "knormpress_passkey_heatmap", passkey_heatmap, passkey_only=True),
)


def figures_for(s: Summary) -> list[FigureSpec]:
    """The figures that make sense for this summary (passkey ones only for passkey runs)."""
    is_passkey = s.header.task == "passkey" or bool(s.passkey)
    return [f for f in FIGURES if is_passkey or not f.passkey_only]

