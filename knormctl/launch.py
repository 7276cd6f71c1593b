"""Where a run runs: its shard of a sweep (``--shard I/N`` or ``auto`` from Slurm / torchrun) and
its GPU under torchrun. Torch-free."""

from __future__ import annotations

import os
from collections.abc import Mapping

from knormctl.errors import UsageError as ConfigError


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4): shard I of N, 1-based."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 1/4) or be auto, got {text!r}") from None
    if n < 1 or not (1 <= i <= n):
        raise ConfigError(f"--shard {text!r}: need 1 <= I <= N")
    return i, n


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "").strip()
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--shard auto: {name}={value!r} is not an integer") from None


def _slurm_array(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(0-based task, tasks) of a Slurm job array (``sbatch --array``), or None outside one."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    if "SLURM_ARRAY_TASK_COUNT" not in environ:
        raise ConfigError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not "
                          "(Slurm sets both for sbatch --array); give --shard I/N")
    task, count = _env_int(environ, "SLURM_ARRAY_TASK_ID"), _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    first = _env_int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
    step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
    index, off_step = divmod(task - first, max(step, 1))
    if count < 1 or off_step or not 0 <= index < count:
        raise ConfigError(f"--shard auto: array task {task} is not one of {count} evenly spaced tasks from "
                          f"{first} (SLURM_ARRAY_TASK_MIN/STEP/COUNT); use a range such as --array=0-{count - 1}, "
                          "or give --shard I/N")
    return index, count


def _torchrun(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(rank, world size) under torchrun, or None."""
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        raise ConfigError("--shard auto: torchrun sets both RANK and WORLD_SIZE, found only "
                          f"{'RANK' if 'RANK' in environ else 'WORLD_SIZE'}; give --shard I/N")
    rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"--shard auto: RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def resolve_shard(text: str, environ: Mapping[str, str] | None = None) -> str:
    """'I/N' checked, or 'auto' resolved from the launcher into 'I/N'.

    A Slurm job array gives task ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of
    ``SLURM_ARRAY_TASK_COUNT``; torchrun gives ``RANK`` of ``WORLD_SIZE``. Both at once (one
    torchrun per array task) give task * WORLD_SIZE + RANK of COUNT * WORLD_SIZE.
    """
    if str(text).strip().lower() != "auto":
        i, n = parse_shard(text)
        return f"{i}/{n}"
    environ = os.environ if environ is None else environ
    array, torch_rank = _slurm_array(environ), _torchrun(environ)
    if array is None and torch_rank is None:
        raise ConfigError("--shard auto: found neither a Slurm job array (SLURM_ARRAY_TASK_ID) nor torchrun "
                          "(RANK, WORLD_SIZE); give --shard I/N")
    task, tasks = array or (0, 1)
    rank, world = torch_rank or (0, 1)
    return f"{task * world + rank + 1}/{tasks * world}"


def launcher_device(device: str, cuda_available: bool, environ: Mapping[str, str] | None = None) -> str:
    """One GPU per torchrun rank: with --device auto or cuda, ``LOCAL_RANK`` picks cuda:LOCAL_RANK
    (auto without CUDA stays auto). Other devices, and runs outside torchrun, are unchanged."""
    environ = os.environ if environ is None else environ
    local = environ.get("LOCAL_RANK", "").strip()
    if not local or device not in ("auto", "cuda") or (device == "auto" and not cuda_available):
        return device
    if not local.isdigit():
        raise ConfigError(f"LOCAL_RANK={local!r} is not a GPU index")
    return f"cuda:{int(local)}"
