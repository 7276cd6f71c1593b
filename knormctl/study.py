"""Study files: many runs (models, budgets, modes, dtypes, tasks ...) planned from one TOML file.

A study file's keys are ``sweep``'s option names in snake_case (the fields of
``RunConfig``). Any key may hold a list: a list of values for a scalar option (``model``,
``prune_after``, ``dtype`` ...) and a list of lists for a list option (``skip_layers =
[[0], []]``) are *axes*; the study runs their cross product, one run per combination,
all tagged with the study's name as their group. ``presses`` and ``keep_ratios`` are
lists inside ONE run already (a sweep measures every press x keep ratio on the same
prompts), so a plain list there is the run's value, not an axis.

``[[rows]]`` tables list explicit combinations instead: each row overrides the
top-level settings (and may hold axes of its own).

Command-line flags override the file (the whole key); the resolved study is stored
with every run it planned, so a study can be continued from the database alone.

Torch-free: planning a study (``--dry-run``) never loads a model.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import re
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from knormctl.config import TASK_OPTIONS, RunConfig, other_tasks_message, task_reads
from knormctl.errors import UsageError

NOT_STUDY_KEYS = ("command", "group", "study")  # set by the study itself
STUDY_META_KEYS = ("name", "description", "rows")
ROWS = "rows"


@dataclass
class PlannedRun:
    """One run of a study: its index, the settings that vary, and the validated config."""

    index: int
    varying: dict[str, Any]
    config: RunConfig

    @property
    def key(self) -> str:
        """Identity of the run inside its study (resume matches stored runs by it)."""
        return study_run_key(self.config)


@dataclass
class Study:
    name: str
    source: str  # the file it came from ("" when built in code)
    runs: list[PlannedRun]
    axes: list[str]  # keys that take more than one value across the runs, in file order
    resolved: dict[str, Any]  # what is stored with each run (config_json["study"])

    def models(self) -> list[str]:
        return sorted({r.config.model for r in self.runs})


# 2: a question task's default compress_mode is prefill (1, unmarked: decode for every task).
PLAN_VERSION = 2


def key_id(key: str) -> str:
    """A short stand-in for a run's key (stored once per planned run with every run)."""
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def study_run_key(cfg: RunConfig) -> str:
    """The resolved settings that define a run (not where it is stored or how it is split, nor
    the options its task does not read)."""
    d = cfg.to_dict()
    for k in ("group", "shard", "threads", "study"):
        d.pop(k, None)
    return _key(d)


def normalized_key(key: str) -> str:
    """A stored run key as ``study_run_key`` makes it now: keys stored before the options a
    run's task does not read were left out (a passkey run of a passkey+niah study kept the
    file's needle_depths) match the same run planned again."""
    try:
        return _key(dict(ast.literal_eval(key)))
    except (ValueError, SyntaxError, TypeError):
        return key


def _key(settings: dict[str, Any]) -> str:
    """A run's key from its settings: those its task reads, sorted."""
    return repr(sorted((k, v) for k, v in settings.items() if task_reads(settings.get("task"), k)))


# ----------------------------------------------------------------------------- types

def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in fields(RunConfig) if f.name not in NOT_STUDY_KEYS}


def _strip_optional(tp) -> tuple[Any, bool]:
    """(T, optional) for ``T | None``; (tp, False) otherwise."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _is_list_type(tp) -> bool:
    return typing.get_origin(_strip_optional(tp)[0]) is list


def _type_name(tp) -> str:
    tp, optional = _strip_optional(tp)
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}s"
    name = {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, str(tp))
    return name


def _fits(value: Any, tp) -> bool:
    """Does a TOML value fit the field type (no coercion except int -> float)?"""
    tp, _ = _strip_optional(tp)
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_fits(v, inner) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _coerce(value: Any, tp) -> Any:
    tp, _ = _strip_optional(tp)
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner) for v in value]
    if tp is float:
        return float(value)
    return value


# ----------------------------------------------------------------------------- errors with lines

class _Lines:
    """Finds the line of a key in the file, for error messages (tomllib gives no positions)."""

    _SECTION = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-]+)\s*\]\]?")

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def of(self, key: str, row: int | None = None) -> int | None:
        """1-based line of ``key = ...`` at top level (row None) or in the row-th [[rows]] table."""
        pattern = re.compile(rf"^\s*(?:\"{re.escape(key)}\"|'{re.escape(key)}'|{re.escape(key)})\s*=")
        section, seen_rows = None, -1
        for n, line in enumerate(self.lines, 1):
            m = self._SECTION.match(line)
            if m:
                section = m.group(1)
                if row is None and section == key:  # a table where a value was expected
                    return n
                if section == ROWS and line.lstrip().startswith("[["):
                    seen_rows += 1
                continue
            in_place = section is None if row is None else (section == ROWS and seen_rows == row)
            if in_place and pattern.match(line):
                return n
        return None


def _error(path: str, lines: _Lines | None, key: str, message: str, row: int | None = None) -> UsageError:
    where = f"{path}"
    line = lines.of(key, row) if lines is not None else None
    if line is not None:
        where += f", line {line}"
    elif row is not None:
        where += f", rows[{row}]"
    return UsageError(f"{where}: {key}: {message}")


# ----------------------------------------------------------------------------- parsing

EMPTY_ALLOWED = ("skip_layers",)  # [] (--skip-layers none): every layer is compressed
# What one run sweeps against its own full cache: never an axis of runs (the report would merge
# the runs as one sweep's shards, each with a full cache of its own).
SIDE_BY_SIDE = {"presses": "presses", "keep_ratios": "keep ratios"}
# Settings a study's runs are not told apart by (study_run_key leaves them out).
NOT_AN_AXIS = {"threads": "cannot vary between a study's runs: it is the machine's set-up, not a setting of "
                          "the run (give one value; --threads on the command line sets it for every run)"}

def _wrong_alone(key: str, value: Any, exc: UsageError) -> bool:
    """Whether an option given on the command line is refused for itself (``--keep-ratios 90``),
    not for what one run of the study combines it with: then no run is named."""
    try:
        RunConfig(command="sweep", **{key: value}).validate(local=False)
    except UsageError as alone:
        return str(alone) == str(exc)
    return False


# sweep's options that say how to run, not what: the command line's only
COMMAND_LINE_ONLY = {"db": "--db", "config": "--config", "dry_run": "--dry-run", "resume": "--resume",
                     "resume_group": "--resume-group", "json": "--json", "json_out": "--json", "verbose": "--verbose"}


def _check_settings(settings: dict[str, Any], path: str, lines: _Lines | None, row: int | None) -> dict[str, list]:
    """Validate one table of settings; return key -> list of values (length 1 = fixed)."""
    types_ = _field_types()
    out: dict[str, list] = {}
    for key, value in settings.items():
        if key in COMMAND_LINE_ONLY:
            raise _error(path, lines, key, f"{COMMAND_LINE_ONLY[key]} is given on the command line, not in a study "
                                           "file (the file holds the runs' settings)", row)
        if key not in types_:
            close = get_close_matches(key, list(types_) + list(STUDY_META_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _error(path, lines, key, f"unknown key{hint}; keys are sweep's option names in snake_case",
                         row)
        tp = types_[key]
        if isinstance(value, dict):
            raise _error(path, lines, key, f"expected {_type_name(tp)}, got a table", row)
        if isinstance(value, list) and not value and key not in EMPTY_ALLOWED:
            raise _error(path, lines, key, "empty list", row)
        if _is_list_type(tp):
            # a list of lists is an axis; a flat list is the run's value
            if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
                values = value
            else:
                values = [value]
            for v in values:
                if isinstance(v, list) and not v and key not in EMPTY_ALLOWED:
                    raise _error(path, lines, key, "empty list", row)
                if not _fits(v, tp):
                    raise _error(path, lines, key, f"expected {_type_name(tp)}, got {v!r}", row)
                if isinstance(v, list) and len({repr(x) for x in v}) != len(v):
                    # as the command line refuses them: a repeated keep ratio or press is one cell
                    # measured twice, and the run stopped at the second (UNIQUE constraint)
                    raise _error(path, lines, key, f"duplicate values in {v!r}", row)
        else:
            values = value if isinstance(value, list) else [value]
            for v in values:
                if not _fits(v, tp):
                    raise _error(path, lines, key, f"expected {_type_name(tp)}"
                                 + (" or a list of them" if not isinstance(value, list) else "")
                                 + f", got {v!r}", row)
        if len({repr(v) for v in values}) != len(values):
            raise _error(path, lines, key, f"duplicate values in {value!r}", row)
        out[key] = [_coerce(v, tp) for v in values]
    return out


def _reads(settings: dict[str, Any], key: str) -> bool:
    """Whether the run of these settings reads option ``key`` (its task does)."""
    return task_reads(settings.get("task", RunConfig.task), key)


def _drop_options_of_other_tasks(planned: list[dict[str, Any]], origin: list[int], row_tables: list[dict],
                                 overrides: dict[str, Any], path: str,
                                 lines: _Lines | None) -> tuple[list[dict[str, Any]], list[int]]:
    """Options only some tasks read (``config.TASK_OPTIONS``), as sweep refuses them for another
    task. Refused where no run it applies to reads it: the command line's or the top level's
    when no run of the study reads it, a ``[[rows]]`` table's when none of that row's runs
    does. Otherwise a run whose task does not read it runs without it (at its default, so its
    stored config claims no setting it ignored), and runs that then differ in nothing become
    one. ``origin``: each planned run's row; returned filtered alike."""
    def tasks_of(runs) -> list[str]:
        return sorted({s.get("task", RunConfig.task) for s in runs})

    for key in dict.fromkeys(k for s in planned for k in s):
        if key not in TASK_OPTIONS:
            continue
        if key in overrides or not any(key in t for t in row_tables):  # set for every run
            if not any(_reads(s, key) for s in planned):
                msg = other_tasks_message(key, tasks_of(planned))
                raise UsageError(msg) if key in overrides else _error(path, lines, key, msg)
            continue
        for i, table in enumerate(row_tables):
            runs = [s for s, o in zip(planned, origin) if o == i]
            if key in table and not any(_reads(s, key) for s in runs):
                raise _error(path, lines, key, other_tasks_message(key, tasks_of(runs)), row=i)
    out, rows_of, seen = [], [], set()
    for settings, row in zip(planned, origin):
        kept = {k: v for k, v in settings.items() if _reads(settings, k)}
        if kept != settings:
            ident = _key(kept)  # what makes it the same run as another
            if ident in seen:
                continue  # the same run as one already planned, once the ignored option is gone
            seen.add(ident)
        out.append(kept)
        rows_of.append(row)
    return out, rows_of


def _combinations(table: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(table)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(table[k] for k in keys))]


def parse_study(text: str, *, path: str = "study.toml", overrides: dict[str, Any] | None = None,
                name: str | None = None) -> Study:
    """Parse and plan a study. ``overrides``: options given on the command line (field name ->
    value, already parsed), which replace the file's key entirely. Raises UsageError with the
    file, line and key of the first problem, before anything runs."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    return plan_study(data, path=path, overrides=overrides, name=name, lines=_Lines(text))


def study_from_stored(resolved: dict[str, Any]) -> Study:
    """The study as planned when its runs were stored (``config_json["study"]``): continuing a
    study needs only the database, not the file."""
    data = dict(resolved.get("settings") or {})
    for key in ("name", "description"):
        if resolved.get(key) is not None:
            data[key] = resolved[key]
    if resolved.get("rows"):
        data[ROWS] = resolved["rows"]
    given = [data, *(resolved.get("rows") or []), resolved.get("overrides") or {}]
    if resolved.get("plan") is None and not any("compress_mode" in t for t in given):
        data["compress_mode"] = "decode"  # planned when every task defaulted to decode: continue it as it ran
    return plan_study(data, path=resolved.get("source") or "stored study", overrides=resolved.get("overrides"))


def plan_study(data: dict[str, Any], *, path: str = "study.toml", overrides: dict[str, Any] | None = None,
               name: str | None = None, lines: _Lines | None = None) -> Study:
    """Plan a study from its parsed settings (see ``parse_study``)."""
    data = dict(data)
    study_name = data.pop("name", None)
    description = data.pop("description", None)
    rows = data.pop(ROWS, None)
    if study_name is not None and (not isinstance(study_name, str) or not study_name.strip()):
        raise _error(path, lines, "name", "expected a non-empty string")
    if description is not None and not isinstance(description, str):
        raise _error(path, lines, "description", "expected a string")
    if rows is not None and not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)):
        raise _error(path, lines, ROWS, "expected one or more [[rows]] tables")
    study_name = name or study_name or Path(path).stem

    # Study resume finds runs by their settings, shard left out: shards of one study on two
    # machines would take each other's runs. One check for the file and the command line.
    if overrides and "shard" in overrides:
        raise UsageError("--shard cannot be combined with --config: a study runs on one machine (to spread one "
                         "over machines, give each machine a study file of its own rows, with its own name)")
    if "shard" in data or any(isinstance(r, dict) and "shard" in r for r in rows or []):
        raise _error(path, lines, "shard", "a study runs on one machine; give each machine a study file of "
                                           "its own rows, with its own name")
    base = _check_settings(data, path, lines, None)
    overrides = dict(overrides or {})
    if overrides:
        base.update(_check_settings(overrides, "command line", None, None))
    row_tables = [_check_settings(r, path, lines, i) for i, r in enumerate(rows or [{}])]

    planned: list[dict[str, Any]] = []
    origin: list[int] = []  # the [[rows]] table each planned run comes from
    for i, table in enumerate(row_tables):
        merged = {**base, **{k: v for k, v in table.items() if k not in overrides}}
        combos = _combinations(merged)
        planned.extend(combos)
        origin.extend([i] * len(combos))
    planned, origin = _drop_options_of_other_tasks(planned, origin, row_tables if rows else [], overrides, path,
                                                   lines)
    # One model loaded at a time: runs of the same model (and dtype, device) run back to back.
    order = sorted(range(len(planned)), key=lambda j: (planned[j].get("model", RunConfig.model),
                                                       planned[j].get("dtype", RunConfig.dtype),
                                                       planned[j].get("device", RunConfig.device)))
    planned, origin = [planned[j] for j in order], [origin[j] for j in order]

    axes = [k for k in dict.fromkeys(k for s in planned for k in s)
            if len({repr(s.get(k)) for s in planned if _reads(s, k)}) > 1]
    for key in [k for k in axes if k in SIDE_BY_SIDE or k in NOT_AN_AXIS]:  # a list of lists, or [[rows]] that differ
        raise _error(path, lines, key, NOT_AN_AXIS.get(key) or f"every run measures its {SIDE_BY_SIDE[key]} side "
                                                              "by side against one full cache; give every run one "
                                                              "flat list, the same")
    tasks = {s.get("task", RunConfig.task) for s in planned}
    if "lm" in tasks and len(tasks) > 1:
        raise _error(path, lines, "task", "lm (perplexity) and question tasks (accuracy) cannot share a study: "
                                          "its frontier and budgets rank one quality measure; make two studies")
    runs, seen = [], {}
    for i, settings in enumerate(planned):
        try:
            cfg = RunConfig(command="sweep", group=study_name, **settings).validate()
        except UsageError as exc:
            msg = str(exc).replace("-", "_")
            # the option the message opens with ("--context-lengths: ..."), else the first one it names
            named = re.match(r"__([a-z0-9_]+)", msg)
            bad = (named.group(1) if named and named.group(1) in settings else None) or next(
                (k for k in settings if k in msg), None) or next(
                (k for k in settings if k.endswith("s") and k[:-1] in msg), None)
            where = f" (run {i + 1}: {_describe({k: settings[k] for k in axes if k in settings})})" if axes else ""
            if bad is not None and bad in overrides:  # the command line's: the file holds no such key
                raise UsageError(f"{exc}{'' if _wrong_alone(bad, overrides[bad], exc) else where}") from None
            if bad is not None:
                row = origin[i] if rows and bad in row_tables[origin[i]] else None
                raise _error(path, lines, bad, f"{exc}{where}", row=row) from None
            raise UsageError(f"{path}: {exc}{where}") from None
        # a row that leaves an axis out runs it at the option's default: show that value, not None
        varying = {k: settings[k] if k in settings else getattr(cfg, k, None) for k in axes if _reads(settings, k)}
        run = PlannedRun(index=len(runs), varying=varying, config=cfg)
        if run.key in seen:
            raise UsageError(f"{path}: runs {seen[run.key] + 1} and {i + 1} are identical "
                             f"({_describe(run.varying) or 'no setting varies'}); remove the duplicate row")
        seen[run.key] = i
        runs.append(run)

    resolved = {
        "name": study_name, "description": description, "source": path,
        "settings": {k: v for k, v in data.items()}, "rows": rows or [], "overrides": overrides,
        "axes": axes, "runs": len(runs), "plan": PLAN_VERSION,
        "key_ids": [key_id(r.key) for r in runs],  # which runs the plan holds: the report names those missing
    }
    for run in runs:  # stored with every run: the study can be continued from the database alone
        run.config.study = {**resolved, "index": run.index, "key": run.key}
    return Study(name=study_name, source=path, runs=runs, axes=axes, resolved=resolved)


def load_study(path: str | Path, *, overrides: dict[str, Any] | None = None, name: str | None = None) -> Study:
    """Read a study file (one line on bad input: missing, unreadable, not UTF-8)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path}: is a folder, not a study file") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror})") from None
    return parse_study(text, path=str(path), overrides=overrides, name=name)


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())
