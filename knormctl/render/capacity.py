"""The `knormctl capacity` table (rows are plain dicts from engine/capacity.py; no engine import)."""

from __future__ import annotations

from rich import box
from rich.table import Table

from knormctl.render.format import fmt_bytes


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def capacity_table(rows: list[dict], *, title: str) -> Table:
    """config | largest batch | peak memory | decode step (median) | tokens/s | x full (batch, tokens/s): fits 80 columns."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("configuration", "left"), ("batch", "right"), ("peak mem", "right"),
                          ("step", "right"), ("tok/s", "right"), ("x batch", "right"), ("x tok/s", "right")):
        if name == "configuration":  # the one column that wraps: the numbers stay on one line
            table.add_column(name, justify=justify, overflow="fold", max_width=26)
        else:
            table.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        batch = f"{r['largest_batch']}" + ("+" if r["capped"] else "")
        table.add_row(r["config"], batch, "n/a" if r["peak_bytes"] is None else fmt_bytes(r["peak_bytes"]),
                      "n/a" if r["step_s"] is None else f"{1000 * r['step_s']:.1f} ms",
                      "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
                      _ratio(r["batch_vs_full"]), _ratio(r["tokens_per_s_vs_full"]))
    return table
