"""Who measured what, where: the header of one run or of a merged ``--group``, with every
machine the group ran on (a group's shards may run on several hosts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from knormctl.store.locations import hide_passwords_in_command

STATUS_SEVERITY = ("complete", "complete_with_errors", "running", "interrupted", "failed")


@dataclass
class Machine:
    """The environment of one or more runs, as stored with them (engine/env.py's record)."""

    run_ids: list[int]
    hostname: str | None
    device: str | None
    device_name: str | None  # GPU name, else CPU model
    threads: int | None
    dtype: str | None
    torch_version: str | None
    transformers_version: str | None
    knormctl_version: str | None
    git_commit: str | None
    git_dirty: bool | None  # uncommitted changes in the checkout that ran

    def identity(self) -> tuple:
        return tuple(getattr(self, f) for f in MACHINE_FIELDS)


# What must agree between the runs of a group for their numbers to pool (the rest is context).
MACHINE_FIELDS = ("hostname", "device", "device_name", "threads", "dtype", "torch_version", "transformers_version",
                  "knormctl_version", "git_commit", "git_dirty")
DIFFER_LABELS = {"hostname": "host", "device": "device", "device_name": "device model", "threads": "threads",
                 "dtype": "dtype", "torch_version": "torch version", "transformers_version": "transformers version",
                 "knormctl_version": "knormctl version", "git_commit": "knormctl commit", "git_dirty": "dirty checkout"}


@dataclass
class RunHeader:
    """Who measured what, where. For a merged ``--group`` several run ids and maybe several
    machines; a machine field at the top level is None when the runs disagree on it."""

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
    device_name: str | None
    threads: int | None
    torch_version: str | None
    transformers_version: str | None
    knormctl_version: str | None
    git_commit: str | None
    git_dirty: bool | None
    started_utc: str | None  # ISO 8601, UTC
    ended_utc: str | None
    duration_s: float | None  # first start to last end, less the time one run sat stopped before a resume
    samples_done: int
    samples_failed: int
    samples_planned: int | None
    command_line: str
    machines: list[Machine]  # one per distinct environment, in run order
    differs: list[str]  # what the machines disagree on (MACHINE_FIELDS names); [] for one machine
    batch_size: int = 1  # the largest batch its stored cells ran in (before any: --batch-size)
    decode_step: str | None = "launched"  # --decode-step of the run(s); None when merged runs differ
    prefill_chunk: int | None = 0  # --prefill-chunk of the run(s) (0: one forward); None when merged runs differ
    stopped_s: float = 0.0  # the runs' time stopped between an interruption and a resume
    # a question task's settings that change its scores ('protocol context, chat template auto, ...'); None: lm
    task_settings: str | None = None

    @property
    def title(self) -> str:
        ids = ",".join(map(str, self.run_ids))
        return f"run {ids}" if len(self.run_ids) == 1 else f"runs {ids}"

    @property
    def cells_text(self) -> str:
        """'8 of 10 planned cells, 1 failed'."""
        return ((f"{self.samples_done} of {self.samples_planned} planned cells" if self.samples_planned is not None
                 else f"{self.samples_done} cell{'' if self.samples_done == 1 else 's'}") + (f", {self.samples_failed} failed" if self.samples_failed else ""))

    @property
    def deployment(self) -> list[str]:
        """How the run(s) ran where it changes the timings or the memory: batch, chunked prefill,
        decode step ([] for one row, one prefill forward, the model's own launched step)."""
        out = [f"batch {self.batch_size} (throughput per row)"] if self.batch_size > 1 else []
        if self.prefill_chunk is None:
            out.append("prefill chunks differ between runs")
        elif self.prefill_chunk:
            out.append(f"prefill in chunks of {self.prefill_chunk} tokens, cut after each")
        if self.decode_step is None:
            out.append("decode steps differ between runs")
        elif self.decode_step != "launched":
            out.append(f"decode step {self.decode_step}")
        return out

    @property
    def report_command(self) -> str:
        """The report that shows these numbers: the group's when runs were merged by --group."""
        if len(self.run_ids) > 1 and self.group_name:
            return f"knormctl report --group {self.group_name}"
        return f"knormctl report --run-id {self.run_ids[0]}"


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(timespec="seconds") + ("" if dt.tzinfo else "Z") if dt else None


def _env(env: dict, *keys: str) -> Any:
    """The first of ``keys`` with a value in the run's environment record (engine/env.py)."""
    for k in keys:
        if env.get(k) not in (None, ""):
            return env[k]
    return None


def machine_of(run: Any) -> Machine:
    env = run.env_json or {}
    on_gpu = str(run.device or env.get("device") or "").startswith("cuda")
    return Machine(
        run_ids=[run.id], hostname=getattr(run, "hostname", None) or _env(env, "hostname", "host"),
        device=run.device or _env(env, "device"),
        device_name=_env(env, "gpu_name") if on_gpu else _env(env, "cpu_model"),
        threads=_env(env, "torch_threads", "threads"), dtype=run.dtype,
        torch_version=_env(env, "torch"), transformers_version=_env(env, "transformers"),
        knormctl_version=run.knormctl_version or _env(env, "knormctl"),
        git_commit=run.git_commit or _env(env, "git_commit"), git_dirty=env.get("git_dirty"))


def machines_of(runs: Sequence[Any]) -> tuple[list[Machine], list[str]]:
    """Distinct environments (runs that share one are merged) and the fields they disagree on."""
    merged: dict[tuple, Machine] = {}
    for r in runs:
        m = machine_of(r)
        if m.identity() in merged:
            merged[m.identity()].run_ids.append(r.id)
        else:
            merged[m.identity()] = m
    machines = list(merged.values())
    differs = [f for f in MACHINE_FIELDS if len({getattr(m, f) for m in machines}) > 1]
    return machines, differs


def run_header(runs: Sequence[Any]) -> RunHeader:
    """The header of one run, or of several runs merged by ``--group``."""
    first = runs[0]
    status = max((r.status for r in runs),
                 key=lambda s: STATUS_SEVERITY.index(s) if s in STATUS_SEVERITY else len(STATUS_SEVERITY))
    planned = [r.samples_planned for r in runs]
    started = min(r.started_utc for r in runs)
    ended = max(r.ended_utc for r in runs) if all(r.ended_utc for r in runs) else None
    stopped = sum(getattr(r, "stopped_s", None) or 0.0 for r in runs)
    # one run: its stops are gaps in its own span. Merged runs (shards) may have run side by
    # side, so one run's stop is not a gap in the group's span: that span stays as it is.
    duration = (ended - started).total_seconds() - (stopped if len(runs) == 1 else 0.0) if ended else None
    machines, differs = machines_of(runs)
    shared = {f.name: (None if f.name in differs else getattr(machines[0], f.name))
              for f in fields(Machine) if f.name in MACHINE_FIELDS and f.name != "hostname"}
    return RunHeader(
        run_ids=[r.id for r in runs], command=first.command, task=first.task, status=status,
        group_name=first.group_name, shard=first.shard if len(runs) == 1 else None,
        model=first.model_requested, model_resolved=first.model_resolved, model_hash=first.model_hash,
        **shared,
        started_utc=_iso(started),
        ended_utc=_iso(ended) if ended else None,
        duration_s=duration, stopped_s=stopped,
        samples_done=sum(r.samples_done or 0 for r in runs),
        samples_failed=sum(r.samples_failed or 0 for r in runs),
        samples_planned=sum(planned) if all(p is not None for p in planned) else None,
        command_line=hide_passwords_in_command(first.command_line) or "",
        machines=machines, differs=differs,
        batch_size=max(int((getattr(r, "config_json", None) or {}).get("batch_size") or 1) for r in runs),
        decode_step=_shared([(getattr(r, "config_json", None) or {}).get("decode_step") or "launched" for r in runs]),
        prefill_chunk=_shared([int((getattr(r, "config_json", None) or {}).get("prefill_chunk") or 0) for r in runs]),
        task_settings=task_settings(runs),
    )


# A question task's settings that change what its scores mean, as the header names them; the
# protocol above all (paper: the first answer token is read before any cut)
TASK_SETTINGS = (("protocol", "protocol"), ("chat_template", "chat template"), ("answer_tokens", "answer tokens"),
                 ("haystack", "haystack"), ("ruler_source", "RULER source"), ("hub_dataset", "dataset"))


def task_settings(runs: Sequence[Any]) -> str | None:
    """'protocol context, chat template auto, answer tokens per subtask, haystack pg19 (text:/b)'
    for a question task's run (only the settings its task reads; merged runs are shards of one
    sweep, the same settings: runs that differ in them read as a study); None for lm."""
    from knormctl.config import task_reads

    task = runs[0].task
    if task in (None, "lm"):
        return None
    config = getattr(runs[0], "config_json", None) or {}

    def shown(key: str) -> str:
        value = config.get(key)
        if key == "answer_tokens" and value is None:  # passkey: --passkey-new-tokens; the others per subtask
            return str(config.get("passkey_new_tokens", "default")) if task == "passkey" else "per subtask"
        if key == "haystack" and value is None:
            return f"{config.get('pg19_source') or 'default'} (--pg19-source)"
        return "default" if value is None else str(value)

    parts = [f"{label} {shown(key)}" for key, label in TASK_SETTINGS if task_reads(task, key) and key in config]
    return ", ".join(parts) or None


def _shared(values: list):
    """The value every run has, or None when they differ."""
    return values[0] if len(set(values)) == 1 else None
