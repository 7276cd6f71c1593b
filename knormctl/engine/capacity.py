"""The largest batch that fits a memory budget, and its decode throughput (issue 16 item 3).

The number a deployer decides on: at a given context length, how many sequences decode
together in the memory there is, with and without compression, and how many tokens per
second that batch makes (B / the median decode step: every row gets one token per step). The
first step after the prompt is left out: in prefill mode it carries the cut, and with few new
tokens a median would still be that step.

Memory of one generation of batch B (``measure``):
- CUDA: ``torch.cuda.max_memory_allocated`` over the generation (the engine's MemoryProbe:
  weights, cache, activations, the cut's temporaries); a CUDA out-of-memory error = does not fit.
- elsewhere: the process's resident set is no use for a search (the allocator keeps freed
  memory), so the bytes the generation itself holds are counted: the weights (parameters +
  buffers) + the cache's peak (``kv_bytes_held_peak``: its buffers, room for later tokens
  included). Activations and temporaries are NOT counted: the memory kind says so.

Search (``find_capacity``): B = 1 and B = 2 give the growth per row; the largest B the
budget holds by that line is run; then one step at a time up or down (bisection once the
steps grow long) until the largest fitting B is found and B + 1 is known not to fit (or the
cap ``max_batch`` is reached). Every probe is a real generation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from knormctl.config import PressConfig
from knormctl.errors import UsageError

CPU_KIND = "weights + KV cache held (activations not counted)"
CUDA_KIND = "cuda max_memory_allocated"
MIN_NEW_TOKENS = 3  # two decode steps: the first carries the cut, the second is timed
MAX_PROBES = 40  # real generations per configuration, at most (a guard: bisection needs ~log2(max_batch))


@dataclass
class Probe:
    """One generation at batch ``batch``."""

    batch: int
    fits: bool
    peak_bytes: int | None  # None: out of memory before the end
    step_s: float | None = None  # the median decode step after the first (which carries a prefill cut)
    error: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return self.batch / self.step_s if self.step_s else None


@dataclass
class Capacity:
    """The answer for one configuration."""

    config: str  # the configuration's label
    largest_batch: int  # 0: not even one sequence fits
    peak_bytes: int | None  # at the largest batch
    step_s: float | None  # median decode step at the largest batch
    tokens_per_s: float | None  # largest_batch / step_s
    memory_kind: str
    capped: bool  # largest_batch is --max-batch: more might fit
    probes: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_memory(text: str) -> int:
    """'70GiB', '80GB', '512MiB', '1e9', '123456789B' -> bytes (binary units for *iB, decimal for *B)."""
    import re

    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in units:
        raise UsageError(f"--memory-budget: cannot read {text!r} (e.g. 70GiB, 80GB, 512MiB or a number of bytes)")
    value = float(m.group(1)) * units[unit]
    if not math.isfinite(value):
        raise UsageError(f"--memory-budget: {text!r} is too large to be a number of bytes")
    if not value >= 1:
        raise UsageError(f"--memory-budget must be at least 1 byte, got {text!r}")
    return int(value)


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def memory_kind(device: torch.device) -> str:
    return CUDA_KIND if device.type == "cuda" else CPU_KIND


def measure(model, prompt: list[int], batch: int, cfg: PressConfig, new_tokens: int, budget: int, *,
            prefill_chunk: int = 0, decode_step: str = "launched") -> Probe:
    """One real generation of ``batch`` copies of ``prompt``: its peak memory and decode step."""
    from knormctl.engine.loop import run_generation
    from knormctl.engine.timing import model_device

    device = model_device(model)
    try:
        res = run_generation(model, [prompt] * batch, cfg, new_tokens, prefill_chunk=prefill_chunk,
                             decode_step=decode_step)
    except torch.cuda.OutOfMemoryError as exc:
        oom = f"out of memory: {str(exc).splitlines()[0]}"
    else:
        oom = None
    if oom is not None:  # outside the handler: its traceback no longer holds the failed probe's tensors
        torch.cuda.empty_cache()
        return Probe(batch, False, None, error=oom)
    if device.type == "cuda":
        peak = res.memory.bytes
    else:
        peak = weight_bytes(model) + res.kv_bytes_held_peak
    return Probe(batch, peak is not None and peak <= budget, peak, decode_step_s(res.step_latencies_s))


def decode_step_s(steps: list[float]) -> float | None:
    """The median decode step, the first left out (in prefill mode it carries the cut)."""
    import statistics

    return statistics.median(steps[1:]) if len(steps) > 1 else None


def find_capacity(model, prompt: list[int], cfg: PressConfig, label: str, *, new_tokens: int, budget: int,
                  max_batch: int, prefill_chunk: int = 0, decode_step: str = "launched",
                  progress: Callable[[str], None] = lambda s: None) -> Capacity:
    """The largest batch of ``prompt`` under ``cfg`` whose generation fits ``budget`` bytes."""
    from knormctl.engine.timing import model_device

    if new_tokens < MIN_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens must be >= {MIN_NEW_TOKENS}: the decode steps after the first "
                         "(which carries the cut) are what is timed")
    probes: dict[int, Probe] = {}

    def run(b: int) -> Probe:
        if b not in probes:
            if len(probes) >= MAX_PROBES:
                raise RuntimeError(f"no answer after {MAX_PROBES} generations")  # cannot happen: bisection
            progress(f"{label}: batch {b}")
            probes[b] = measure(model, prompt, b, cfg, new_tokens, budget, prefill_chunk=prefill_chunk,
                                decode_step=decode_step)
        return probes[b]

    lo, hi = 0, max_batch + 1  # lo fits (0: nothing known), hi does not (max_batch + 1: the cap)
    one = run(1)
    if not one.fits:
        hi = 1
    else:
        lo = 1
        guess = max_batch
        if max_batch >= 2:
            two = run(2)
            if two.fits:
                lo = 2
                grow = (two.peak_bytes or 0) - (one.peak_bytes or 0)
                guess = max_batch if grow <= 0 else 2 + (budget - two.peak_bytes) // grow
            else:
                hi = 2
        guess = min(max(guess, lo + 1), hi - 1)
        steps = 0
        while hi - lo > 1:
            b = guess if steps < 3 and lo < guess < hi else (lo + hi) // 2  # a few steps, then bisect
            if run(b).fits:
                lo, guess = b, b + 1
            else:
                hi, guess = b, b - 1
            steps += 1
    best = probes.get(lo)
    device = model_device(model)
    return Capacity(config=label, largest_batch=lo, peak_bytes=best.peak_bytes if best else None,
                    step_s=best.step_s if best else None, tokens_per_s=best.tokens_per_s if best else None,
                    memory_kind=memory_kind(device), capped=lo == max_batch,
                    probes=[probes[b] for b in sorted(probes)])


def config_label(pc: PressConfig) -> str:
    """'full cache' or 'knorm 0.5 prefill' (as the report names configurations): one line of an
    80-column table."""
    from knormctl.press_spec import format_press_spec

    if pc.is_baseline:
        return "full cache"
    return f"{format_press_spec(pc.press, pc.params)} {pc.keep_ratio:g} {pc.mode}"


def check_batchable(configs: list[PressConfig]) -> None:
    """One line, before the model loads, for a configuration that cannot run B > 1 together."""
    from knormctl.engine.batch import batch_refusal
    from knormctl.engine.presses import make_press

    for pc in configs:
        if pc.is_baseline or pc.keep_ratio >= 1.0:
            continue
        if (why := batch_refusal(make_press(pc.press, params=dict(pc.params)))) is not None:
            raise UsageError(f"capacity runs batches: press {pc.spec!r}: {why}")


def capacity_table(model, prompt: list[int], configs: list[PressConfig], *, new_tokens: int, budget: int,
                   max_batch: int, prefill_chunk: int = 0, decode_step: str = "launched",
                   progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """``find_capacity`` for every configuration (the full cache first), each with its ratios to
    the full cache's largest batch and tokens/s (None where the full cache fits nothing)."""
    from knormctl.engine.loop import run_generation

    # untimed: the first generation pays for a cold start
    run_generation(model, [prompt], configs[0], 2, decode_step=decode_step)
    rows = []
    for pc in configs:  # prefilled alike: on CUDA a one-forward prefill's activations would count against one side
        rows.append(find_capacity(model, prompt, pc, config_label(pc), new_tokens=new_tokens, budget=budget,
                                  max_batch=max_batch, prefill_chunk=prefill_chunk, decode_step=decode_step,
                                  progress=progress).to_dict())
    full = rows[0]
    for r in rows:
        r["batch_vs_full"] = r["largest_batch"] / full["largest_batch"] if full["largest_batch"] else None
        r["tokens_per_s_vs_full"] = (r["tokens_per_s"] / full["tokens_per_s"]
                                     if r["tokens_per_s"] and full["tokens_per_s"] else None)
    return rows
