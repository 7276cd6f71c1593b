"""How long a planned run will take, said before its cells start (no torch here).

Two sources, the better first:

1. a stored run of the same model with the same per-cell settings on this host: its
   measured seconds per cell (the gaps between its batches' commit times, over the rows
   a batch stores) x the cells now planned;
2. the warm-up's speed: its prefill time per prompt token and its time per output token,
   applied to every planned cell's prompt and token counts. The warm-up is cold, so this
   errs on the long side.

Both are rough -- the live ETA (cells done so far) replaces them once cells finish.
"""

from __future__ import annotations

import socket
import statistics
from dataclasses import dataclass

# The settings that decide how long one cell takes; a stored run is comparable when they match.
PER_CELL_SETTINGS = ("task", "dtype", "device", "threads", "max_new_tokens", "eval_tokens", "ppl_method",
                     "wikitext_source", "pg19_source", "wikitext_prompt_tokens", "max_prompt_tokens",
                     "passkey_lengths", "passkey_new_tokens", "compress_mode", "batch_size", "decode_step")
DEFAULTS = {"batch_size": 1, "decode_step": "launched"}  # what a run stored before the setting existed ran with
FINISHED_CELLS = ("complete", "complete_with_errors", "interrupted")  # runs whose stored cells are whole
RESUME_GAP = 5.0  # a gap between two stored cells this many times the median is a pause (resume), not work


@dataclass
class Estimate:
    seconds: float
    basis: str  # one clause saying where the number comes from


def format_duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 1 h 02 min: short, and precise enough for an ETA."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def plan_line(n_cells: int, n_samples: int, configs: list, new_tokens: int, eval_tokens: int,
              repeats: int = 1) -> str:
    """'plan: 25 cells = 5 samples x 5 configurations (full cache; knorm keep 1, 0.9, ...); 100 new
    tokens + 128 scored tokens per cell' (n_samples: this shard's; 'x R repeats' when R > 1)."""
    presses: dict[str, list[str]] = {}
    for pc in configs:
        if not pc.is_baseline:
            presses.setdefault(pc.press, []).append(f"{pc.keep_ratio:g}")
    what = ["full cache"] + [f"{p} keep {', '.join(krs)}" for p, krs in presses.items()]
    rounds = f" x {repeats} repeats" if repeats > 1 else ""
    line = (f"plan: {count(n_cells, 'cell')} = {count(n_samples, 'sample')} x "
            f"{count(len(configs), 'configuration')}{rounds} ({'; '.join(what)}); {count(new_tokens, 'new token')}")
    return line + (f" + {count(eval_tokens, 'scored token')}" if eval_tokens else "") + " per cell"


def from_stored_run(store, cfg, n_cells: int, scan: int = 50) -> Estimate | None:
    """Seconds per cell of the newest run (finished or interrupted) of the same model and
    per-cell settings on this host, times ``n_cells``; None when there is no such run."""
    host = socket.gethostname()
    wanted = cfg.to_dict()
    for run in store.list_runs(limit=scan):
        if run.hostname != host or run.model_requested != cfg.model or run.status not in FINISHED_CELLS:
            continue
        stored = run.config_json or {}
        if any(stored.get(k, DEFAULTS.get(k)) != wanted.get(k) for k in PER_CELL_SETTINGS):
            continue
        per_cell = seconds_per_cell([s.created_utc for s in store.samples(run.id)], stored.get("batch_size", 1))
        if per_cell is not None:
            return Estimate(per_cell * n_cells, f"run {run.id} of this model on this host took "
                                                f"{per_cell:.1f} s per cell")
    return None


def seconds_per_cell(created: list, batch_size: int = 1) -> float | None:
    """Mean gap between consecutive stored batches over the rows a batch stores, pauses (a
    resume days later) left out. A batch stores its rows together (milliseconds apart), so
    the gaps are taken between every ``batch_size``-th commit: between rows they would be
    near zero and pass for the typical gap."""
    times = sorted(t for t in created if t is not None)[batch_size - 1::batch_size]
    gaps = [(b - a).total_seconds() / batch_size for a, b in zip(times, times[1:])]
    if not gaps:
        return None
    median = statistics.median(gaps)
    work = [g for g in gaps if g <= RESUME_GAP * median] if median > 0 else gaps
    return statistics.fmean(work) if work else None


def from_warmup(warm: list, warm_prompt_tokens: int, cells: list, samples: list, new_tokens: int,
                ppl_method: str = "teacher-forced", batch_rows: int = 1) -> Estimate | None:
    """Plan size x the warm-up's speed.

    ``warm``: the warm-up's GenerationResults (full cache first); ``cells``: the planned
    cells (``sample_index``); ``samples``: their prompts (``prompt_ids``, ``eval_ids``).
    A cell costs a prefill and ``new_tokens`` decode steps, plus the scored tokens (a
    prefill + one step each, or -- ppl_method stream -- one step per prompt and scored
    token); each sample once more a prefill for its context perplexity. ``batch_rows``: the
    rows of the warm-up's batch (``warm_prompt_tokens`` counts all of them): a decode step
    makes a token for each, so a row's share of it is 1 / ``batch_rows`` (the scored tokens
    run at batch 1: counted at the batch step, on the long side).
    """
    steps = [r.tpot_s for r in warm if r.tpot_s]
    if not warm or not steps or warm_prompt_tokens < 1:
        return None
    prefill_per_token = warm[0].ttft_s / warm_prompt_tokens
    step = max(steps)  # the compressing configuration pays for its cuts
    total = 0.0
    for cell in cells:
        s = samples[cell.sample_index]
        n_prompt, n_eval = len(s.prompt_ids), len(getattr(s, "eval_ids", None) or ())
        total += prefill_per_token * n_prompt + new_tokens * step / batch_rows
        if n_eval and ppl_method == "stream":
            total += (n_prompt + n_eval) * step
        elif n_eval:
            total += prefill_per_token * n_prompt + n_eval * step
    for i in {c.sample_index for c in cells}:
        if getattr(samples[i], "eval_ids", None):
            total += prefill_per_token * len(samples[i].prompt_ids)
    return Estimate(total, f"warm-up speed: prefill {1000 * prefill_per_token:.2f} ms/token, "
                           f"decode {1000 * step:.0f} ms/token")


def _tokens_per_cell(config: dict) -> int:
    """Generated + scored tokens of one cell: what a cell's time mostly scales with."""
    return int(config.get("max_new_tokens") or 0) + int(config.get("eval_tokens") or 0)


def from_model_runs(store, cfg, n_cells: int, scan: int = 50) -> Estimate | None:
    """A rougher estimate when no stored run has the same per-cell settings: the newest finished
    run of the same model on this host, its seconds per cell scaled by tokens per cell."""
    host = socket.gethostname()
    want = _tokens_per_cell(cfg.to_dict())
    for run in store.list_runs(limit=scan):
        if run.hostname != host or run.model_requested != cfg.model or run.status not in FINISHED_CELLS:
            continue
        have = _tokens_per_cell(run.config_json or {})
        per_cell = seconds_per_cell([s.created_utc for s in store.samples(run.id)],
                                    (run.config_json or {}).get("batch_size", 1))
        if per_cell is None or not have or not want:
            continue
        return Estimate(per_cell * n_cells * want / have,
                        f"rough: run {run.id} of this model took {per_cell:.1f} s per cell of {have} tokens")
    return None
