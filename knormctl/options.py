"""Option values from the command line and study files: lists, keep ratios, choices with a
did-you-mean. Torch-free; every error is one line naming the flag (exit 2)."""

from __future__ import annotations

import difflib
import math

from knormctl.errors import UsageError as ConfigError  # bad input: one line on stderr, exit 2


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


def check_device_map(device_map: str, device: str) -> None:
    """Refuse a device map knormctl does not pass on, or one given with an explicit device
    (the map places the model itself): the one check, for the CLI's config and load_model."""
    if device_map not in DEVICE_MAPS:
        raise unknown_choice("--device-map", "strategy", device_map, DEVICE_MAPS)
    if device != "auto":
        raise ConfigError(f"--device-map {device_map} places the model on the devices itself: "
                          f"leave out --device {device}")


DECODE_STEPS = ("launched", "static", "graph")  # how a decode step runs (engine/graphstep.py)


def check_decode_step(step: str, device: str, device_map: str | None) -> None:
    """Refuse a decode step that cannot run where the model goes: the static step needs the model
    on one device, its CUDA graph a CUDA device. (A model that lands on the CPU under --device
    auto is refused after it loads, before anything is stored.)"""
    if step not in DECODE_STEPS:
        raise unknown_choice("--decode-step", "decode step", step, DECODE_STEPS)
    if step != "launched" and device_map is not None:
        raise ConfigError(f"--decode-step {step} needs the model on one device (--device-map spreads it)")
    if step == "graph" and device in ("cpu", "mps"):
        raise ConfigError(f"--decode-step graph records a CUDA graph: it needs a CUDA device (--device is {device})")


def check_loaded_decode_step(step: str, device: str) -> None:
    """After the model loaded (``device`` as load_model reports it): a CUDA graph needs it on CUDA."""
    if step == "graph" and not device.startswith("cuda"):
        raise ConfigError(f"--decode-step graph records a CUDA graph: it needs the model on a CUDA device "
                          f"(it is on {device})")


def check_skip_layers(skip_layers, num_layers: int) -> None:
    bad = [i for i in skip_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"skip layer(s) {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})")


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'knorm'?)' when ``word`` is close to one of ``choices``, else ''."""
    close = difflib.get_close_matches(str(word).lower(), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_choice(flag: str, what: str, value: str, choices) -> ConfigError:
    """"--presses: unknown press 'knrom' (did you mean 'knorm'?); choose from: ..." as a ConfigError."""
    return ConfigError(f"{flag}: unknown {what} {value!r}{did_you_mean(value, choices)}; "
                       f"choose from: {', '.join(map(str, choices))}")


def keep_ratio_error(value: float, flag: str = "--keep-ratios") -> ConfigError | None:
    """None for a keep ratio in (0, 1]; else the error, with the fraction when it looks like a percentage."""
    if isinstance(value, (int, float)) and math.isfinite(value) and 0.0 < value <= 1.0:
        return None
    percent = isinstance(value, (int, float)) and 2 <= value <= 100 and float(value).is_integer()  # 90, not 1.5
    hint = f"; use {value / 100:g} for {value:g} %" if percent else ""
    return ConfigError(f"{flag}: {value:g} is outside (0, 1] (the fraction of the cache kept){hint}")


def parse_float_list(text: str, name: str) -> list[float]:
    """'0.9,0.8' -> [0.9, 0.8]; empty items, words, NaN and inf are errors."""
    items = [t.strip() for t in str(text).split(",")]
    if not text or any(t == "" for t in items):
        raise ConfigError(f"{name}: malformed list {text!r} (expected comma-separated numbers, e.g. 0.9,0.8)")
    values = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            raise ConfigError(f"{name}: {t!r} is not a number (in {text!r})") from None
        if not math.isfinite(v):
            raise ConfigError(f"{name}: {t!r} is not a finite number")
        values.append(v)
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: duplicate values in {text!r}")
    return values


def parse_int_list(text: str | None, name: str, allow_empty: bool = False) -> list[int]:
    """'0,1' -> [0, 1]; '' or 'none' -> [] when allowed."""
    if text is None or str(text).strip().lower() in ("", "none"):
        if allow_empty:
            return []
        raise ConfigError(f"{name}: empty list")
    items = [t.strip() for t in str(text).split(",")]
    if any(t == "" for t in items):
        raise ConfigError(f"{name}: malformed list {text!r} (expected comma-separated integers, e.g. 0,1)")
    values = []
    for t in items:
        try:
            values.append(int(t))
        except ValueError:
            raise ConfigError(f"{name}: {t!r} is not an integer (in {text!r})") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}: duplicate values in {text!r}")
    return values


def parse_name_list(text: str, name: str, allowed: tuple[str, ...] | None) -> list[str]:
    """'knorm,random' -> ['knorm', 'random']; an unknown name gets a did-you-mean from ``allowed``
    (None: names are checked later, they depend on other options)."""
    items = [t.strip() for t in str(text).split(",")]
    if not text or any(t == "" for t in items):
        example = f", e.g. {','.join(allowed[:2])}" if allowed else ""
        raise ConfigError(f"{name}: malformed list {text!r} (expected comma-separated names{example})")
    what = name.lstrip("-")
    what = what[:-2] if what.endswith("sses") else what.removesuffix("s")  # presses -> press, tasks -> task
    for t in items:
        if allowed is not None and t not in allowed:
            raise unknown_choice(name, what, t, allowed)
    if len(set(items)) != len(items):
        raise ConfigError(f"{name}: duplicate values in {text!r}")
    return items
