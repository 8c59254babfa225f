"""Wall time and peak memory of one encode or decode call.

Peak memory is the process's resident set size (RSS), sampled by a background thread
while the call runs, minus the RSS just before it: the memory the call needed on top
of what the process already held, whatever allocated it (torch, numpy, zstd, a C
extension). Python-level tracers such as ``tracemalloc`` miss most of that.

The excp CLI keeps freed memory in the process (``excp.memory``), and any glibc
process keeps some; freed-but-kept pages would let a call reuse them without growing
the RSS and so hide its needs. Each measurement therefore first hands freed memory
back to the system, so every contender starts from the same cold state, like a fresh
process would. That makes timings slightly pessimistic (first touch of new pages is
counted), equally for every contender.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

SAMPLE_SECONDS = 0.002


@dataclass
class Measurement:
    """Seconds the call took and the bytes of RSS it added at its peak."""

    seconds: float = 0.0
    peak_bytes: int = 0


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        return


def release_freed_memory() -> None:
    """Return freed heap pages to the system (glibc only; elsewhere a no-op), so the next
    RSS baseline holds live data only. No ``gc.collect()``: tensors are freed by reference
    counting, and a full collection in this process costs more than most encodes."""
    _malloc_trim()


@contextmanager
def measure() -> Iterator[Measurement]:
    """Time the block and sample the RSS while it runs; the result is filled in on exit."""
    release_freed_memory()
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, name="excp-bench-rss", daemon=True)
    sampler.start()
    result = Measurement()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
        result.peak_bytes = max(0, max(peak[0], process.memory_info().rss) - baseline)
