"""What every figure shares: size and style, verdict colours (the report's), error bars
drawn as inspectable artists, captions, fitted axes, and panels that say why they are empty.

Artists that carry a number get a gid "config_key|metric|kind" (kind: value, change, ci,
text), so a test can read back what was drawn and compare it with the json.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: before any canvas is created
# Names are drawn as they are: a model path or group with '$...$' in it was read as math
# notation (a ValueError for `plot` and the html report). No figure uses math text.
matplotlib.rcParams["text.parse_math"] = False

from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.textpath import TextPath  # noqa: E402

from knormctl.render.metrics import METRIC  # noqa: E402
from knormctl.render.rows import ConfigRow  # noqa: E402
from knormctl.render.summary import Summary  # noqa: E402
from knormctl.stats import CONFIDENCE  # noqa: E402

DPI = 100  # saved size in pixels = figure size in inches x DPI
RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
      "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 14}
PRESS_COLORS = {"none": "#444444", "knorm": "#1f77b4", "knorm-inverse": "#d62728", "random": "#7f7f7f",
                "streaming": "#2ca02c", "snapkv": "#ff7f0e", "tova": "#8c564b", "expected-attention": "#ffbb78",
                "keydiff": "#e377c2", "pyramidkv": "#bcbd22", "adakv": "#17becf", "criticalkv": "#aec7e8"}
PRESS_MARKERS = {"knorm": "o", "knorm-inverse": "v", "random": "s", "streaming": "D", "snapkv": "^",
                 "tova": "<", "expected-attention": ">", "keydiff": "P", "pyramidkv": "X", "adakv": "*",
                 "criticalkv": "h"}
# The report's verdicts (render.paired.verdict), as fills: strong for bars, pale for table cells.
VERDICT_COLORS = {"better": "#2a9d4b", "worse": "#c0392b", "noise": "#b0b0b0", "same": "#b0b0b0",
                  "artifact": "#e0b000", None: "#b0b0b0"}
VERDICT_FILLS = {"better": "#dff3e4", "worse": "#f8dddd", "artifact": "#fff3cd"}
NOISE_BAND = "#e6e6e6"
DODGE = 0.008  # keep_ratio offset between presses, so equal values stay visible
MAX_DODGE = 0.03  # ...and at most this far apart in all, however many presses
CI_TEXT = f"{CONFIDENCE:.0%} interval"
BOOT_TEXT = f"{CONFIDENCE:.0%} bootstrap interval over prompts"


def keep_ratio_axis(ax, xs: list[float]) -> None:
    """Keep ratios on x, left = no compression. One keep ratio alone got an axis 0.012 wide, on
    which a point's error-bar caps (sized in keep-ratio units) spanned the whole panel."""
    if xs and max(xs) - min(xs) < 0.05:
        mid = (max(xs) + min(xs)) / 2
        ax.set_xlim(mid - 0.1, mid + 0.1)
    ax.invert_xaxis()


def dodge(k: int, n: int) -> float:
    """Press ``k`` of ``n``'s offset from its keep ratio: centred on it, and never further than
    MAX_DODGE / 2 (with ten presses, k * DODGE drew the tenth at 0.322 for keep 0.25)."""
    step = min(DODGE, MAX_DODGE / max(1, n - 1))
    return (k - (n - 1) / 2) * step


def figure(size: tuple[float, float]) -> Figure:
    with matplotlib.rc_context(RC):
        return Figure(figsize=size, dpi=DPI, layout="constrained")


def title(summary: Summary, what: str) -> str:
    """The figure's title; a second line for a run that is not complete (a shared PNG must not
    pass for a finished run)."""
    h = summary.header
    text = f"{what} \u2014 {h.title}, {h.model}"
    if h.status != "complete":
        text += f"\n{h.status.replace('_', ' ').upper()}: {h.cells_text}"
    return text


CAPTION_CHARS_PER_INCH = 14  # 9 pt DejaVu Sans: about 0.07 inch per character
TITLE_CHARS_PER_INCH = 10  # 12 pt (rc figure.titlesize "large")


def suptitle(fig: Figure, text: str, fontsize: float | None = None, room: float = 0.55) -> None:
    """The figure's title, each line wrapped to ``room`` of the figure's width: centred, it then
    stays clear of the legend outside the axes on the right, and of the figure's edges (a long
    model path ran off both and under the legend)."""
    import textwrap

    per_inch = TITLE_CHARS_PER_INCH * 12 / (fontsize or 12)
    width = max(24, int(fig.get_figwidth() * room * per_inch))
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.split("\n")), fontsize=fontsize)


def caption(fig: Figure, text: str) -> None:
    """A caption under the figure, wrapped to its width (constrained layout keeps room for it)."""
    import textwrap

    width = int(fig.get_figwidth() * CAPTION_CHARS_PER_INCH)
    lines = [textwrap.fill(par, width) for par in text.split("\n")]
    fig.supxlabel("\n".join(lines), x=0.01, ha="left", fontsize=9, color="#333333")


def family(press: str) -> str:
    """'snapkv(window_size=32)' -> 'snapkv': parameterised specs share their press's colour and marker."""
    return press.split("(", 1)[0]


def press_color(row: ConfigRow | str) -> str:
    press = row if isinstance(row, str) else row.press
    return PRESS_COLORS.get(family(press), "#9467bd")


def press_marker(press: str) -> str:
    return PRESS_MARKERS.get(family(press), "o")


def na(ax, reason: str) -> None:
    """An empty panel that says why it is empty."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, f"N/A: {reason}", ha="center", va="center", wrap=True, color="#666666",
            transform=ax.transAxes, fontsize=11)


def reason(summary: Summary, name: str, compared: bool = False) -> str:
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
    if compared and summary.reference is None:
        return "no full-cache reference in this run"
    reasons = sorted({r.na_reasons[name] for r in summary.rows if name in r.na_reasons})
    if reasons:
        return f"no {METRIC[name].label}: " + "; ".join(reasons)
    return f"no {METRIC[name].label} stored for this run"


def xticks(ax, labels: list[str]) -> None:
    """Configuration labels under bars: level for a few, slanted for more, upright and smaller
    beyond a dozen (slanted at 30 degrees, 31 labels ran into each other)."""
    ax.set_xticks(range(len(labels)))
    if len(labels) > 12:
        ax.set_xticklabels(labels, rotation=90, ha="center", fontsize=7)
    else:
        ax.set_xticklabels(labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")


def scale(name: str) -> tuple[float, str]:
    """Display scale and unit of a metric's values (changes are always % or pp)."""
    unit = METRIC[name].unit
    return {"s": (1e3, "ms"), "B": (1 / 2**20, "MiB"), "tok/s": (1.0, "tokens/s"),
            "fraction": (100.0, "%")}.get(unit, (1.0, ""))


def errbar(ax, x: float, interval: tuple[float, float] | None, gid: str, k: float = 1.0, color: str = "black",
           cap: float = 0.12, horizontal: bool = False, y: float | None = None) -> None:
    """An interval drawn as a line with caps (gid on the line: its segment is the interval)."""
    if interval is None:
        return
    lo, hi = interval[0] * k, interval[1] * k
    if horizontal:
        ax.hlines([y], lo, hi, colors=color, linewidth=1.2, gid=gid, zorder=4)
        ax.vlines([lo, hi], y - cap, y + cap, colors=color, linewidth=1.2, zorder=4)
    else:
        ax.vlines([x], lo, hi, colors=color, linewidth=1.2, gid=gid, zorder=4)
        ax.hlines([lo, hi], x - cap, x + cap, colors=color, linewidth=1.2, zorder=4)


def fit(values: list[float], *, include: tuple[float, ...] = (0.0,), pad: float = 0.12) -> tuple[float, float]:
    """Axis limits around the data (and ``include``, e.g. 0 and the noise band), with a margin."""
    xs = [v for v in values if v is not None] + list(include)
    lo, hi = min(xs), max(xs)
    span = hi - lo or max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


def legend_outside(fig: Figure, ax, where: str = "outside right upper") -> None:
    """One legend outside the axes, so it never covers data (duplicate labels merged)."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        fig.legend(unique.values(), unique.keys(), loc=where)


def label_points(fig: Figure, panels: list[tuple[object, list[tuple[float, float, str]]]], fontsize: float = 9,
                 gid: str | None = None) -> None:
    """Name each point (x, y, text) of each panel (ax, items) next to it without running labels
    over each other or over other points: presses at one keep ratio sit close together, and a
    fixed offset printed their names on top of each other. Greedy, in the order given: the first
    spot around the point (right, left, then further above and below, with a thin line to the
    point) whose box is clear of the labels placed so far, of every point's marker, of the
    interval lines (the panel's ``hlines``/``vlines``) and of the axes' edges; where none is
    clear, the least covered one. Needs the axes' limits set; the figure's layout is settled
    once, first, so that points convert to points (the labels are kept out of the layout, so it
    stays settled for every panel)."""
    fig.draw_without_rendering()
    for ax, items in panels:
        _label_panel(ax, items, fontsize, gid)


def _line_boxes(ax, to_pt: float, frame: tuple[float, float, float, float]) -> list[tuple]:
    """A thin box (in points) around each level or upright segment of the panel's line
    collections -- the intervals and their caps, drawn with ``hlines``/``vlines`` -- cut to the
    panel: a label over an interval hid both. (A slanted segment's box would cover a whole
    region; no figure draws one this way.)"""
    x0, y0, x1, y1 = frame
    pad = 1.5  # half a line's width and a little air
    boxes = []
    for coll in ax.collections:
        if not isinstance(coll, LineCollection):
            continue
        to_display = coll.get_transform()
        for seg in coll.get_segments():
            pts = to_display.transform(seg) * to_pt
            lo_x, hi_x = max(pts[:, 0].min(), x0), min(pts[:, 0].max(), x1)
            lo_y, hi_y = max(pts[:, 1].min(), y0), min(pts[:, 1].max(), y1)
            if lo_x <= hi_x and lo_y <= hi_y and min(hi_x - lo_x, hi_y - lo_y) < 1.0:
                boxes.append((lo_x - pad, lo_y - pad, hi_x + pad, hi_y + pad))
    return boxes


def _label_panel(ax, items: list[tuple[float, float, str]], fontsize: float, gid: str | None) -> None:
    to_pt = 72.0 / ax.figure.dpi
    where = [tuple(v * to_pt for v in ax.transData.transform((x, y))) for x, y, _ in items]
    frame = ax.get_window_extent()
    x0, y0, x1, y1 = (v * to_pt for v in (frame.x0, frame.y0, frame.x1, frame.y1))
    h = 1.3 * fontsize
    r = 5.0  # half a marker
    taken = [(px - r, py - r, px + r, py + r) for px, py in where] + _line_boxes(ax, to_pt, (x0, y0, x1, y1))

    def covered(box) -> float:
        out = sum(max(0.0, min(box[2], b[2]) - max(box[0], b[0])) * max(0.0, min(box[3], b[3]) - max(box[1], b[1]))
                  for b in taken)
        inside = max(0.0, min(box[2], x1) - max(box[0], x0)) * max(0.0, min(box[3], y1) - max(box[1], y0))
        return out + (box[2] - box[0]) * (box[3] - box[1]) - inside

    for (x, y, text), (px, py) in zip(items, where):
        w = TextPath((0, 0), text, size=fontsize).get_extents().width + 2  # in points, as drawn
        spots = [(dx, dy) for tier in range(5) for dy in ((3 + tier * h, -3 - h - tier * h) if tier else (3, -3 - h))
                 for dx in (6, -6 - w)]
        best = None
        for dx, dy in spots:
            box = (px + dx, py + dy, px + dx + w, py + dy + h)
            cost = covered(box)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        _, dx, dy, box = best
        taken.append(box)
        far = dy > 3 or dy < -3 - h  # moved off the point: a thin line tells whose name it is
        ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                          ha="left", va="bottom", gid=gid,
                          arrowprops=dict(arrowstyle="-", color="#777777", linewidth=0.8, shrinkA=0, shrinkB=4)
                          if far else None)
        ann.set_in_layout(False)
