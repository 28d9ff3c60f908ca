"""Measuring what a real step used: peak memory on CUDA and on the CPU, and out-of-memory errors explained.

On CUDA the allocator's own peak is exact. On a CPU the process peak (VmHWM) only ever grows;
Linux lets a process reset it (`/proc/self/clear_refs` with "5"), which turns it into a
per-run peak. Where that is not possible the number is the process' lifetime peak, and says so.
`run_oom_checked` wraps the work of a fixture: an out-of-memory error becomes a failed test that
gives the measured and the estimated memory and the guide's fix, after the memory is given back so
the next tests can run. torch is imported inside the functions.
"""

from __future__ import annotations

import gc
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from pytest_lora.core.errors import TrainingError
from pytest_lora.core.memory import MemoryEstimate, format_bytes

T = TypeVar("T")

GUIDE_FIX = (
    "the guide: an out-of-memory error although the 4-bit base fits means the rank is too high or too many "
    "modules are adapted; lower r (e.g. 8 -> 4), adapt fewer modules (only q_proj, v_proj), re-test with a "
    "smaller batch first, or turn on gradient checkpointing"
)


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


def cpu_peak_bytes() -> int:
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
    result.bytes = cpu_peak_bytes()


# --- out of memory inside a fixture ---------------------------------------------------------------


def _measured_peak(device: str) -> tuple[int, str]:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return cpu_peak_bytes(), "process peak RSS"


def release_memory(device: str) -> None:
    """Give freed tensors back: collect reference cycles, then empty the CUDA cache."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run_oom_checked(
    work: Callable[[], T],
    *,
    what: str,
    device: str,
    estimate: Callable[[], MemoryEstimate | None] | None = None,
    release: Callable[[], None] | None = None,
) -> T:
    """`work()`, with an out-of-memory error turned into a failed test (TrainingError) that explains it.

    The message gives the failed allocation, the measured peak, the estimate (`estimate()`, computed
    after the failure, before `release`) and the guide's fix. Then `release()` (e.g. detaching the
    adapter) runs and the memory is collected and the CUDA cache emptied: the error is raised outside
    the `except` block, so no traceback keeps the failed step's activations alive.
    """
    import torch

    try:
        return work()
    except torch.OutOfMemoryError as exc:
        failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        peak, peak_source = _measured_peak(device)
    estimated = estimate() if estimate is not None else None  # from shapes, before `release` detaches
    if release is not None:
        release()
    release_memory(device)
    lines = [
        f"out of memory in {what} on {device}: {failure}",
        f"  measured peak before the failure: {format_bytes(peak)} ({peak_source})",
    ]
    if estimated is not None:
        lines += [f"  estimated peak of this step: {format_bytes(estimated.total)}", *estimated.lines()]
    lines += [
        f"  {GUIDE_FIX}",
        "  the memory was freed (gc, CUDA cache emptied)"
        + (" and the adapter removed" if release is not None else "")
        + ": later tests run",
    ]
    raise TrainingError("\n".join(lines))
