"""Device synchronisation and peak-memory probes, one per device kind.

CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` (exact, per sample).
CPU (Linux): the kernel's resident-set high-water mark (VmHWM), reset per sample by
writing "5" to /proc/self/clear_refs -- exact for the whole process, weights included.
Elsewhere: a sampled figure when the device offers one, else None with the reason.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import torch

from knormctl.engine.result import MemoryPeak


def synchronizer(device: torch.device):
    """A no-arg callable that waits for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


_HWM = re.compile(r"VmHWM:\s+(\d+)\s+kB")


def read_rss_peak() -> int | None:
    """The process's peak resident set (VmHWM) in bytes, or None where Linux's /proc is absent."""
    try:
        m = _HWM.search(Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (writing 5 to /proc/self/clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """``start()`` before a sample, ``stop()`` after: returns a MemoryPeak (never NaN)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._thread = None
        self._peak = 0
        self._stop = threading.Event()
        self._hwm_ok = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            self._hwm_ok = reset_rss_peak() and read_rss_peak() is not None
        elif self.device.type == "mps":
            self._peak = torch.mps.driver_allocated_memory()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample_mps, daemon=True)
            self._thread.start()

    def _sample_mps(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, torch.mps.driver_allocated_memory())

    def stop(self) -> MemoryPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return MemoryPeak(torch.cuda.max_memory_allocated(self.device), "cuda_max_memory_allocated")
        if self.device.type == "cpu":
            if self._hwm_ok:
                return MemoryPeak(read_rss_peak(), "cpu_process_rss_peak")
            return MemoryPeak(None, "n/a", "this OS offers no resettable peak-RSS counter (/proc/self/clear_refs)")
        if self.device.type == "mps":
            self._stop.set()
            self._thread.join()
            return MemoryPeak(self._peak, "mps_driver_allocated_sampled_5ms")
        return MemoryPeak(None, "n/a", f"no memory counter for device type {self.device.type!r}")
