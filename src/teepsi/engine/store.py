"""A party's uploaded records, partitioned, held within a memory budget, spilled when over.

Records are split into ``PARTITIONS`` partitions as they arrive, by a pseudo-random function
of the whole 128-bit record under a key drawn inside the enclave for each job (AES-128 of
the record, see :class:`Partitioner`). The records are chosen by the parties, so the split
must be one no party can steer: under the old split (the top bits of the first digest) a
party could put its whole upload in one partition and make the intersection load it at once
whatever the budget. The intersection runs one partition at a time, so the memory it needs
is a partition's worth of every party, not a job's; the partitions' results are merged into
order afterwards (:mod:`teepsi.engine.result`). When the server's budget is exhausted a
store seals its buffered partitions to disk (:mod:`teepsi.engine.spill`) and buffers only
what the budget has room for.

A store takes records only in the canonical order (ascending as 128-bit numbers, no
repeats: what the client sends), so its set digest is computed as the records arrive and
each partition stays sorted without a sort. (A data provider's own hashing uses
:class:`UnsortedRecordStore` instead: any order, range partitions; never on the server.)
A store that is closed refuses data: an upload that outlives its job can neither reserve
memory nor write spill files.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from teepsi.engine.intersect import is_strictly_increasing
from teepsi.engine.records import RECORD_BYTES, RECORD_DTYPE, U64Array, records_to_bytes
from teepsi.engine.spill import SpillArea
from teepsi.errors import TeepsiError
from teepsi.memory import release_free_memory

PARTITION_BITS = 6
PARTITIONS = 1 << PARTITION_BITS
#: While spilling, a store writes its buffers out once they hold this much, or sooner when
#: the budget has no room for them.
SPILL_FLUSH_BYTES = 8 * 1024 * 1024
#: A flush that frees this much gives the memory back to the system at once.
_TRIM_AFTER_FLUSH_BYTES = 64 * 1024 * 1024
#: Records are mixed for partitioning this many bytes at a time (below malloc's mmap
#: threshold, see teepsi.memory).
_MIX_BLOCK_BYTES = 4096 * RECORD_BYTES


class StoreClosed(TeepsiError):
    """The store was closed (its job ended): it holds nothing and takes nothing."""


class RecordOrderError(TeepsiError, ValueError):
    """An upload's records are not ascending and distinct (the one accepted order)."""


class MemoryBudget:
    """Bytes of records a process may hold in memory, shared by all its jobs.

    ``runtime_bytes`` of the limit are the process's own (interpreter, libraries, message
    buffers, temporaries), held from the start and never released, so that what is
    reserved for records plus what the process needs besides stays within the limit."""

    def __init__(self, limit_bytes: int, *, runtime_bytes: int = 0) -> None:
        self.limit_bytes = limit_bytes
        self.runtime_bytes = min(runtime_bytes, limit_bytes)
        self._held = self.runtime_bytes
        self._peak = self._held
        self._lock = threading.Lock()

    @property
    def record_bytes(self) -> int:
        """The room for records: the limit less the runtime's share."""
        return self.limit_bytes - self.runtime_bytes

    @property
    def held(self) -> int:
        """Bytes held for records now (the runtime's share not counted)."""
        with self._lock:
            return self._held - self.runtime_bytes

    @property
    def peak(self) -> int:
        """The most ever held for records at once (stored records, results and the
        intersection's working set)."""
        with self._lock:
            return self._peak - self.runtime_bytes

    def reset_peak(self) -> None:
        """Start measuring the peak afresh (from what is held now)."""
        with self._lock:
            self._peak = self._held

    def try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self._held + nbytes > self.limit_bytes:
                return False
            self._held += nbytes
            self._peak = max(self._peak, self._held)
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._held = max(self.runtime_bytes, self._held - nbytes)

    @contextlib.contextmanager
    def working_set(self, nbytes: int) -> Iterator[None]:
        """Count memory the intersection holds now, over the limit if it must (it cannot
        wait): uploads meanwhile see the budget taken and spill; freed on exit."""
        with self._lock:
            self._held += nbytes
            self._peak = max(self._peak, self._held)
        try:
            yield
        finally:
            self.release(nbytes)


class Partitioner:
    """Which partition a record goes to: the top bits of AES-128 under a secret key.

    AES is a pseudo-random permutation of the whole 16-byte record, so without the key the
    partition of any record is unpredictable: records sharing their first digest, or any
    other pattern a party builds, spread evenly. The key is random, lives only in memory
    and is never shown, so nobody outside the enclave can aim at a partition. ECB mode is
    the right mode here: each record is one independent evaluation (nothing is encrypted
    for secrecy, and the output is dropped after its top bits are read).
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = key or secrets.token_bytes(16)
        # ECB: one independent PRF evaluation per 16-byte record, nothing kept secret by it.
        self._cipher = Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305

    def partitions(self, records: bytes) -> np.ndarray:
        """The partition of each canonical 16-byte record in ``records`` (uint8 array)."""
        out = np.empty(len(records) // RECORD_BYTES, dtype=np.uint8)
        encryptor = self._cipher.encryptor()
        view = memoryview(records)
        # In small blocks: a fresh multi-MiB output per chunk costs more in page faults
        # than AES itself; 64 KiB blocks are reused from the heap.
        for start in range(0, len(records), _MIX_BLOCK_BYTES):
            mixed = encryptor.update(view[start : start + _MIX_BLOCK_BYTES])
            first = start // RECORD_BYTES
            out[first : first + len(mixed) // RECORD_BYTES] = np.frombuffer(mixed, dtype=np.uint8)[
                ::RECORD_BYTES
            ]
        return out >> np.uint8(8 - PARTITION_BITS)


class RangePartitioner(Partitioner):
    """Which partition a record goes to: the top bits of its first digest (a range split).

    For a data provider's own records only (:class:`UnsortedRecordStore`): partitions are
    ranges, so sorting each and concatenating them in order gives the whole set ascending,
    which is what the server takes. Never for a server's store: records are chosen by the
    parties, and a range split is one they can steer (see :class:`Partitioner`).
    """

    def __init__(self) -> None:  # no key: nothing here is secret or unpredictable
        pass

    def partitions(self, records: bytes) -> np.ndarray:
        pairs = np.frombuffer(records, dtype=RECORD_DTYPE).reshape(-1, 2)
        return self.of_first_digests(pairs[:, 0])

    @staticmethod
    def of_first_digests(hi: U64Array) -> np.ndarray:
        """The partition of records with these first digests (uint8 array)."""
        return (hi >> np.uint64(64 - PARTITION_BITS)).astype(np.uint8)

    @staticmethod
    def bounds(sorted_hi: U64Array) -> list[int]:
        """Where each partition starts in sorted records with these first digests, and
        their end (``PARTITIONS + 1`` offsets)."""
        starts = np.arange(PARTITIONS, dtype=np.uint64) << np.uint64(64 - PARTITION_BITS)
        return [*np.searchsorted(sorted_hi, starts).tolist(), len(sorted_hi)]


class RecordStore:
    """One party's records for one job. One uploader adds at a time; any thread may close."""

    #: 64-bit words stored per record: its two digests (a data provider's own store adds
    #: the row it came from).
    WORDS = 2

    def __init__(
        self,
        budget: MemoryBudget,
        spill: SpillArea | None,
        partitioner: Partitioner,
        *,
        salt: bytes = b"",
    ) -> None:
        self.budget = budget
        self._spill = spill
        self.partitioner = partitioner
        self._label = secrets.token_bytes(16)
        #: Per partition, what came in, as one array per word (see ``WORDS``).
        self._buffers: list[list[tuple[U64Array, ...]]] = [[] for _ in range(PARTITIONS)]
        self._segments: list[list[Path]] = [[] for _ in range(PARTITIONS)]
        self._partition_records = np.zeros(PARTITIONS, dtype=np.int64)
        self._buffered_bytes = 0  # in memory, reserved or not
        self._reserved = 0  # of which counted against the budget
        self._spilling = False
        #: SHA-256 of the salt then the records in order (the receipt's set digest).
        self._digest = hashlib.sha256(salt)
        self._last: tuple[int, int] | None = None
        self.records = 0
        # close() may come from another thread while a step runs: the step finishes on
        # its own data and the store is emptied when it ends (never under its feet).
        self._state_lock = threading.Lock()
        self._closed = False
        self._busy = 0  # steps running (the intersection reads partitions in threads)

    @property
    def spilled(self) -> bool:
        return self._spilling

    @property
    def set_sha256(self) -> bytes:
        return self._digest.copy().digest()

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        with self._state_lock:
            if self._closed:
                raise StoreClosed("the record store is closed (its job has ended)")
            self._busy += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._busy -= 1
                discard = self._closed and not self._busy
            if discard:
                self._discard()

    def add(self, hi: U64Array, lo: U64Array) -> None:
        self.add_records(records_to_bytes(hi, lo))

    def add_records(self, records: bytes) -> None:
        """Take canonical 16-byte records (ascending, distinct, continuing the upload)."""
        with self._in_use():
            if not records:
                return
            pairs = np.frombuffer(records, dtype=RECORD_DTYPE).reshape(-1, 2)
            hi, lo = pairs[:, 0], pairs[:, 1]
            self._accept(hi, lo, records)
            self._buffer(self.partitioner.partitions(records), (hi, lo))

    def _buffer(self, part: np.ndarray, words: tuple[U64Array, ...]) -> None:
        """Buffer records (one array per word) in their partitions ``part``; spill when
        the budget says so."""
        counts = np.bincount(part, minlength=PARTITIONS)
        self._partition_records += counts
        bounds = np.cumsum(counts)
        order = np.argsort(part, kind="stable")  # radix sort on 8-bit values: linear
        # Stable: each partition keeps the arrival order (an upload's stays sorted).
        grouped = [word[order] for word in words]
        start = 0
        for p, end in enumerate(bounds.tolist()):
            if end > start:
                self._buffers[p].append(tuple(word[start:end] for word in grouped))
            start = end
        nbytes = len(part) * self.WORDS * RECORD_DTYPE.itemsize
        self.records += len(part)
        self._buffered_bytes += nbytes
        # Whatever a store buffers is reserved, spilling or not: the budget bounds the
        # memory of every upload at once, not only of those that still fit.
        if self.budget.try_reserve(nbytes):
            self._reserved += nbytes
            if not self._spilling or self._buffered_bytes < SPILL_FLUSH_BYTES:
                return
        elif self._spill is None:
            # No spill area configured: hold it anyway (the budget is then advisory).
            return
        self._spilling = True
        self._flush()

    def _accept(self, hi: U64Array, lo: U64Array, records: bytes) -> None:
        """Refuse records out of the canonical order; digest the ones taken."""
        self._check_order(hi, lo)
        self._digest.update(records)

    def _check_order(self, hi: U64Array, lo: U64Array) -> None:
        first = (int(hi[0]), int(lo[0]))
        if (self._last is not None and first <= self._last) or not is_strictly_increasing(hi, lo):
            raise RecordOrderError(
                "records must be sent ascending (as 128-bit numbers) and distinct, "
                "across the whole upload"
            )
        self._last = (int(hi[-1]), int(lo[-1]))

    def _flush(self) -> None:
        assert self._spill is not None
        for p, buffered in enumerate(self._buffers):
            if not buffered:
                continue
            words = [np.concatenate([b[w] for b in buffered]) for w in range(self.WORDS)]
            payload = np.stack(words, axis=1).tobytes()
            label = self._segment_label(p, len(self._segments[p]))
            self._segments[p].append(self._spill.write(payload, label))
            buffered.clear()
        self.budget.release(self._reserved)
        self._reserved = 0
        if self._buffered_bytes >= _TRIM_AFTER_FLUSH_BYTES:
            release_free_memory()  # else the heap keeps what the buffers took, unused
        self._buffered_bytes = 0

    def _segment_label(self, partition: int, index: int) -> bytes:
        return self._label + partition.to_bytes(2, "big") + index.to_bytes(4, "big")

    def finish(self) -> None:
        """After the last chunk: a spilling store writes out what it still buffers."""
        with self._in_use():
            if self._spilling and self._buffered_bytes:
                self._flush()

    def partition_bytes(self, p: int) -> int:
        """Bytes partition ``p`` takes when loaded."""
        with self._in_use():
            return int(self._partition_records[p]) * self.WORDS * RECORD_DTYPE.itemsize

    def partition(self, p: int) -> tuple[U64Array, U64Array]:
        """Partition ``p``'s records, ascending and distinct (in arrival order for
        :class:`UnsortedRecordStore`)."""
        hi, lo, *_ = self._words(p)
        return hi, lo

    def _words(self, p: int) -> list[U64Array]:
        """Partition ``p``'s records in arrival order, one array per word."""
        with self._in_use():
            # Segments were sealed in arrival order, buffers hold what came after them.
            parts: list[tuple[U64Array, ...]] = []
            for index, path in enumerate(self._segments[p]):
                assert self._spill is not None
                payload = self._spill.read(path, self._segment_label(p, index))
                words = np.frombuffer(payload, dtype=RECORD_DTYPE).reshape(-1, self.WORDS)
                parts.append(tuple(words[:, w] for w in range(self.WORDS)))
            parts += self._buffers[p]
            if not parts:
                return [np.empty(0, RECORD_DTYPE) for _ in range(self.WORDS)]
            return [np.concatenate([part[w] for part in parts]) for w in range(self.WORDS)]

    def close(self) -> None:
        """Drop every record: memory released, segment files deleted; later use raises
        :class:`StoreClosed`. A step running meanwhile finishes first (then it is dropped)."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            if self._busy:
                return  # the running step drops everything as it leaves
        self._discard()

    def _discard(self) -> None:
        self._buffers = [[] for _ in range(PARTITIONS)]
        self.budget.release(self._reserved)
        self._reserved = 0
        self._buffered_bytes = 0
        for paths in self._segments:
            for path in paths:
                path.unlink(missing_ok=True)
        self._segments = [[] for _ in range(PARTITIONS)]
        self._partition_records[:] = 0


class UnsortedRecordStore(RecordStore):
    """A data provider's own records, in any order, repeats allowed, each with the row it
    came from: its table's hashed keys on their way to the upload and to the matching
    (``teepsi.engine.tables``). The server never uses it.

    Partitions are ranges (:class:`RangePartitioner`) and hold records in arrival order:
    a partition is put in order (and de-duplicated) when it is read, and the partitions
    then follow one another in ascending order. No set digest is kept (it is defined on
    the sorted set, which exists only once the partitions are read).
    """

    WORDS = 3  # first digest, second digest, row

    def __init__(self, budget: MemoryBudget, spill: SpillArea | None) -> None:
        super().__init__(budget, spill, RangePartitioner())

    def add_rows(self, hi: U64Array, lo: U64Array, rows: U64Array) -> None:
        """Take records in any order, and the row each came from."""
        with self._in_use():
            if len(hi):
                self._buffer(RangePartitioner.of_first_digests(hi), (hi, lo, rows))

    def add_records(self, records: bytes) -> None:
        raise TypeError("a data provider's records come with their rows: add_rows")

    def partition_rows(self, p: int) -> tuple[U64Array, U64Array, U64Array]:
        """Partition ``p``'s records and their rows, in arrival order."""
        hi, lo, rows = self._words(p)
        return hi, lo, rows

    def take_partition_rows(self, p: int) -> tuple[U64Array, U64Array, U64Array]:
        """:meth:`partition_rows`, the store then without them (their memory released):
        for a store that did not spill, whose partitions are each read once."""
        with self._in_use():
            if self._segments[p]:
                raise ValueError("a spilled partition is read again, not taken")
            hi, lo, rows = self._words(p)
            self._buffers[p] = []
            nbytes = hi.nbytes + lo.nbytes + rows.nbytes
            released = min(nbytes, self._reserved)
            self._reserved -= released
            self._buffered_bytes -= nbytes
            self.budget.release(released)
            return hi, lo, rows

    @property
    def set_sha256(self) -> bytes:
        raise TypeError("an unsorted store keeps no set digest")
