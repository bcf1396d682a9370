"""Keeping the server's resident memory close to what it actually holds.

glibc keeps freed memory in per-thread arenas and rarely gives it back, so after a large
intersection the server's RSS stays near its peak. Fewer arenas, mmap for large blocks and
an explicit trim after each job keep ``--memory-budget`` meaningful. Only glibc has these
calls; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - present only in glibc
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> None:
    """Fewer arenas and earlier return of large blocks to the system."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_ARENA_MAX, 2)
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def release_free_memory() -> None:
    """Give freed heap memory back to the system (after a job's data is dropped)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
