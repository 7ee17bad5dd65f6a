"""Measuring one training step: its time, its memory and the device's matmul peak.

What bench/distill_throughput.py and bench/teacher_cache.py time lives there; how they time it lives
here, so both read the same clock and the same memory counters.

- CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the step.
- CPU: peak RSS sampled every 2 ms by a thread, above the RSS before the step, after glibc's
  `malloc_trim` has returned the heap a previous step freed (otherwise one variant's garbage would
  count against the next).
"""
import ctypes
import os
import threading
import time
from typing import Callable, Optional

import torch

from kd.checkpoint import checkpoint_bytes


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _release_freed_heap() -> None:
    """Give memory that freed tensors left in glibc's heap back to the OS, so the RSS before a
    step is not inflated by the previous step (of either variant)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Highest RSS seen while a step runs, sampled every 2 ms from /proc/self/statm."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.available = _rss_bytes() is not None

    def __enter__(self):
        self.baseline = self.peak = _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes() or 0)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)

    @property
    def increase(self) -> int:
        return self.peak - self.baseline


def resident_bytes(teacher, student, optimizer) -> int:
    """Weights of both models (tied tensors once) plus the optimizer's state."""
    return checkpoint_bytes([*teacher.parameters(), *teacher.buffers(), *student.parameters(), *student.buffers()],
                            optimizer.state_dict())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(step: Callable[[dict], torch.Tensor], batch: dict, device: torch.device):
    """(seconds, transient bytes: peak during the step above what was allocated before it)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step(batch)
        sync(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - before
    _release_freed_heap()
    with PeakRSS() as rss:
        start = time.perf_counter()
        step(batch)
        seconds = time.perf_counter() - start
    return seconds, rss.increase


class MatmulPeak:
    """Dense matmul throughput of this device now: fp32 on CPU, bf16 on CUDA (the dtype ours uses).

    Probed before, between and after the timed steps and the best kept, so a moment of background
    load on a shared machine does not deflate the peak (and inflate the MFU)."""

    def __init__(self, device: torch.device):
        self.device = device
        n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
        self.flop = 2 * n ** 3
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.best_s = float("inf")
        self.probe(2, count=False)

    def probe(self, reps: int = 3, count: bool = True) -> None:
        for _ in range(reps):
            sync(self.device)
            start = time.perf_counter()
            self.a @ self.b
            sync(self.device)
            if count:
                self.best_s = min(self.best_s, time.perf_counter() - start)

    @property
    def flops(self) -> float:
        return self.flop / self.best_s
