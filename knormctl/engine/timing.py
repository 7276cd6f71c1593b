"""Device synchronisation and peak-memory probes, one per device kind.

A model placed across several devices (``--device-map``, engine/models.py) is synchronised
and measured on every device it uses (``model_devices``).

CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` (exact, per sample); across
several GPUs the sum of each GPU's peak (an upper bound of the simultaneous total).
CPU (Linux): the kernel's resident-set high-water mark (VmHWM), reset per sample by
writing "5" to /proc/self/clear_refs -- exact for the whole process, weights included.
Elsewhere: a sampled figure when the device offers one, else None with the reason.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import torch

from knormctl.engine.result import MemoryPeak


def model_device(model) -> torch.device:
    """Where the input ids go: the input embeddings' device (the first of a mapped model's
    devices; accelerate's hooks move each layer's inputs to its own device)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else next(model.parameters()).device


def model_devices(model) -> list[torch.device]:
    """The devices holding the model's parameters, in the order the layers use them (one for a
    model on one device; several under a ``device_map``)."""
    seen: dict[torch.device, None] = {}
    for p in model.parameters():
        if p.device.type != "meta":  # offloaded weights: accelerate loads them onto a GPU per forward
            seen.setdefault(p.device, None)
    return list(seen) or [torch.device("cpu")]


def _devices(device) -> list[torch.device]:
    return [torch.device(d) for d in device] if isinstance(device, (list, tuple)) else [torch.device(device)]


def synchronizer(device):
    """A no-arg callable that waits for queued work on ``device`` (one device or a list of
    them: every GPU a mapped model uses); a no-op on CPU."""
    devices = _devices(device)
    cuda = [d for d in devices if d.type == "cuda"]
    if len(cuda) == 1:
        return lambda: torch.cuda.synchronize(cuda[0])
    if cuda:
        def sync_all() -> None:
            for d in cuda:
                torch.cuda.synchronize(d)
        return sync_all
    if any(d.type == "mps" for d in devices):
        return torch.mps.synchronize
    return lambda: None


class StepClock:
    """The timestamps of one generation: ``start()`` before the prefill, ``mark()`` once each
    token is picked; ``offsets()`` at the end gives each mark's seconds since the start.

    On one CUDA device, CUDA events recorded on the stream: the GPU stamps each token when it
    has computed it, and the host never waits for the GPU between steps -- it queues the next
    step's kernels while the GPU runs this one, as a deployed decode loop does (a host sync
    per step would add its latency to every step). Elsewhere (CPU, MPS, a model split over
    several devices, whose events could not be compared): the host clock after a device sync.
    """

    def __init__(self, devices):
        devices = _devices(devices)
        self.events = len(devices) == 1 and devices[0].type == "cuda"
        self._device = devices[0]
        self.kind = "cuda_events" if self.events else "host_clock"
        self._sync = synchronizer(devices)
        self._marks: list = []

    def _now(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self._device))  # the model's device (cuda:1 too), not cuda:0
            return event
        self._sync()
        return time.perf_counter()

    def start(self) -> None:
        if self.events:
            self._sync()  # nothing queued before the start counts
        self._marks = [self._now()]

    def mark(self) -> None:
        self._marks.append(self._now())

    def offsets(self) -> list[float]:
        """Seconds from the start to each mark (one device sync on CUDA, here, at the end)."""
        first = self._marks[0]
        if self.events:
            self._marks[-1].synchronize()
            return [first.elapsed_time(m) / 1000.0 for m in self._marks[1:]]
        return [m - first for m in self._marks[1:]]


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
    """``start()`` before a sample, ``stop()`` after: returns a MemoryPeak (never NaN).

    ``device``: one device, or the list a mapped model uses -- the GPUs among them are
    measured (the sum of their peaks; CPU-offloaded weights are not in CUDA's counters)."""

    def __init__(self, device):
        devices = _devices(device)
        self.cuda = [d for d in devices if d.type == "cuda"]
        self.device = self.cuda[0] if self.cuda else devices[0]
        self._sync = synchronizer(self.cuda)
        self._thread = None
        self._peak = 0
        self._stop = threading.Event()
        self._hwm_ok = False

    def start(self) -> None:
        if self.device.type == "cuda":
            self._sync()
            for d in self.cuda:
                torch.cuda.reset_peak_memory_stats(d)
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
            self._sync()
            peak = sum(torch.cuda.max_memory_allocated(d) for d in self.cuda)
            kind = "cuda_max_memory_allocated" if len(self.cuda) == 1 else \
                f"cuda_max_memory_allocated_sum_{len(self.cuda)}_gpus"
            return MemoryPeak(peak, kind)
        if self.device.type == "cpu":
            if self._hwm_ok:
                return MemoryPeak(read_rss_peak(), "cpu_process_rss_peak")
            return MemoryPeak(None, "n/a", "this OS offers no resettable peak-RSS counter (/proc/self/clear_refs)")
        if self.device.type == "mps":
            self._stop.set()
            self._thread.join()
            return MemoryPeak(self._peak, "mps_driver_allocated_sampled_5ms")
        return MemoryPeak(None, "n/a", f"no memory counter for device type {self.device.type!r}")
