"""The report data: ``build_summary`` turns stored rows into a ``Summary`` that every
table, export and figure reads. Pure Python: no rich, no matplotlib, no torch.

Where things live: metric definitions in ``render.metrics``; per-metric statistics
(values, paired changes, intervals, verdicts) in ``render.paired``; per-configuration
rows and the noise estimate in ``render.rows``; question-task accuracy in
``render.tasks``; the header in ``render.header``; flags in ``render.flags``; text
formatting in ``render.format``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from knormctl.render.flags import (Flag, failed_flags, few_prompts_flags, first_line, machine_flags, power_flags,
                                   row_flags, run_flags, task_flags, truncated_flags)
from knormctl.render.header import RunHeader, run_header
from knormctl.render.metrics import DETECTABLE_EFFECT, METRIC, METRICS
from knormctl.render.paired import ok, prompt_key
from knormctl.render.rows import REFERENCE_KEY, ConfigRow, build_rows, labels_for, sort_key
from knormctl.render.tasks import NeedleCell, TaskRow, task_tables
from knormctl.stats import CONFIDENCE, EXACT_MEDIAN_MAX_N, RESAMPLES, token_match

__all__ = ["METRIC", "METRICS", "REFERENCE_KEY", "ConfigRow", "Flag", "RunHeader", "Summary", "TaskRow",
           "NeedleCell", "build_summary", "fill_token_match", "first_line", "sample_rows", "run_datasets",
           "SAMPLE_FIELDS"]

STATISTICS = {
    "confidence": CONFIDENCE,
    "change": "relative metrics: median over prompts of each prompt's % change vs the full cache on the same "
              "prompt; fractions: mean of per-prompt differences, in percentage points",
    "change_interval": f"percentile bootstrap over prompts: medians of up to {EXACT_MEDIAN_MAX_N} prompts use the "
                       f"exact bootstrap distribution; means and larger medians {RESAMPLES} resamples, seeded from "
                       f"the configuration and metric names",
    "value_interval": "fractions only: Wilson score interval when every accuracy score is 0 or 1, else the same "
                      "bootstrap (token match always: a share of tokens, not a right/wrong answer); "
                      "medians over different prompts get none (their spread is the prompt mix)",
    "accuracy": "the mean over context lengths of the mean over subtasks (equal weights), on the cells every "
                "configuration measured, as the task tables: one subtask at one length, that row's Wilson/bootstrap "
                "interval and change; else a stratified bootstrap (questions resampled within subtask and length; "
                "a cell of one question: every question resampled with its cell's weight)",
    "repeats": "a prompt's repeated rounds (two runs of a group measuring it: two rounds) are reduced to one value "
               "(the metric's own statistic) before pairing; a change uses the rounds both sides measured",
    "verdict": "same when every prompt's change is exactly 0 (interval [0, 0]; right/wrong scores, and a token "
               "match of 0 or 1 where the configuration evicts, get the binomial bound instead); noise (no detectable difference) "
               "when the change's interval contains 0, or for timings when |change| <= the run's noise estimate; "
               "else better/worse by the metric's direction",
    "samples_needed": f"where the interval contains 0: prompts for 80% power to detect a {DETECTABLE_EFFECT:g}% "
                      f"({DETECTABLE_EFFECT:g} pp) change, from the interval's width (normal approximation)",
}


@dataclass
class Summary:
    header: RunHeader
    rows: list[ConfigRow]
    tasks: list[TaskRow]  # question-task accuracy per configuration x subtask x length (+ means)
    needle_cells: list[NeedleCell]  # needle depth x length cells (passkey, niah)
    flags: list[Flag]
    noise_pct: float  # timing changes within +- this are "noise"
    noise_source: str
    noise_measured: bool  # False: assumed (no keep_ratio 1.0 configuration or repeats to measure it)
    by_dataset: bool
    statistics: dict[str, Any] = field(default_factory=lambda: dict(STATISTICS))
    # per-step decode latencies (s) by config_key; only when blobs were loaded (plot)
    step_latencies: dict[str, list[float]] = field(default_factory=dict)

    @property
    def reference(self) -> ConfigRow | None:
        return next((r for r in self.rows if r.is_reference), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: header, rows, tasks, needle cells, flags, noise, statistics (no per-step latencies)."""
        d = asdict(self)
        d.pop("step_latencies")
        d["metrics"] = [dict(asdict(m), aggregate=m.aggregate, change_unit=m.change_unit) for m in METRICS]
        return d


def _loaded(obj: Any, name: str) -> Any:
    """A column's value if it was loaded, else None; never triggers a lazy load.

    The store defers the blob columns; touching one on a detached row would query
    (or fail), so look in the instance dict, where SQLAlchemy keeps loaded values.
    """
    return vars(obj).get(name)


def needs_generated_ids(samples: Sequence[Any]) -> bool:
    """True when some successful sample lacks its token match and a full-cache output exists
    to compute it from (the caller then loads the generated ids: report and plot alike)."""
    return any(s.config_key == REFERENCE_KEY for s in ok(samples)) and \
        any(s.token_match is None for s in ok(samples))


def fill_token_match(samples: Sequence[Any]) -> None:
    """Where token_match is NULL and the generated ids were loaded, compute it (stats.token_match)
    against the full-cache output of the same prompt (same repeat when there is one)."""
    refs: dict[tuple, dict[int, Any]] = {}
    for s in ok(samples):
        if s.config_key == REFERENCE_KEY:
            refs.setdefault(prompt_key(s), {})[getattr(s, "repeat", 0) or 0] = _loaded(s, "generated_ids_json")
    for s in ok(samples):
        if s.token_match is not None:
            continue
        rounds = refs.get(prompt_key(s))
        if not rounds:
            continue
        ref = rounds.get(getattr(s, "repeat", 0) or 0, rounds[min(rounds)])
        s.token_match = token_match(_loaded(s, "generated_ids_json"), ref)


def build_summary(runs: Sequence[Any], samples: Sequence[Any], *, by_dataset: bool = False) -> Summary:
    """Aggregate stored samples of one run (or a merged group) into the report data.

    ``runs``: Run rows (ORM or alike); ``samples``: their Sample rows. Blob columns are
    used only when loaded: per-step latencies for plots, and a NULL ``token_match`` is
    filled in place from the generated ids (so ``--samples`` shows the same value).
    """
    if not runs:
        raise ValueError("build_summary needs at least one run")
    fill_token_match(samples)
    protos: dict[str, Any] = {}
    for s in samples:
        protos.setdefault(s.config_key, s)
    labels = labels_for(protos)
    chunks = {r.id: int((getattr(r, "config_json", None) or {}).get("prefill_chunk") or 0) for r in runs}
    rows, noise_pct, noise_source, measured = build_rows(samples, labels, by_dataset, chunks)
    tasks, needles = task_tables(samples, labels)
    steps: dict[str, list[float]] = {}
    for s in ok(samples):
        lat = _loaded(s, "step_latencies_json")
        if lat:
            steps.setdefault(s.config_key, []).extend(float(x) for x in lat)
    header = run_header(runs)
    ran = [int(s.batch_size) for s in samples if getattr(s, "batch_size", None) is not None]
    if ran:  # the batches the stored cells ran in: a shard of one prompt asked for 2 runs batches of 1
        header.batch_size = max(ran)  # (cells stored before samples.batch_size existed: the option's)
    flags = (run_flags(runs, samples) + machine_flags(header) + row_flags(rows, noise_pct, noise_source)
             + task_flags(tasks) + truncated_flags(samples) + few_prompts_flags(rows) + power_flags(rows, tasks)
             + failed_flags(samples, labels))
    return Summary(header=header, rows=rows, tasks=tasks, needle_cells=needles, flags=flags, noise_pct=noise_pct,
                   noise_source=noise_source, noise_measured=measured, by_dataset=by_dataset, step_latencies=steps)


# ---------------------------------------------------------------- per-sample view

SAMPLE_FIELDS = (
    "run_id", "sample_index", "repeat", "dataset", "doc_title", "config_key", "press", "keep_ratio", "prune_after",
    "skip_layers", "compress_mode", "keep_recent", "prompt_tokens", "new_tokens", "ttft_s", "tpot_s",
    "itl_p50_s", "itl_p90_s", "itl_p99_s", "throughput_tps", "total_s", "peak_mem_bytes", "peak_mem_kind",
    "peak_mem_reason", "kv_bytes_peak", "kv_bytes_final", "compress_events", "compress_time_s", "ppl_context",
    "ppl_compressed", "eval_tokens", "token_match", "task", "subtask", "protocol", "needle_depth", "context_length",
    "answers_json", "score", "score_metric", "error",
)


def sample_rows(samples: Sequence[Any]) -> list[dict[str, Any]]:
    """Per-sample rows (``--samples``), in a stable column order, sorted by config then sample."""
    ordered = sorted(samples, key=lambda s: (sort_key(s), s.dataset, s.sample_index, getattr(s, "repeat", 0) or 0,
                                             s.run_id))
    return [{f: getattr(s, f, None) for f in SAMPLE_FIELDS} for s in ordered]


def run_datasets(run: Any) -> str:
    """The text sources a run asked for, from its stored config (cheap: no sample query)."""
    cfg = run.config_json or {}
    if run.task not in ("lm", None):
        return run.task
    parts = []
    for kind in ("wikitext", "pg19"):
        n, source = cfg.get(f"num_{kind}_samples"), cfg.get(f"{kind}_source")
        if n:
            parts.append(f"{source or kind} x{n}")
    return ", ".join(parts) or "-"
