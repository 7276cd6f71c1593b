"""Numbers as text, the same in rich tables, markdown and figures: ms below one second,
binary units for bytes, % for fractions, counts as integers, changes with a sign and a
real minus, intervals compact ("[−8.1, +4.2]": the unit is the change's)."""

from __future__ import annotations

import math

from knormctl.render.metrics import METRIC

MINUS = "\u2212"
DELTA = "\u0394"


def fmt_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            break
    return f"{n:.1f} {unit}"


def fmt_value(name: str, value: float | None) -> str:
    """A metric value for humans."""
    if value is None:
        return "N/A"
    unit = METRIC[name].unit
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "B":
        return fmt_bytes(value)
    if unit == "tok/s":  # the unit in the value, as ms and MiB are: markdown, html and the image show it too
        return f"{value:.1f} tok/s"
    if unit == "fraction":
        return f"{value * 100:.1f}%"
    if unit == "count":
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _signed(x: float, decimals: int = 1) -> str:
    d = decimals if abs(x) < 100 else 0
    return f"{x:+.{d}f}".replace("-", MINUS)


def fmt_change(name: str, change: float | None) -> str:
    """'+1.2%', '−19.0 pp'; '' when there is no change."""
    if change is None:
        return ""
    unit = " pp" if METRIC[name].points else "%"
    return _signed(change) + unit


def fmt_pp(change: float | None, decimals: int = 0) -> str:
    """An accuracy change in percentage points: '−23 pp'."""
    return "" if change is None else f"{_signed(change, decimals)} pp"


def fmt_interval(interval: tuple[float, float] | None, decimals: int = 1) -> str:
    """'[−8.1, +4.2]' (signed: it is a change's); '' when there is none."""
    if interval is None:
        return ""
    lo, hi = interval
    if lo > 0 or hi < 0:  # it excludes 0 (a verdict rests on that): no bound may print as 0
        return f"[{_nonzero(lo, decimals)}, {_nonzero(hi, decimals)}]"
    return f"[{_signed(lo, decimals)}, {_signed(hi, decimals)}]"


def _nonzero(x: float, decimals: int) -> str:
    """``_signed``, with the digits a bound needs not to round to 0: '+0.0004', not '+0.0' (read
    as an interval that touches 0 beside a 'worse' verdict)."""
    if round(x, decimals) != 0:
        return _signed(x, decimals)
    return f"{x:+.{min(12, -math.floor(math.log10(abs(x))))}f}".replace("-", MINUS)


def fmt_pct_interval(interval: tuple[float, float] | None) -> str:
    """A fraction's interval in %: '[44, 97]'."""
    if interval is None:
        return ""
    return f"[{interval[0] * 100:.0f}, {interval[1] * 100:.0f}]"


def fmt_accuracy(accuracy: float | None) -> str:
    return "N/A" if accuracy is None else f"{accuracy * 100:.0f}%"


def fmt_duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


VERDICT_WORDS = {"better": "better", "worse": "worse", "noise": "no detectable difference", "same": "identical",
                 "artifact": "timing artifact"}
