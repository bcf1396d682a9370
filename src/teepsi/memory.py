"""Keeping a process's resident memory close to what it actually holds.

glibc keeps freed memory in per-thread arenas and rarely gives it back, so after a large
intersection the server's RSS stays near its peak, and a data provider's stays at what its
records and keys took while the matching rows are read. Fewer arenas, mmap for large
blocks and an explicit trim once a phase's data is dropped keep ``--memory-budget``
meaningful. Only glibc has these calls; elsewhere this does nothing.
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


#: Blocks from this size up get their own mapping, returned whole when freed: above an
#: upload chunk's 4 MiB and its copies, which are then reused from the heap. With 128 KiB
#: every chunk was a fresh mapping whose pages faulted in, a third of the server's CPU
#: at 2 x 10M records (2.7 of 6.3 s, in the kernel).
_MMAP_BYTES = 32 << 20
#: Free memory at the heap's top kept for reuse up to this much (the trim after each job
#: gives it back).
_TRIM_BYTES = 64 << 20


def tune_allocator() -> None:
    """Fewer arenas, and large blocks kept for reuse between chunks (a server's)."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_ARENA_MAX, 2)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)


def release_free_memory() -> None:
    """Give freed heap memory back to the system (after a job's or a phase's data is
    dropped)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
