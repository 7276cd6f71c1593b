"""Shared helpers for the benchmark scripts: options, header, interleaved repeats, tables.

Method (STYLE.md pitfalls): on a small shared machine any other load stalls torch for
hundreds of ms, so every script pins the thread count and records it, warms up first,
runs its configurations interleaved (A B A B ...) in one process, and quotes medians and
ratios measured in that same run. Ratios from one run are comparable; absolute times
from different runs are not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package


def _default_text() -> str:
    # ../shared/data/books next to the checkout (the project's layout); <repo>/shared on a device copy
    for base in (REPO.parent / "shared", REPO / "shared"):
        if (base / "data" / "books").is_dir():
            return f"text:{base / 'data' / 'books'}"
    return f"text:{REPO.parent / 'shared' / 'data' / 'books'}"


DEFAULT_TEXT = _default_text()


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the tables."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# options and set-up


def parser(description: str, repeats: int, device_choices: Sequence[str] = ("cpu", "cuda")) -> argparse.ArgumentParser:
    """The options every script shares; scripts add their own sizes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run that proves the script works (< 1 min)")
    p.add_argument("--device", choices=device_choices, default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (pinned and recorded)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds per configuration (after the warm-up)")
    p.add_argument("--model", default="smollm2-135m", help="anything knormctl's load_model accepts")
    p.add_argument("--text", default=DEFAULT_TEXT, help="text source for prompts (make_samples syntax)")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args) -> None:
    """Pin threads before any torch work; refuse a CUDA run without CUDA."""
    import torch

    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)  # one op at a time: the loop is sequential anyway
    except RuntimeError:
        pass  # already set in this process (only possible once)
    torch.manual_seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")


def header(title: str, args, extra: dict | None = None) -> dict:
    """Print the environment block every table is read against; return it."""
    import torch

    env = environment(args.device)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = {
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{env['cpu_model']} ({env['cpu_cores_logical']} logical cores)",
        "cpu flags": env["cpu_flags"] or "-",
        "cpu kernels (torch)": env.get("cpu_capability") or torch.backends.cpu.get_cpu_capability(),
        "device": args.device + (f" ({env['gpu_name']})" if args.device == "cuda" else ""),
        "torch threads": f"{torch.get_num_threads()} (pinned with --threads {args.threads})",
        "dtype": args.dtype,
        "torch / transformers": f"{env['torch']} / {env['transformers']}",
        "python": env["python"],
        "knormctl commit": _commit_text(env),
        "load average (1 min) at start": f"{load1:.2f}" if load1 is not None else "n/a",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    rows.update(extra or {})
    print(f"== {title} ==")
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v}")
    print()
    return env


def _commit_text(env: dict) -> str:
    """The checkout's commit; in a copy without .git (a borrowed GPU machine's), the one the
    caller passed in $KNORMCTL_COMMIT."""
    if env["git_commit"]:
        return env["git_commit"][:10] + (" (dirty)" if env["git_dirty"] else "")
    passed = os.environ.get("KNORMCTL_COMMIT")
    return f"{passed[:10]} (from $KNORMCTL_COMMIT)" if passed else "?"


def environment(device: str) -> dict:
    """knormctl's own environment record; a minimal stand-in where its extras (psutil) are missing."""
    try:
        from knormctl.engine.env import get_environment
    except ImportError as e:  # e.g. a borrowed GPU machine with only torch and transformers
        import platform

        import torch
        import transformers

        log(f"knormctl.engine.env unavailable ({e}); minimal environment record")
        cuda = torch.cuda.is_available()
        return {"cpu_model": platform.processor() or platform.machine(), "cpu_cores_logical": os.cpu_count(),
                "cpu_flags": "", "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "git_commit": None, "git_dirty": None}
    return get_environment("cuda:0" if device == "cuda" else device)


def load(args):
    """Load the model once per script (a LoadedModel: .model, .tokenizer, .num_layers, ...)."""
    from knormctl.engine.models import load_model

    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype, device=args.device, progress=log)
    log(f"loaded {lm.resolved} ({lm.dtype}, {lm.device}) in {time.perf_counter() - t0:.1f} s")
    return lm


def prompts(args, tokenizer, n: int, prompt_tokens: int, eval_tokens: int = 0):
    """``n`` real-text windows (TextSample: .prompt_ids, .eval_ids, .doc_id, ...)."""
    from knormctl.engine.text import make_samples

    return make_samples(args.text, n, tokenizer, prompt_tokens, eval_tokens, args.seed, progress=log)


# ---------------------------------------------------------------------------------------
# running configurations side by side


def interleaved(configs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list]:
    """Run every configuration ``warmup`` times (discarded), then ``repeats`` rounds of
    A B C, A B C, ...: slow drift and bursts of outside load hit all of them alike."""
    for w in range(warmup):
        for name, fn in configs.items():
            log(f"warm-up {w + 1}/{warmup}: {name}")
            fn()
    out: dict[str, list] = {name: [] for name in configs}
    t0 = time.perf_counter()
    for r in range(repeats):
        for name, fn in configs.items():
            out[name].append(fn())
        log(f"round {r + 1}/{repeats} done ({time.perf_counter() - t0:.0f} s)")
    return out


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None,
          before: Callable[[], None] | None = None) -> Callable[[], float]:
    """A callable returning the seconds ``fn`` took; ``before`` (untimed) resets its inputs."""

    def run() -> float:
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return run


def median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Round-by-round ratios: each pair ran back to back, so it shares the load of its moment."""
    return [x / y for x, y in zip(a, b) if y]


def verdict(value: float | None, target: float, op: str = "<=") -> str:
    if value is None:
        return "n/a"
    ok = value <= target if op == "<=" else value >= target
    return f"{'meets' if ok else 'MISSES'} {op} {target:g}"


def spread(xs: Sequence[float]) -> str:
    """'min-max' of round-by-round ratios: how much the machine moved during the run."""
    return f"{min(xs):.3f}-{max(xs):.3f}" if xs else "-"


# ---------------------------------------------------------------------------------------
# memory


def proc_status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM from /proc/self/status (Linux), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS: the engine's own probe, so both measure alike."""
    from knormctl.engine.timing import reset_rss_peak as reset

    return reset()


def cuda_peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_peak(device: str) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last reset (None on CPU)."""
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def sync_for(device: str) -> Callable[[], None]:
    import torch

    from knormctl.engine.timing import synchronizer

    return synchronizer(torch.device(device))


# ---------------------------------------------------------------------------------------
# output


def ms(seconds: float | None, digits: int = 2) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.{digits}f}"


def mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], notes: Sequence[str] = ()) -> None:
    """A plain fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    print(f"-- {title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
    for n in notes:
        print(f"   {n}")
    print()


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (None when equal over the common length)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
