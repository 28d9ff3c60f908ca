"""Measuring peak memory of a piece of work, on CUDA and on the CPU.

On CUDA the allocator's own peak is exact. On a CPU the process peak (VmHWM) only ever grows;
Linux lets a process reset it (`/proc/self/clear_refs` with "5"), which turns it into a
per-run peak. Where that is not possible the number is the process' lifetime peak, and says so.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class PeakMemory:
    """Filled in when the `measure_peak` block ends."""

    device: str
    bytes: int = 0
    scope: str = "run"  # "run" when reset before the block, "process" when it is the lifetime peak


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def measure_peak(device: str) -> Iterator[PeakMemory]:
    """Peak memory of the block: `torch.cuda.max_memory_allocated` on CUDA, peak RSS on the CPU."""
    result = PeakMemory(device)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = int(torch.cuda.max_memory_allocated(device))
        return
    result.scope = "run" if _reset_cpu_peak() else "process"
    yield result
    result.bytes = _cpu_peak_bytes()
