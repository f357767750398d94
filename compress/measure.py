"""Wall time and peak memory of a block of work: process RSS high-water mark on the CPU (reset per block through
/proc/self/clear_refs on Linux), and torch's allocator peak on CUDA."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_peak_bytes() -> int:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime peak (Linux reports KiB)


def _reset_rss_peak() -> None:
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS
    except OSError:
        pass  # not Linux, or not permitted: the peak is then the process's lifetime peak


@contextmanager
def measure():
    """`with measure() as m: ...` then m["seconds"], m["peak_rss_bytes"] (and m["peak_cuda_bytes"] on CUDA)."""
    result: dict = {}
    _reset_rss_peak()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["peak_rss_bytes"] = _rss_peak_bytes()
        if cuda:
            result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
