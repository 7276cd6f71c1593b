"""Press specs: ``name`` or ``name(key=value,...)``, parsed, written canonically and checked
against the registry. Torch-free except ``resolve_press_list`` (it asks the engine)."""

from __future__ import annotations

import math
import re

from knormctl.errors import UsageError as ConfigError
from knormctl.options import unknown_choice

# The registered presses (engine/presses, where each is defined), torch-free for the CLI and the
# report's ordering; a test keeps the two equal. kvpress:ClassName specs come on top (optional).
PRESS_NAMES = ("none", "knorm", "knorm-inverse", "random", "streaming", "keydiff", "snapkv", "tova", "pyramidkv",
               "expected-attention", "adakv", "criticalkv")
# Presses that do no work inside a forward (no hooks: they score the cache after it), so with
# their first cut after the first token the prefill is the full cache's own work (the report's
# TTFT "artifact"); a test keeps it equal to the registry's.
QUIET_IN_FORWARD = ("knorm", "knorm-inverse", "random", "streaming", "keydiff")
PRESS_SPEC_MAX = 64  # chars: the store's press column

# A press spec: ``name`` or ``name(key=value,...)``; a value is a number, true/false, a word, or
# another press spec (``adakv(base=snapkv(window_size=32))``). Torch-free: the engine validates
# names and parameters (``engine.presses.resolve_press``), lazily.

_SPEC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*\Z")


def split_top_level(text: str, what: str = "--presses") -> list[str]:
    """'a,b(x=1,y=2),c' -> ['a', 'b(x=1,y=2)', 'c']: commas inside parentheses do not split."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"{what}: unbalanced ')' in {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ConfigError(f"{what}: unclosed '(' in {text!r}")
    items.append(text[start:].strip())
    return items


def _spec_value(text: str, spec: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        name, params = parse_press_spec(text)  # a word or a nested press spec, kept as its text
        return format_press_spec(name, params)
    if not math.isfinite(value):
        raise ConfigError(f"--presses: {text!r} is not a finite number (in {spec!r})")
    return value


def parse_press_spec(spec: str) -> tuple[str, tuple[tuple[str, object], ...]]:
    """'snapkv(window_size=32)' -> ('snapkv', (('window_size', 32),)); syntax only."""
    text = str(spec).strip()
    name, _, rest = text.partition("(")
    name = name.strip()
    if not _SPEC_NAME.match(name):
        raise ConfigError(f"--presses: malformed press spec {spec!r} (expected name or name(key=value,...))")
    if not rest:
        return name, ()
    if not rest.endswith(")"):
        raise ConfigError(f"--presses: malformed press spec {spec!r} (text after the closing parenthesis)")
    body = rest[:-1].strip()
    params: list[tuple[str, object]] = []
    for item in split_top_level(body) if body else []:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key.isidentifier() or not value:
            raise ConfigError(f"--presses: {item!r} in {spec!r} is not key=value")
        if key in (k for k, _ in params):
            raise ConfigError(f"--presses: {key} given twice in {spec!r}")
        params.append((key, _spec_value(value, spec)))
    return name, tuple(params)


def format_spec_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value) if isinstance(value, float) \
        else str(value)


def format_press_spec(name: str, params=()) -> str:
    """The inverse of ``parse_press_spec``: ('snapkv', (('window_size', 32),)) -> 'snapkv(window_size=32)'."""
    params = tuple(params)
    if not params:
        return name
    return f"{name}({','.join(f'{k}={format_spec_value(v)}' for k, v in params)})"


def parse_press_list(text: str) -> list[str]:
    """--presses: 'knorm,snapkv(window_size=32),all' -> press specs (syntax checked; ``all`` kept as
    is and expanded by ``RunConfig.validate``, which knows the compression mode)."""
    if not str(text).strip():
        raise ConfigError("--presses: empty list")
    specs = []
    for item in split_top_level(str(text)):
        if not item:
            raise ConfigError(f"--presses: malformed list {text!r} (an empty item)")
        spec = item if item == "all" else format_press_spec(*parse_press_spec(item))
        name = spec.split("(", 1)[0]
        if name != "all" and not name.startswith("kvpress:") and name not in PRESS_NAMES:
            raise unknown_choice("--presses", "press", name, PRESS_NAMES + ("all", "kvpress:ClassName"))
        if spec in specs:
            raise ConfigError(f"--presses: duplicate press {spec!r} in {text!r}")
        specs.append(spec)
    return specs


def resolve_press_list(specs: list[str], mode: str) -> list[str]:
    """Expand ``all`` (every registered press that supports ``mode``), validate every spec against
    the press registry (imports the engine: torch) and write each one canonically."""
    from knormctl.engine.presses import PRESSES, make_press, resolve_press

    out: list[str] = []
    for spec in specs:
        if spec == "all":
            names = [n for n in PRESSES if n != "none" and mode in make_press(n).modes]
            out += [n for n in names if n not in out]
            continue
        name, params = parse_press_spec(spec)
        canonical = format_press_spec(name, resolve_press(name, params, mode))
        if canonical in out:
            same = "" if spec == canonical else f" (the same as {canonical!r})"
            raise ConfigError(f"--presses: duplicate press {spec!r}{same}")
        if len(canonical) > PRESS_SPEC_MAX:
            raise ConfigError(f"--presses: {canonical!r} is longer than {PRESS_SPEC_MAX} characters")
        out.append(canonical)
    return out
