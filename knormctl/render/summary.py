"""Report data built from stored rows: one row per configuration, its change against
the run's full-cache reference, and the honesty flags that say when a number means
nothing. Pure Python: no rich, no matplotlib, no torch; tables, exports and figures
all read the same ``Summary``.

Every per-configuration number is aggregated in one place (``_aggregate``): the
median over the configuration's successful samples (``stats.median``), except the
fractions (token match, passkey accuracy), which are means.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from knormctl.config import PRESS_NAMES
from knormctl.stats import median

REFERENCE_KEY = "none"  # PressConfig.key of the full-cache reference
LOWER, HIGHER = "lower", "higher"
# Timer resolution and scheduler jitter: on a shared 2-core machine, medians of a few
# samples move by several percent between identical configurations. Timing changes
# smaller than this are never called better or worse.
NOISE_FLOOR_PCT = 5.0
STATUS_SEVERITY = ("complete", "complete_with_errors", "running", "interrupted", "failed")


@dataclass(frozen=True)
class MetricSpec:
    """One reported metric: the Sample column it comes from and how to judge a change."""

    name: str  # Sample column (``accuracy`` reads ``score``); key in ConfigRow.values
    label: str  # short header
    unit: str  # "s", "tok/s", "B" or "" (a ratio or a count)
    better: str | None  # LOWER / HIGHER; None = no direction (the reference has none of it)
    mean: bool = False  # fractions are averaged, everything else is a median
    timing: bool = False  # subject to the run's timing noise
    points: bool = False  # change in percentage points (fractions) instead of relative %

    @property
    def column(self) -> str:
        return "score" if self.name == "accuracy" else self.name

    @property
    def change_column(self) -> str:
        """Its change's column in csv: ``ttft_s_change_pct``, ``token_match_change_pp``."""
        return f"{self.name}_change_{'pp' if self.points else 'pct'}"


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("ttft_s", "TTFT", "s", LOWER, timing=True),
    MetricSpec("tpot_s", "TPOT", "s", LOWER, timing=True),
    MetricSpec("itl_p90_s", "ITL p90", "s", LOWER, timing=True),
    MetricSpec("throughput_tps", "throughput", "tok/s", HIGHER, timing=True),
    MetricSpec("peak_mem_bytes", "peak memory", "B", LOWER),
    MetricSpec("kv_bytes_peak", "KV peak", "B", LOWER),
    MetricSpec("kv_bytes_final", "KV final", "B", LOWER),
    MetricSpec("compress_events", "compressions", "", None),
    MetricSpec("compress_time_s", "compress time", "s", None, timing=True),
    MetricSpec("ppl_context", "ppl context", "", LOWER),
    MetricSpec("ppl_compressed", "ppl compressed", "", LOWER),
    MetricSpec("token_match", "token match", "", HIGHER, mean=True, points=True),
    MetricSpec("accuracy", "passkey accuracy", "", HIGHER, mean=True, points=True),
)
METRIC = {m.name: m for m in METRICS}


@dataclass
class RunHeader:
    """Who measured what, where. For a merged ``--group`` several run ids."""

    run_ids: list[int]
    command: str
    task: str
    status: str
    group_name: str | None
    shard: str | None
    model: str
    model_resolved: str | None
    model_hash: str | None
    dtype: str | None
    device: str | None
    device_name: str | None  # GPU name, else CPU model (from env_json)
    threads: int | None
    torch_version: str | None
    transformers_version: str | None
    knormctl_version: str | None
    git_commit: str | None
    git_dirty: bool | None  # uncommitted changes in the checkout that ran
    started_utc: str | None  # ISO 8601, UTC
    ended_utc: str | None
    duration_s: float | None  # first start to last end
    samples_done: int
    samples_failed: int
    samples_planned: int | None
    command_line: str

    @property
    def title(self) -> str:
        ids = ",".join(map(str, self.run_ids))
        return f"run {ids}" if len(self.run_ids) == 1 else f"runs {ids}"


@dataclass
class ConfigRow:
    """One configuration (optionally within one dataset), aggregated over its samples."""

    config_key: str
    label: str  # short, for tables and tick labels: "knorm 0.9", "full cache"
    press: str
    keep_ratio: float
    prune_after: int
    skip_layers: str
    compress_mode: str
    keep_recent: int
    dataset: str | None  # None = all datasets together
    is_reference: bool
    n_samples: int
    n_failed: int
    values: dict[str, float | None]  # metric name -> median (mean for fractions)
    changes: dict[str, float | None]  # vs the reference: % (pp for fractions)
    verdicts: dict[str, str | None]  # "better" | "worse" | "noise" | "same" | "artifact" (TTFT) | None
    stdev: dict[str, float | None]  # over samples
    span: dict[str, tuple[float, float] | None]  # (min, max) over samples: the error bars around a median
    peak_mem_kind: str | None
    peak_mem_reason: str | None  # why peak memory is N/A (set only when it is)
    max_context_tokens: int | None  # largest prompt + new tokens over the samples
    compressed_samples: int | None  # successful samples with compress_events > 0 (None: not recorded)
    paired: bool | None  # same successful samples as the reference (None: this is the reference / none exists)


@dataclass
class PasskeyRow:
    """Passkey accuracy of one configuration at one context length."""

    config_key: str
    label: str
    press: str
    keep_ratio: float
    passkey_length: int
    n: int
    correct: int
    accuracy: float | None
    change_pp: float | None  # vs the reference at the same length, in percentage points


@dataclass
class PasskeyCell:
    """Depth x length cell of one configuration (the heat-map)."""

    config_key: str
    passkey_depth: float
    passkey_length: int
    n: int
    correct: int
    accuracy: float | None


@dataclass
class Flag:
    """A plain sentence printed under the table when a number must not be taken at face value."""

    kind: str  # no_compression | ttft_artifact | unpaired | failed_sample | interrupted | running | run_failed | no_reference
    message: str
    config_key: str | None = None


@dataclass
class Summary:
    header: RunHeader
    rows: list[ConfigRow]
    passkey: list[PasskeyRow]
    passkey_cells: list[PasskeyCell]
    flags: list[Flag]
    noise_pct: float  # timing changes within +- this are "noise"
    noise_source: str
    by_dataset: bool
    # per-step decode latencies (s) by config_key; only when blobs were loaded (plot)
    step_latencies: dict[str, list[float]] = field(default_factory=dict)

    @property
    def reference(self) -> ConfigRow | None:
        return next((r for r in self.rows if r.is_reference), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: header, rows, passkey, flags, noise (no per-step latencies)."""
        d = asdict(self)
        d.pop("step_latencies")
        d["metrics"] = [asdict(m) for m in METRICS]
        return d


# ---------------------------------------------------------------- building

def _loaded(obj: Any, name: str) -> Any:
    """A column's value if it was loaded, else None; never triggers a lazy load.

    The store defers the blob columns; touching one on a detached row would query
    (or fail), so look in the instance dict, where SQLAlchemy keeps loaded values.
    """
    return vars(obj).get(name)


def _ok(samples: Iterable[Any]) -> list[Any]:
    return [s for s in samples if not s.error]


def _aggregate(samples: Sequence[Any]) -> tuple[dict, dict, dict]:
    """The one place where per-configuration numbers are computed: (values, stdev, span)."""
    ok = _ok(samples)
    values: dict[str, float | None] = {}
    spread: dict[str, float | None] = {}
    span: dict[str, tuple[float, float] | None] = {}
    for m in METRICS:
        xs = [float(v) for v in (getattr(s, m.column) for s in ok) if v is not None]
        if m.mean:
            values[m.name] = statistics.fmean(xs) if xs else None
        else:
            values[m.name] = median(xs)
        spread[m.name] = _stdev(xs)
        span[m.name] = (min(xs), max(xs)) if xs else None
    return values, spread, span


def _stdev(xs: Sequence[float]) -> float | None:
    """Sample standard deviation in plain floats (statistics.stdev is exact, and 10x slower:
    an error bar does not need rational arithmetic)."""
    if len(xs) < 2:
        return None
    m = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _change(spec: MetricSpec, value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None:
        return None
    if spec.points:
        return (value - ref) * 100.0
    if ref == 0:
        return None
    return (value - ref) / ref * 100.0


def _pair_key(s: Any) -> tuple:
    """The same prompt in another configuration (and in another shard's run of a group)."""
    return (s.dataset, s.sample_index, s.text_hash)


def _paired_change(spec: MetricSpec, group: Sequence[Any], ref_group: Sequence[Any] | None,
                   value: float | None, ref_value: float | None) -> float | None:
    """The change against the full cache, measured sample by sample.

    Every configuration runs on the same prompts, so the median of per-prompt changes
    removes the prompt-to-prompt spread (a 2048-token prompt next to 1024-token ones) that
    a ratio of medians keeps. Fractions (means) and unpaired data fall back to comparing
    the aggregates."""
    if spec.mean or not ref_group:
        return _change(spec, value, ref_value)
    ref = {_pair_key(s): getattr(s, spec.column) for s in _ok(ref_group)}
    per_prompt = []
    for s in _ok(group):
        v, r = getattr(s, spec.column), ref.get(_pair_key(s))
        if v is not None and r is not None:
            c = _change(spec, float(v), float(r))
            if c is not None:
                per_prompt.append(c)
    return median(per_prompt) if per_prompt else _change(spec, value, ref_value)


def _verdict(spec: MetricSpec, change: float | None, noise_pct: float) -> str | None:
    if change is None or spec.better is None:
        return None
    if abs(change) < 1e-9:
        return "same"
    if spec.timing and abs(change) <= noise_pct:
        return "noise"
    if spec.name == "ttft_s":
        # Compression acts only after the prefill: a TTFT change beyond noise is not its doing.
        return "artifact"
    improved = change < 0 if spec.better == LOWER else change > 0
    return "better" if improved else "worse"


def _fill_token_match(samples: Sequence[Any]) -> None:
    """Where token_match is NULL and the generated ids were loaded, compute it
    against the same sample_index of the full-cache reference (position-wise)."""
    refs = {(s.dataset, s.sample_index): _loaded(s, "generated_ids_json")
            for s in samples if s.config_key == REFERENCE_KEY and not s.error}
    for s in samples:
        if s.token_match is not None or s.error:
            continue
        ids, ref = _loaded(s, "generated_ids_json"), refs.get((s.dataset, s.sample_index))
        if ids is None or ref is None:
            continue
        n = max(len(ids), len(ref))
        s.token_match = (sum(a == b for a, b in zip(ids, ref)) / n) if n else 1.0


def _fmt_kr(kr: float) -> str:
    return f"{kr:.1f}" if float(kr).is_integer() else f"{kr:g}"  # "1.0", "0.9", "0.75"


def _labels(protos: dict[str, Any]) -> dict[str, str]:
    """Short labels ("knorm 0.9"); dimensions that vary between configurations are appended."""
    others = [p for k, p in protos.items() if k != REFERENCE_KEY]
    varying = [dim for dim in ("prune_after", "skip_layers", "compress_mode", "keep_recent")
               if len({getattr(p, dim) for p in others}) > 1]
    short = {"prune_after": "pa={}", "skip_layers": "skip={}", "compress_mode": "{}", "keep_recent": "recent={}"}
    labels = {}
    for key, p in protos.items():
        if key == REFERENCE_KEY:
            labels[key] = "full cache"
            continue
        parts = [p.press, _fmt_kr(p.keep_ratio)] + [short[d].format(getattr(p, d) or "-") for d in varying]
        labels[key] = " ".join(parts)
    counts = defaultdict(int)
    for v in labels.values():
        counts[v] += 1
    return {k: (v if counts[v] == 1 else k) for k, v in labels.items()}


def _sort_key(p: Any) -> tuple:
    press_rank = PRESS_NAMES.index(p.press) if p.press in PRESS_NAMES else len(PRESS_NAMES)
    return (p.config_key != REFERENCE_KEY, press_rank, p.press, -p.keep_ratio, p.prune_after,
            p.skip_layers or "", p.compress_mode, p.keep_recent or 0, p.config_key)


# Two configurations doing the same work (keep_ratio 1.0 evicts nothing) should time alike;
# beyond this the run's speed numbers are flagged as disturbed.
NOISY_SAME_WORK_PCT = 10.0


def _ttft_noise(groups: dict[str, list[Any]], ttft: dict[str, float | None]) -> tuple[float, str]:
    """How much TTFT moves between configurations that do the same prefill work.

    Two estimates, the larger wins (never below NOISE_FLOOR_PCT): the TTFT change of a
    press at keep_ratio 1.0 (it keeps everything) against the full cache, and the
    spread of the full-cache TTFT over samples of equal prompt length.
    """
    estimates = [(NOISE_FLOOR_PCT, f"the {NOISE_FLOOR_PCT:g}% floor for timings")]
    ref = ttft.get(REFERENCE_KEY)
    for key, samples in groups.items():
        p = samples[0]
        if key != REFERENCE_KEY and p.keep_ratio >= 1.0 and ref and ttft.get(key) is not None:
            change = _paired_change(METRIC["ttft_s"], samples, groups.get(REFERENCE_KEY), ttft[key], ref)
            if change is not None:
                estimates.append((abs(change), f"{p.press} at keep_ratio 1.0 vs the full cache"))
    by_len = defaultdict(list)
    for s in _ok(groups.get(REFERENCE_KEY, [])):
        if s.ttft_s is not None:
            by_len[(s.dataset, s.prompt_tokens)].append(s.ttft_s)
    spreads = [(max(xs) - min(xs)) / 2 / statistics.median(xs) * 100.0
               for xs in by_len.values() if len(xs) > 1 and statistics.median(xs) > 0]
    if spreads:
        estimates.append((max(spreads), "the spread of the full-cache TTFT over prompts of equal length"))
    return max(estimates, key=lambda e: e[0])


def _by_config(samples: Iterable[Any]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for s in samples:
        groups[s.config_key].append(s)
    return groups


def _rows_for(groups: dict[str, list[Any]], aggregated: dict[str, tuple[dict, dict, dict]], dataset: str | None,
              noise_pct: float, labels: dict[str, str]) -> list[ConfigRow]:
    ref_values = aggregated.get(REFERENCE_KEY, ({}, {}, {}))[0]

    def cells(group: list[Any]) -> set[tuple]:
        # No run id: the shards of a group split the cells, so a prompt's reference may sit in another run.
        return {(s.dataset, s.sample_index) for s in _ok(group)}

    ref_cells = cells(groups[REFERENCE_KEY]) if REFERENCE_KEY in groups else None
    rows = []
    for key in sorted(groups, key=lambda k: _sort_key(groups[k][0])):
        group, p = groups[key], groups[key][0]
        values, spread, span = aggregated[key]
        changes = {m.name: (None if key == REFERENCE_KEY else
                            _paired_change(m, group, groups.get(REFERENCE_KEY), values[m.name], ref_values.get(m.name)))
                   for m in METRICS}
        ok = _ok(group)
        mem_missing = [s for s in ok if s.peak_mem_bytes is None]
        reasons = sorted({s.peak_mem_reason for s in mem_missing if s.peak_mem_reason})
        kinds = sorted({s.peak_mem_kind for s in ok if s.peak_mem_kind})
        events = [s.compress_events for s in ok if s.compress_events is not None]
        contexts = [s.prompt_tokens + s.new_tokens for s in ok if s.prompt_tokens is not None and s.new_tokens is not None]
        rows.append(ConfigRow(
            config_key=key, label=labels[key], press=p.press, keep_ratio=p.keep_ratio,
            prune_after=p.prune_after, skip_layers=p.skip_layers or "", compress_mode=p.compress_mode,
            keep_recent=p.keep_recent or 0, dataset=dataset, is_reference=key == REFERENCE_KEY,
            n_samples=len(group), n_failed=len(group) - len(ok),
            values=values, changes=changes,
            verdicts={m.name: _verdict(m, changes[m.name], noise_pct) for m in METRICS},
            stdev=spread, span=span, peak_mem_kind=", ".join(kinds) or None,
            peak_mem_reason=("; ".join(reasons) or "not measured") if values["peak_mem_bytes"] is None else None,
            max_context_tokens=max(contexts) if contexts else None,
            compressed_samples=sum(e > 0 for e in events) if events else None,
            paired=None if key == REFERENCE_KEY or ref_cells is None else cells(group) == ref_cells,
        ))
    return rows


def _passkey(samples: Sequence[Any], labels: dict[str, str]) -> tuple[list[PasskeyRow], list[PasskeyCell]]:
    scored = [s for s in _ok(samples) if s.score is not None and s.context_length is not None]
    by_len: dict[tuple[str, int], list[Any]] = defaultdict(list)
    by_cell: dict[tuple[str, float, int], list[Any]] = defaultdict(list)
    for s in scored:
        by_len[(s.config_key, s.context_length)].append(s)
        by_cell[(s.config_key, s.needle_depth, s.context_length)].append(s)

    def acc(group: list[Any]) -> float | None:
        return statistics.fmean(s.score for s in group) if group else None

    rows = []
    for (key, length), group in sorted(by_len.items(), key=lambda kv: (_sort_key(kv[1][0]), kv[0][1])):
        a, ref = acc(group), acc(by_len.get((REFERENCE_KEY, length), []))
        rows.append(PasskeyRow(
            config_key=key, label=labels[key], press=group[0].press, keep_ratio=group[0].keep_ratio,
            passkey_length=length, n=len(group), correct=round(sum(s.score for s in group)), accuracy=a,
            change_pp=None if key == REFERENCE_KEY or ref is None else (a - ref) * 100.0))
    cells = [PasskeyCell(config_key=key, passkey_depth=depth, passkey_length=length, n=len(group),
                         correct=round(sum(s.score for s in group)), accuracy=acc(group))
             for (key, depth, length), group in sorted(by_cell.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2]))]
    return rows, cells


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(timespec="seconds") + ("" if dt.tzinfo else "Z") if dt else None


def _env(env: dict, *keys: str) -> Any:
    """The first of ``keys`` with a value in the run's environment record (engine/env.py)."""
    for k in keys:
        if env.get(k) not in (None, ""):
            return env[k]
    return None


def run_header(runs: Sequence[Any]) -> RunHeader:
    """The header of one run, or of several runs merged by ``--group`` (the first supplies model and env)."""
    first = runs[0]
    env = first.env_json or {}
    status = max((r.status for r in runs),
                 key=lambda s: STATUS_SEVERITY.index(s) if s in STATUS_SEVERITY else len(STATUS_SEVERITY))
    planned = [r.samples_planned for r in runs]
    on_gpu = str(first.device or env.get("device") or "").startswith("cuda")
    started = min(r.started_utc for r in runs)
    ended = max(r.ended_utc for r in runs) if all(r.ended_utc for r in runs) else None
    return RunHeader(
        run_ids=[r.id for r in runs], command=first.command, task=first.task, status=status,
        group_name=first.group_name, shard=first.shard if len(runs) == 1 else None,
        model=first.model_requested, model_resolved=first.model_resolved, model_hash=first.model_hash,
        dtype=first.dtype, device=first.device,
        device_name=_env(env, "gpu_name") if on_gpu else _env(env, "cpu_model"),
        threads=_env(env, "torch_threads", "threads"),
        torch_version=_env(env, "torch"),
        transformers_version=_env(env, "transformers"),
        knormctl_version=first.knormctl_version or _env(env, "knormctl"),
        git_commit=first.git_commit or _env(env, "git_commit"), git_dirty=env.get("git_dirty"),
        started_utc=_iso(started),
        ended_utc=_iso(ended) if ended else None,
        duration_s=(ended - started).total_seconds() if ended else None,
        samples_done=sum(r.samples_done or 0 for r in runs),
        samples_failed=sum(r.samples_failed or 0 for r in runs),
        samples_planned=sum(planned) if all(p is not None for p in planned) else None,
        command_line=first.command_line or "",
    )


def first_line(text: str | None) -> str | None:
    """The first non-blank line of an error or message (tracebacks stay in the database)."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[0] if lines else None


def _run_flags(runs: Sequence[Any], samples: Sequence[Any]) -> list[Flag]:
    """Interrupted, failed and still-running runs. The store marks a run whose process is
    gone (dead pid, stale heartbeat) as interrupted and says why in ``error``."""
    stored = defaultdict(int)
    for s in samples:
        stored[s.run_id] += 1
    flags = []
    for r in runs:
        done, planned = stored[r.id], r.samples_planned
        cells = (f"{done} of {planned} planned cells finished" if planned is not None
                 else f"{done} cells finished (planned count unknown)")
        why = f" \u2014 {first_line(r.error)}" if first_line(r.error) else ""
        if r.status == "interrupted":
            flags.append(Flag("interrupted", f"run {r.id} was interrupted: {cells}{why}."))
        elif r.status == "failed":
            flags.append(Flag("run_failed", f"run {r.id} failed: {cells}{why}."))
        elif r.status == "running":
            flags.append(Flag("running", f"run {r.id} is still running: {cells} so far."))
    return flags


def _row_flags(rows: list[ConfigRow], noise_pct: float, noise_source: str) -> list[Flag]:
    flags = []
    refs = {r.dataset: r for r in rows if r.is_reference}
    if rows and not refs:
        flags.append(Flag("no_reference", "no full-cache reference (press none) in these samples: "
                                          "changes against it cannot be computed."))
    for r in rows:
        where = f"{r.label}" + (f" on {r.dataset}" if r.dataset else "")
        if r.is_reference:
            continue
        ref = refs.get(r.dataset)
        if r.compressed_samples == 0 and r.keep_ratio >= 1.0:
            flags.append(Flag("no_compression", f"{where}: keep_ratio 1.0 keeps every entry, so it evicts nothing; "
                                                f"it measures the press's own overhead, not compression.",
                              r.config_key))
        elif r.compressed_samples == 0:
            longest = f"; the longest was {r.max_context_tokens} tokens" if r.max_context_tokens else ""
            flags.append(Flag("no_compression", f"{where}: no sample triggered a compression (prompt + new tokens "
                                                f"never exceeded prune_after={r.prune_after}{longest}), so its "
                                                f"numbers say nothing about compression.", r.config_key))
        if r.paired is False:
            flags.append(Flag("unpaired", f"{where}: its successful samples are not the same prompts as the full "
                                          f"cache's ({r.n_samples - r.n_failed} vs {ref.n_samples - ref.n_failed}), "
                                          f"so its changes mix prompt differences with compression.", r.config_key))
        tpot_change = r.changes.get("tpot_s")
        if r.keep_ratio >= 1.0 and tpot_change is not None and abs(tpot_change) > NOISY_SAME_WORK_PCT:
            flags.append(Flag("noisy_timing", f"{where} evicts nothing, yet its TPOT differs from the full cache by "
                                              f"{tpot_change:+.1f}%: this run's timings were disturbed (other load "
                                              f"on the machine?). Speed changes of that size are not evidence; rerun "
                                              f"on a quiet machine with --threads pinned.", r.config_key))
        change = r.changes.get("ttft_s")
        if r.verdicts["ttft_s"] == "artifact":
            what = ("not a gain" if change < 0 else
                    f"not a slower prefill (unless it is the cut itself: median compression time "
                    f"{(r.values['compress_time_s'] or 0) * 1e3:.1f} ms)")
            flags.append(Flag("ttft_artifact", f"{where}: TTFT {abs(change):.1f}% {'lower' if change < 0 else 'higher'} "
                                               f"than the full cache, beyond this run's noise (±{noise_pct:.1f}%, "
                                               f"{noise_source}). Compression only acts after the prefill (the prefill "
                                               f"forward is identical; the only prefill-time work is the cut right "
                                               f"after it), so this is a timing artifact, {what}.", r.config_key))
    return flags


def _failed_flags(samples: Sequence[Any], labels: dict[str, str]) -> list[Flag]:
    flags = []
    for s in sorted((s for s in samples if s.error), key=lambda s: (s.run_id, s.sample_index, s.config_key)):
        flags.append(Flag("failed_sample", f"sample {s.sample_index} ({s.dataset}, {labels.get(s.config_key, s.config_key)}, "
                                           f"run {s.run_id}) failed: {first_line(s.error) or '(empty error)'}",
                          s.config_key))
    return flags


def build_summary(runs: Sequence[Any], samples: Sequence[Any], *, by_dataset: bool = False) -> Summary:
    """Aggregate stored samples of one run (or a merged group) into the report data.

    ``runs``: Run rows (ORM or alike); ``samples``: their Sample rows. Blob columns are
    used only when loaded: per-step latencies for plots, and a NULL ``token_match`` is
    filled in place from the generated ids (so ``--samples`` shows the same value).
    """
    if not runs:
        raise ValueError("build_summary needs at least one run")
    _fill_token_match(samples)
    protos = {}
    for s in samples:
        protos.setdefault(s.config_key, s)
    labels = _labels(protos)

    groups = _by_config(samples)
    aggregated = {k: _aggregate(v) for k, v in groups.items()}
    noise_pct, noise_source = _ttft_noise(groups, {k: v[0]["ttft_s"] for k, v in aggregated.items()})

    if by_dataset:
        rows = []
        for d in sorted({s.dataset for s in samples}):
            sub = _by_config(s for s in samples if s.dataset == d)
            rows += _rows_for(sub, {k: _aggregate(v) for k, v in sub.items()}, d, noise_pct, labels)
    else:
        rows = _rows_for(groups, aggregated, None, noise_pct, labels)
    passkey, cells = _passkey(samples, labels)

    steps: dict[str, list[float]] = {}
    for s in _ok(samples):
        lat = _loaded(s, "step_latencies_json")
        if lat:
            steps.setdefault(s.config_key, []).extend(float(x) for x in lat)

    flags = (_run_flags(runs, samples) + _row_flags(rows, noise_pct, noise_source)
             + _failed_flags(samples, labels))
    return Summary(header=run_header(runs), rows=rows, passkey=passkey, passkey_cells=cells, flags=flags,
                   noise_pct=noise_pct, noise_source=noise_source, by_dataset=by_dataset, step_latencies=steps)


# ---------------------------------------------------------------- per-sample view and comparison

SAMPLE_FIELDS = (
    "run_id", "sample_index", "dataset", "doc_title", "config_key", "press", "keep_ratio", "prune_after",
    "skip_layers", "compress_mode", "keep_recent", "prompt_tokens", "new_tokens", "ttft_s", "tpot_s",
    "itl_p50_s", "itl_p90_s", "itl_p99_s", "throughput_tps", "total_s", "peak_mem_bytes", "peak_mem_kind",
    "peak_mem_reason", "kv_bytes_peak", "kv_bytes_final", "compress_events", "compress_time_s", "ppl_context",
    "ppl_compressed", "eval_tokens", "token_match", "subtask", "needle_depth", "context_length", "answers_json", "score",
    "error",
)


def sample_rows(samples: Sequence[Any]) -> list[dict[str, Any]]:
    """Per-sample rows (``--samples``), in a stable column order, sorted by config then sample."""
    ordered = sorted(samples, key=lambda s: (_sort_key(s), s.dataset, s.sample_index, s.run_id))
    return [{f: getattr(s, f) for f in SAMPLE_FIELDS} for s in ordered]


@dataclass
class CompareRow:
    config_key: str
    label: str
    dataset: str | None
    a: dict[str, float | None]
    b: dict[str, float | None]
    ratio: dict[str, float | None]  # b / a


@dataclass
class Comparison:
    a: RunHeader
    b: RunHeader
    rows: list[CompareRow]
    only_in_a: list[str]
    only_in_b: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def same_model(a: RunHeader, b: RunHeader) -> bool:
    if a.model_hash and b.model_hash:
        return a.model_hash == b.model_hash
    return (a.model_resolved or a.model) == (b.model_resolved or b.model)


def compare(sa: Summary, sb: Summary) -> Comparison:
    """The configurations present in both summaries, side by side, with ratios B/A."""
    index_a = {(r.dataset, r.config_key): r for r in sa.rows}
    index_b = {(r.dataset, r.config_key): r for r in sb.rows}
    rows = []
    for key, ra in index_a.items():
        rb = index_b.get(key)
        if rb is None:
            continue
        ratio = {m.name: (rb.values[m.name] / ra.values[m.name]
                          if ra.values[m.name] not in (None, 0) and rb.values[m.name] is not None else None)
                 for m in METRICS}
        rows.append(CompareRow(config_key=ra.config_key, label=ra.label, dataset=ra.dataset,
                               a=dict(ra.values), b=dict(rb.values), ratio=ratio))
    return Comparison(a=sa.header, b=sb.header, rows=rows,
                      only_in_a=[r.config_key for k, r in index_a.items() if k not in index_b],
                      only_in_b=[r.config_key for k, r in index_b.items() if k not in index_a])


def run_datasets(run: Any) -> str:
    """The text sources a run asked for, from its stored config (cheap: no sample query)."""
    cfg = run.config_json or {}
    if run.task == "passkey":
        return "passkey"
    parts = []
    for kind in ("wikitext", "pg19"):
        n, source = cfg.get(f"num_{kind}_samples"), cfg.get(f"{kind}_source")
        if n:
            parts.append(f"{source or kind} x{n}")
    return ", ".join(parts) or "-"


# ---------------------------------------------------------------- formatting shared by tables, markdown, figures

def fmt_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            break
    return f"{n:.1f} {unit}"


def fmt_value(name: str, value: float | None) -> str:
    """A metric value for humans: ms below one second, binary units for bytes, % for fractions."""
    if value is None:
        return "N/A"
    spec = METRIC[name]
    if spec.unit == "s":
        return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if spec.unit == "B":
        return fmt_bytes(value)
    if spec.unit == "tok/s":
        return f"{value:.1f}"
    if spec.points:
        return f"{value * 100:.1f}%"
    if name == "compress_events":
        return f"{value:g}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def fmt_change(name: str, change: float | None) -> str:
    if change is None:
        return ""
    unit = " pp" if METRIC[name].points else "%"
    return f"{change:+.1f}{unit}".replace("-", "\u2212")
