"""`knormctl presses`: the registered presses, their modes and parameters. Needs no model."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from knormctl.cli._common import error_boundary, wrapped


def _value(v):
    return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)


def presses(
    kvpress: Annotated[bool, typer.Option("--kvpress", help="Also list kvpress's presses (kvpress:Name; needs kvpress installed).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON on stdout.")] = False,
) -> None:
    """List the presses: name, compression modes, parameters with their defaults, what each does.

    Use them as --presses knorm,snapkv(window_size=32),adakv(base=tova) --compress-mode prefill (adakv cuts once, after the prompt); --presses all runs every press that supports the compression mode.
    """
    from knormctl.press_spec import format_press_spec, format_spec_value
    from knormctl.engine.presses.base import catalog

    with error_boundary():
        rows = catalog()
        if kvpress:
            from knormctl.engine.presses.kvpress_backend import kvpress_catalog

            rows += kvpress_catalog()
    if json_out:
        print(json.dumps([{**r, "params": {k: _value(v) for k, v in r["params"].items()}} for r in rows], indent=2))
        return
    def say(text: str, indent: str = "", hang: str = "        ") -> None:
        print(wrapped(text, indent, hang))

    for r in rows:
        params = ", ".join(f"{k}={format_spec_value(v) if isinstance(v, (bool, int, float)) else v}"
                           for k, v in r["params"].items())
        head = f"{r['name']}({params})" if params else format_press_spec(r["name"])
        say(f"{head}  [{', '.join(r['modes'])}]")
        extra = f" (also uses {', '.join('--' + n.replace('_', '-') for n in r['run_wide'])})" if r["run_wide"] else ""
        say(f"{r['description']}{extra}", indent="    ", hang="    ")
    if not kvpress:
        say("kvpress:ClassName(...) runs any press of NVIDIA's kvpress (prefill mode; pip install "
            "'knormctl[kvpress]'); list them with --kvpress.", hang="")
