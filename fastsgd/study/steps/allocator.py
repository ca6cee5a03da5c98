"""Keep freed memory in the process for the next allocation (glibc's malloc).

A batch of trials allocates the same few large activations every step. glibc
hands allocations above its mmap threshold (128 KiB at start, raised only as
far as the largest block freed so far) straight to the kernel and gives freed
memory at the top of the heap back; each new step then touches fresh pages, and
every 4 KiB page costs a page fault and its zeroing. Fixing the mmap threshold
at glibc's ceiling (32 MiB) and raising the trim threshold keeps those blocks in
the heap for reuse: the process keeps its peak memory instead of returning it
(it still returns it beyond 2 GiB free at the top of the heap).

:func:`keep_freed_memory` is called by the commands that train trials
(``fastsgd steps``, ``fastsgd advise``) and by ``bench/trials_per_second.py``
for every method it compares. A library call never changes the allocator of
the process that imports it. ``FASTSGD_KEEP_FREED_MEMORY=0`` leaves malloc as
it is.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: trim only past 2 GiB free at the heap's top


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to its maximum and switch heap trimming off; returns whether
    the settings took (False on other C libraries and platforms, or when switched off)."""
    if os.environ.get("FASTSGD_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
