"""The one timer and the one peak-memory probe every benchmark uses.

Time: ``time_ms`` runs ``fn`` ``warmup`` times untimed (kernels built, allocator
primed), then ``repeat`` timed calls; on CUDA each call is timed by CUDA events
(synchronised), on CPU by the wall clock. Memory: ``PeakMemory`` reads
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set
(``VmHWM``, reset at ``start``; ``ru_maxrss`` where there is no /proc) on CPU.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import time
from pathlib import Path
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device | str = "cpu", repeat: int = 5,
            warmup: int = 1) -> list[float]:
    """Milliseconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def proc_kb(field: str, path: str = "/proc/self/status") -> int | None:
    """A kB field of /proc/self/status (or /proc/meminfo); None where there is no /proc."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the code between ``start()`` and ``stop()``, in MB: (peak, rise above the start).

    The rise is None on a CPU without /proc (only the lifetime peak is known there)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the base is what is live
        except (OSError, AttributeError):
            pass
        self.base = (proc_kb("VmRSS") or 0) / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.hwm = True
        except OSError:
            self.hwm = False
        return self

    def stop(self) -> tuple[float, float | None]:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            return peak, peak - self.base
        if self.hwm and proc_kb("VmHWM") is not None:
            peak = proc_kb("VmHWM") / 1024
            return peak, peak - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None
