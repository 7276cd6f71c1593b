"""The machine and software a run measured on, captured once per run as a flat dict.

Modelled on optimum-benchmark's ``get_system_info()``: every value a plain str/int/bool
or None, so it goes into a JSON column as is.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path

import psutil
import torch

import knormctl

CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (Linux); empty elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _cpu_model(info: dict[str, str]) -> str:
    name = info.get("model name") or platform.processor() or platform.machine()
    if not name and platform.system() == "Darwin":
        try:
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=2).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return name or "unknown"


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the knormctl source tree when it is a git checkout, else (None, None).
    Dirty: changes to tracked files (an export or a database written into the checkout is not
    a change to the code that measured)."""
    root = Path(knormctl.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=3)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=3)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return head.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None, None


# Variables that restrict the instruction set torch's CPU kernels use below what the CPU has
# (ATen's own kernels, oneDNN, MKL): a run under them measures another CPU kind's kernels.
CPU_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_capability() -> str:
    """The instruction set ATen dispatches its CPU kernels for ("AVX512", "AVX2", ...), with
    any variable that restricts the kernels: the CPU flags alone do not say what ran."""
    cap = torch.backends.cpu.get_cpu_capability()
    limits = [f"{k}={os.environ[k]}" for k in CPU_ISA_VARIABLES if os.environ.get(k)]
    return cap + (f" ({', '.join(limits)})" if limits else "")


def get_environment(device: str | None = None) -> dict:
    """CPU, memory, GPU, OS and library versions, plus knormctl's version and git commit.

    ``device`` is the device the run uses ("cpu", "cuda:0", "mps"); GPU fields describe
    that CUDA device (device 0 when not given), and are None without CUDA.
    """
    import transformers

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    commit, dirty = _git_state()
    env = {
        "device": device,
        "cpu_model": _cpu_model(info),
        "cpu_cores_logical": psutil.cpu_count(logical=True) or 1,
        "cpu_cores_physical": psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1,
        "cpu_flags": " ".join(f for f in CPU_FLAGS_OF_INTEREST if f in flags),
        "cpu_capability": cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "gpu_name": None,
        "gpu_memory_bytes": None,
        "cuda_version": None,
        "mps_available": bool(hasattr(torch.backends, "mps") and torch.backends.mps.is_available()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "knormctl": knormctl.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
    }
    if torch.cuda.is_available():
        first = device.split("+")[0] if device else None  # a mapped model: "cuda:0+cuda:1"
        index = (torch.device(first).index or 0) if first and first.startswith("cuda") else 0
        props = torch.cuda.get_device_properties(index)
        env["gpu_name"] = props.name
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["cuda_version"] = torch.version.cuda
    return env
