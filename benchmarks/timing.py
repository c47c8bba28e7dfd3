"""Timing for the benchmarks: median of N runs after warm-up, device-synchronised, with a copy-bandwidth yardstick.

On CUDA each run is timed with CUDA events and the L2 cache is flushed before it (a 256 MiB write,
outside the timed region), so small working sets are not measured from cache; on CPU runs are timed with
``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H200: 50 MiB)


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` untimed runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, device: torch.device, *, warmup: int = 3, repeats: int = 10) -> float:
    """Achieved bytes/s of a device-to-device ``copy_`` of ``nbytes`` (read + write counted): the roofline yardstick."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    return 2 * nbytes / seconds
