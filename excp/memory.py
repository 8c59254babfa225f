"""Allocator settings for processes that excp owns (the CLI, the server, benchmarks).

Restoring a checkpoint writes every weight and both moments into fresh tensors. glibc
serves allocations above its mmap threshold (at most 32 MiB by default) with fresh
``mmap`` pages and unmaps them on free, so every restore page-faults its whole
output again: on a 2-core machine that fault cost is larger than all of
the decoding. Raising the mmap and trim thresholds keeps freed memory in the process,
so a long-lived process (a server, a rebuild walking a chain) reuses it.

This changes a process-wide policy, so only excp's own entry points call
:func:`tune_allocator`; the library never does it inside a user's training process.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30


def tune_allocator(threshold: int = THRESHOLD) -> bool:
    """Keep freed blocks below ``threshold`` bytes in the process (the default: every
    large one); True if glibc accepted the settings (False on other C libraries, which
    keep their own defaults). A small threshold does the opposite, handing every freed
    block back at once, so that resident memory tracks live memory (benchmarks/memory.py)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
