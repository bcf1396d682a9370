"""A party's uploaded records, partitioned, held within a memory budget, spilled when over.

Records are split by the top bits of their first digest into ``PARTITIONS`` partitions
as they arrive. The intersection then runs one partition at a time, so the memory it
needs is a partition's worth, not a job's; partitions in order give the result in order.
When the server's budget is exhausted a store seals its buffered partitions to disk
(:mod:`teepsi.engine.spill`) and keeps only small buffers in memory.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from teepsi.engine.intersect import intersect_records
from teepsi.engine.keys import RECORD_BYTES, RECORD_DTYPE, U64Array
from teepsi.engine.spill import SpillArea

PARTITION_BITS = 6
PARTITIONS = 1 << PARTITION_BITS
#: Records per upload or result chunk: 4 MiB messages, well under gRPC's limit we set.
RECORDS_PER_CHUNK = 256 * 1024
#: While spilling, a store writes its buffers out once they hold this much.
SPILL_FLUSH_BYTES = 8 * 1024 * 1024


class MemoryBudget:
    """Bytes of records the server may hold in memory, shared by all its jobs."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self._held + nbytes > self.limit_bytes:
                return False
            self._held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._held = max(0, self._held - nbytes)


class RecordStore:
    """One party's records for one job. Not thread-safe: one uploader owns it."""

    def __init__(self, budget: MemoryBudget, spill: SpillArea | None) -> None:
        self._budget = budget
        self._spill = spill
        self._label = secrets.token_bytes(16)
        self._buffers: list[list[tuple[U64Array, U64Array]]] = [[] for _ in range(PARTITIONS)]
        self._segments: list[list[Path]] = [[] for _ in range(PARTITIONS)]
        self._buffered_bytes = 0  # in memory, reserved or not
        self._reserved = 0  # of which counted against the budget
        self._spilling = False
        self.records = 0

    @property
    def spilled(self) -> bool:
        return self._spilling

    def add(self, hi: U64Array, lo: U64Array) -> None:
        if len(hi) == 0:
            return
        part = (hi >> np.uint64(64 - PARTITION_BITS)).astype(np.uint8)
        bounds = np.cumsum(np.bincount(part, minlength=PARTITIONS))
        if np.all(part[1:] >= part[:-1]):
            # Sorted uploads (what clients send) are already grouped by partition.
            hi_sorted, lo_sorted = hi, lo
        else:
            order = np.argsort(part, kind="stable")  # radix sort on 8-bit values: linear
            hi_sorted, lo_sorted = hi[order], lo[order]
        start = 0
        for p, end in enumerate(bounds.tolist()):
            if end > start:
                self._buffers[p].append((hi_sorted[start:end], lo_sorted[start:end]))
            start = end
        nbytes = len(hi) * RECORD_BYTES
        self.records += len(hi)
        self._buffered_bytes += nbytes
        if not self._spilling and self._budget.try_reserve(nbytes):
            self._reserved += nbytes
            return
        if self._spill is None:
            # No spill area configured: hold it anyway (the budget is then advisory).
            return
        self._spilling = True
        if self._buffered_bytes >= SPILL_FLUSH_BYTES or self._reserved:
            self._flush()

    def _flush(self) -> None:
        assert self._spill is not None
        for p, buffered in enumerate(self._buffers):
            if not buffered:
                continue
            hi = np.concatenate([b[0] for b in buffered])
            lo = np.concatenate([b[1] for b in buffered])
            payload = np.stack([hi, lo], axis=1).tobytes()
            label = self._segment_label(p, len(self._segments[p]))
            self._segments[p].append(self._spill.write(payload, label))
            buffered.clear()
        self._budget.release(self._reserved)
        self._reserved = 0
        self._buffered_bytes = 0

    def _segment_label(self, partition: int, index: int) -> bytes:
        return self._label + partition.to_bytes(2, "big") + index.to_bytes(4, "big")

    def finish(self) -> None:
        """After the last chunk: a spilling store writes out what it still buffers."""
        if self._spilling and self._buffered_bytes:
            self._flush()

    def partition(self, p: int) -> tuple[U64Array, U64Array]:
        his: list[U64Array] = [b[0] for b in self._buffers[p]]
        los: list[U64Array] = [b[1] for b in self._buffers[p]]
        for index, path in enumerate(self._segments[p]):
            assert self._spill is not None
            payload = self._spill.read(path, self._segment_label(p, index))
            pairs = np.frombuffer(payload, dtype=RECORD_DTYPE).reshape(-1, 2)
            his.append(pairs[:, 0])
            los.append(pairs[:, 1])
        if not his:
            return np.empty(0, RECORD_DTYPE), np.empty(0, RECORD_DTYPE)
        return np.concatenate(his), np.concatenate(los)

    def close(self) -> None:
        """Drop every record: memory released, segment files deleted."""
        self._buffers = [[] for _ in range(PARTITIONS)]
        self._budget.release(self._reserved)
        self._reserved = 0
        self._buffered_bytes = 0
        for paths in self._segments:
            for path in paths:
                path.unlink(missing_ok=True)
        self._segments = [[] for _ in range(PARTITIONS)]


@dataclass(frozen=True)
class Intersection:
    hi: U64Array
    lo: U64Array
    #: Per store: distinct records, and SHA-256 of its de-duplicated sorted records.
    distinct: list[int]
    set_sha256: list[bytes]


def intersect_stores(
    stores: Sequence[RecordStore], *, salts: Sequence[bytes] | None = None
) -> Intersection:
    """Intersect partition by partition (partitions in order give the result in order)."""
    his: list[U64Array] = []
    los: list[U64Array] = []
    distinct = [0] * len(stores)
    # Each set digest starts with its party's salt (see the receipt's set_sha256).
    digests = [hashlib.sha256(salt) for salt in (salts or [b""] * len(stores))]
    for p in range(PARTITIONS):
        hi, lo, counts = intersect_records([store.partition(p) for store in stores], digests)
        distinct = [d + c for d, c in zip(distinct, counts, strict=True)]
        his.append(hi)
        los.append(lo)
    return Intersection(
        hi=np.concatenate(his),
        lo=np.concatenate(los),
        distinct=distinct,
        set_sha256=[d.digest() for d in digests],
    )


def iter_record_chunks(
    hi: U64Array, lo: U64Array, *, records_per_chunk: int
) -> Iterator[tuple[bytes, int]]:
    for start in range(0, len(hi), records_per_chunk):
        end = min(start + records_per_chunk, len(hi))
        yield np.stack([hi[start:end], lo[start:end]], axis=1).tobytes(), end - start


def mark_last(chunks: Iterable[tuple[bytes, int]]) -> Iterator[tuple[bytes, int, bool]]:
    """Flag the final chunk; nothing at all becomes one empty, final chunk."""
    iterator = iter(chunks)
    pending = next(iterator, (b"", 0))
    for following in iterator:
        yield (*pending, False)
        pending = following
    yield (*pending, True)
