"""Every reported metric, defined once: the column it reads, its unit, which way is
better, how it aggregates over prompts and how its change against the full cache is
expressed. Tables, json/csv/markdown and figures all read ``METRICS``; adding a metric
is one entry here (plus its stored column and migration).

The numbers themselves are computed in ``render.paired`` (one function per statistic).
"""

from __future__ import annotations

from dataclasses import dataclass

LOWER, HIGHER = "lower", "higher"
SECTIONS = ("speed", "memory", "compression", "quality")  # table order


@dataclass(frozen=True)
class Metric:
    """One reported metric."""

    name: str  # key in json/csv
    label: str  # short header for tables and axes
    unit: str  # "s", "tok/s", "B", "count", "fraction" or "" (a plain number)
    better: str | None  # LOWER / HIGHER; None = no direction, so no change and no verdict
    section: str  # which table it belongs to (SECTIONS)
    description: str  # one line for legends and --help-like text
    column: str = ""  # the Sample column it reads ("" = the same as name)
    timing: bool = False  # subject to the run's timing noise (the same-work noise estimate)
    # a score that is right or wrong by nature where every value is 0 or 1 (exact-match answers):
    # then a binomial (Wilson) interval. Token match is a share of tokens: 0% or 100% on every
    # prompt is not a coin toss per prompt, and the full cache's 100% (by definition) is exact
    pass_fail: bool = False

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def aggregate(self) -> str:
        """How values of one configuration are summarised over prompts (and over repeats of a prompt):
        fractions by their mean; counts by the lower median (an observed count, never 2.5);
        everything else by the median (robust to the odd slow sample)."""
        return {"fraction": "mean", "count": "median_low"}.get(self.unit, "median")

    @property
    def points(self) -> bool:
        """Fractions change in percentage points (mean of per-prompt differences);
        everything else in percent (median of per-prompt relative changes)."""
        return self.unit == "fraction"

    @property
    def change_unit(self) -> str:
        return "pp" if self.points else "%"

    @property
    def change_column(self) -> str:
        """Its change's column in csv: ``ttft_s_change_pct``, ``token_match_change_pp``."""
        return f"{self.name}_change_{'pp' if self.points else 'pct'}"


METRICS: tuple[Metric, ...] = (
    Metric("ttft_s", "TTFT", "s", LOWER, "speed", "time to first token (the prefill)", timing=True),
    Metric("tpot_s", "TPOT", "s", LOWER, "speed", "time per output token (mean decode step)", timing=True),
    Metric("itl_p90_s", "ITL p90", "s", LOWER, "speed", "90th percentile of the decode steps", timing=True),
    Metric("throughput_tps", "throughput", "tok/s", HIGHER, "speed",
           "end-to-end: new tokens / (prefill + decode) time", timing=True),
    Metric("peak_mem_bytes", "peak memory", "B", LOWER, "memory", "peak device memory of one sample"),
    Metric("kv_bytes_peak", "KV peak", "B", LOWER, "memory", "largest KV cache held (before a cut)"),
    Metric("kv_bytes_final", "KV final", "B", LOWER, "memory", "KV cache held at the end"),
    Metric("compress_events", "compressions", "count", None, "compression", "forwards after which entries were evicted"),
    Metric("compress_time_s", "compress time", "s", None, "compression", "time spent cutting the cache", timing=True),
    # ppl_context is the prompt's perplexity under the full model: compression cannot change it.
    Metric("ppl_context", "ppl context", "", None, "quality", "perplexity of the prompt (full model)"),
    Metric("ppl_compressed", "ppl compressed", "", LOWER, "quality",
           "perplexity of the following text under the same press"),
    Metric("token_match", "token match", "fraction", HIGHER, "quality",
           "fraction of generated tokens equal to the full cache's"),
    Metric("accuracy", "accuracy", "fraction", HIGHER, "quality",
           "mean task score (0..1): over subtasks, then context lengths (render.tasks)", column="score",
           pass_fail=True),
)
METRIC = {m.name: m for m in METRICS}
# What "can this run tell a change of this size?" asks about (samples_needed): 5% for
# relative changes, 5 percentage points for fractions.
DETECTABLE_EFFECT = 5.0
