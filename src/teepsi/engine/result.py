"""An intersection's result in ascending order, made and kept within the memory budget.

The server's partitions are not ranges (a party could steer a range split, see
:class:`teepsi.engine.store.Partitioner`), so each partition's result is a sorted run that
interleaves with every other. The runs are merged a block at a time: the merge holds one
block of each run and one chunk of output, never the whole result, so putting a result of
any size in order takes memory for ``PARTITIONS`` blocks, whatever the parties sent. The
runs and the merged chunks are held in memory while the budget has room and sealed to the
encrypted spill area beyond it; the chunks are wire-ready (16-byte little-endian records)
and digested as they are made.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from teepsi.engine.intersect import intersect_sorted_records, record_order
from teepsi.engine.records import RECORD_BYTES, RECORD_DTYPE, U64Array, records_to_bytes
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import PARTITIONS, MemoryBudget, RecordStore, StoreClosed
from teepsi.memory import release_free_memory

#: Records of a run the merge holds at once (and the size of a run's sealed blocks): a
#: step's output is about ``PARTITIONS`` blocks, so this bounds the merge's temporaries.
MERGE_BLOCK_RECORDS = 16 * 1024
#: Every this many records of a run, one is kept aside to choose the merge's steps by.
_SAMPLE_EVERY = 1024
#: Samples per merge step: a step takes about this many times ``_SAMPLE_EVERY`` records.
_STEP_SAMPLES = 256
#: Records merged between two returns of freed memory to the system: the runs' blocks are
#: freed in no order the heap can reuse for chunks, so without it RSS doubles.
_TRIM_EVERY_RECORDS = 4 * 1024 * 1024
#: The share of the budget's room for records that the result's runs, and apart from them
#: its chunks, may hold in memory (the rest is sealed): the two overlap while the runs are
#: merged, next to the merge's own temporaries.
RESULT_HELD_SHARE = 4
#: Partitions an intersection works on at once (each holds a partition of every party).
INTERSECT_THREADS = min(4, os.cpu_count() or 1)

Records = tuple[U64Array, U64Array]


def held_limit(budget: MemoryBudget) -> int:
    """What the runs, or the chunks, of one result may hold in memory."""
    return budget.record_bytes // RESULT_HELD_SHARE


class SealedPayloads:
    """Byte payloads, each held in memory while the budget has room (and these payloads
    hold less than ``held_limit``), else sealed to the spill area. Thread-safe; any thread
    may close it: a read under way finishes first, later ones raise :class:`StoreClosed`."""

    def __init__(self, budget: MemoryBudget, spill: SpillArea | None, held_limit: int) -> None:
        self.budget = budget
        self.spill = spill
        self._held_limit = held_limit
        self._label = secrets.token_bytes(16)
        self._items: list[bytes | Path | None] = []
        self._reserved = 0
        self._lock = threading.Lock()
        self._closed = False
        self._busy = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def sealed(self) -> int:
        """How many payloads are on disk."""
        with self._lock:
            return sum(isinstance(item, Path) for item in self._items)

    def _item_label(self, index: int) -> bytes:
        return self._label + index.to_bytes(8, "big")

    def append(self, payload: bytes) -> int:
        """Keep ``payload``; its index."""
        with self._use():
            with self._lock:
                index = len(self._items)
                self._items.append(None)
                hold = self._reserved + len(payload) <= self._held_limit and (
                    self.budget.try_reserve(len(payload))
                )
                if hold:
                    self._reserved += len(payload)
            if hold or self.spill is None:  # nowhere to seal it: the budget is advisory
                item: bytes | Path = payload
            else:
                item = self.spill.write(payload, self._item_label(index))
            with self._lock:
                self._items[index] = item
            return index

    def read(self, index: int, *, drop: bool = False) -> bytes:
        """Payload ``index``; with ``drop``, forgotten after (its memory or file freed)."""
        with self._use():
            with self._lock:
                item = self._items[index]
                if item is None:
                    raise ValueError(f"payload {index} was dropped")
                if drop:
                    self._items[index] = None
                    if isinstance(item, bytes):
                        self._release_locked(len(item))
            if isinstance(item, bytes):
                return item
            assert self.spill is not None
            payload = self.spill.read(item, self._item_label(index))
            if drop:
                item.unlink(missing_ok=True)
            return payload

    def _release_locked(self, nbytes: int) -> None:
        released = min(nbytes, self._reserved)
        self._reserved -= released
        self.budget.release(released)

    @contextlib.contextmanager
    def _use(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise StoreClosed("the result is closed (its job has ended)")
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                discard = self._closed and not self._busy
            if discard:
                self._discard()

    def close(self) -> None:
        """Drop every payload: memory released, files deleted."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._busy:
                return  # the running step drops everything as it leaves
        self._discard()

    def _discard(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._release_locked(self._reserved)
        for item in items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)


class SortedRun:
    """One partition's part of the result (sorted, distinct), kept in blocks of
    ``MERGE_BLOCK_RECORDS`` records (in ``blocks``, which the runs of one result share)
    and read once, block by block; and a sample of it kept aside."""

    def __init__(self, blocks: SealedPayloads, records: Records) -> None:
        self._blocks = blocks
        hi, lo = records
        self.records = len(hi)
        steps = [
            slice(at, at + MERGE_BLOCK_RECORDS) for at in range(0, len(hi), MERGE_BLOCK_RECORDS)
        ]
        self._indices = [blocks.append(records_to_bytes(hi[step], lo[step])) for step in steps]
        #: Every ``_SAMPLE_EVERY``-th record, to choose the merge's steps by.
        self.sample_hi = hi[_SAMPLE_EVERY - 1 :: _SAMPLE_EVERY].copy()
        self.sample_lo = lo[_SAMPLE_EVERY - 1 :: _SAMPLE_EVERY].copy()

    def blocks(self) -> Iterator[Records]:
        """Each block in order, its memory or file freed as it is read."""
        for index in self._indices:
            yield _split(self._blocks.read(index, drop=True))


def _split(payload: bytes) -> Records:
    """Records' two digests as arrays of their own (the payload is let go)."""
    pairs = np.frombuffer(payload, RECORD_DTYPE).reshape(-1, 2)
    return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


class _RunCursor:
    """Where the merge stands in one run: its current block and how much of it is used."""

    def __init__(self, run: SortedRun) -> None:
        self._blocks = run.blocks()
        self.hi = self.lo = np.empty(0, RECORD_DTYPE)
        self.at = 0
        self._advance()

    def _advance(self) -> None:
        """The next block, once this one is used up (empty at the run's end)."""
        while self.at == len(self.hi):
            block = next(self._blocks, None)
            if block is None:
                self.hi = self.lo = np.empty(0, RECORD_DTYPE)
                self.at = 0
                return
            (self.hi, self.lo), self.at = block, 0

    @property
    def done(self) -> bool:
        return self.at == len(self.hi)

    def take_through(self, bound: tuple[int, int] | None) -> list[Records]:
        """The run's next records up to ``bound`` (inclusive; None: all the rest)."""
        pieces: list[Records] = []
        while not self.done:
            hi, lo = self.hi, self.lo
            if bound is None or (int(hi[-1]), int(lo[-1])) <= bound:
                pieces.append((hi[self.at :], lo[self.at :]))
                self.at = len(hi)
                self._advance()
                continue
            bound_hi, bound_lo = np.uint64(bound[0]), np.uint64(bound[1])
            below = int(np.searchsorted(hi, bound_hi, side="left"))
            equal = int(np.searchsorted(hi, bound_hi, side="right"))
            # Records sharing the bound's first digest are in order of their second.
            end = max(self.at, below + int(np.searchsorted(lo[below:equal], bound_lo, "right")))
            pieces.append((hi[self.at : end], lo[self.at : end]))
            self.at = end
            break
        return pieces


def _step_bounds(runs: Sequence[SortedRun]) -> list[tuple[int, int] | None]:
    """Where the merge's steps end: every ``_STEP_SAMPLES``-th of the runs' samples, in
    order, and None (the rest) last.

    Between two bounds each run has fewer than (its samples there + 1) x ``_SAMPLE_EVERY``
    records, so a step takes at most (``_STEP_SAMPLES`` + runs) x ``_SAMPLE_EVERY`` records
    however the records are spread over the runs."""
    hi = np.concatenate([run.sample_hi for run in runs]) if runs else np.empty(0, RECORD_DTYPE)
    lo = np.concatenate([run.sample_lo for run in runs]) if runs else np.empty(0, RECORD_DTYPE)
    picked = record_order(hi, lo)[_STEP_SAMPLES - 1 :: _STEP_SAMPLES]
    return [*zip(hi[picked].tolist(), lo[picked].tolist(), strict=True), None]


def merge_runs(runs: Sequence[SortedRun]) -> Iterator[Records]:
    """The records of sorted, disjoint runs in ascending order, a step at a time: each
    step takes every run's records up to the step's bound and puts them in order."""
    bounds = _step_bounds(runs)
    cursors = [_RunCursor(run) for run in runs]
    for bound in bounds:
        pieces = [piece for cursor in cursors for piece in cursor.take_through(bound)]
        if not pieces:
            continue
        hi = np.concatenate([piece[0] for piece in pieces])
        lo = np.concatenate([piece[1] for piece in pieces])
        del pieces
        order = record_order(hi, lo)
        yield hi[order], lo[order]
        cursors = [cursor for cursor in cursors if not cursor.done]


class SortedResult:
    """The result in ascending order, as chunks of ``chunk_records`` 16-byte records (the
    last may be shorter), with SHA-256 of each salt then the records."""

    def __init__(
        self,
        budget: MemoryBudget,
        spill: SpillArea | None,
        chunk_records: int,
        salts: Sequence[bytes] = (b"",),
    ) -> None:
        self._chunks = SealedPayloads(budget, spill, held_limit(budget))
        self._chunk_records = chunk_records
        self._digests = [hashlib.sha256(salt) for salt in salts]
        self._pending = np.empty((chunk_records, 2), RECORD_DTYPE)
        self._filled = 0
        self.records = 0
        self.sha256_per_salt: list[bytes] = []

    @classmethod
    def merged(
        cls,
        runs: Sequence[SortedRun],
        blocks: SealedPayloads,
        chunk_records: int,
        salts: Sequence[bytes] = (b"",),
    ) -> SortedResult:
        """The runs (their blocks in ``blocks``) merged into order; ``blocks`` is closed."""
        budget, spill = blocks.budget, blocks.spill
        result = cls(budget, spill, chunk_records, salts)
        try:
            since_trim = 0
            for hi, lo in merge_runs(runs):
                result._add(hi, lo)
                since_trim += len(hi)
                if since_trim >= _TRIM_EVERY_RECORDS:
                    release_free_memory()
                    since_trim = 0
            result._finish()
        except BaseException:
            result.close()
            raise
        finally:
            blocks.close()
        return result

    def _add(self, hi: U64Array, lo: U64Array) -> None:
        start = 0
        while start < len(hi):
            room = self._chunk_records - self._filled
            take = min(room, len(hi) - start)
            rows = slice(self._filled, self._filled + take)
            self._pending[rows, 0] = hi[start : start + take]
            self._pending[rows, 1] = lo[start : start + take]
            self._filled += take
            start += take
            if self._filled == self._chunk_records:
                self._seal_pending()

    def _seal_pending(self) -> None:
        payload = self._pending[: self._filled].tobytes()
        for digest in self._digests:
            digest.update(payload)
        self._chunks.append(payload)
        self.records += self._filled
        self._filled = 0

    def _finish(self) -> None:
        if self._filled:
            self._seal_pending()
        self._pending = np.empty((0, 2), RECORD_DTYPE)
        self.sha256_per_salt = [digest.digest() for digest in self._digests]

    def __len__(self) -> int:
        return self.records

    @property
    def sealed_chunks(self) -> int:
        return self._chunks.sealed

    def chunks(self) -> Iterator[tuple[bytes, int]]:
        """(payload, record count) of each chunk, in order; nothing when empty. Raises
        :class:`StoreClosed` once the result is closed."""
        for index in range(len(self._chunks)):
            payload = self._chunks.read(index)
            yield payload, len(payload) // RECORD_BYTES

    def close(self) -> None:
        """Drop the result: memory released, files deleted."""
        self._chunks.close()


@dataclass(frozen=True)
class Intersection:
    result: SortedResult
    #: Per store: distinct records, and SHA-256 of its salt then its sorted records.
    distinct: list[int]
    set_sha256: list[bytes]


def intersect_stores(
    stores: Sequence[RecordStore],
    *,
    spill: SpillArea | None,
    chunk_records: int,
    salts: Sequence[bytes] = (b"",),
) -> Intersection:
    """Intersect partition by partition, then merge the partitions' results into order.

    Each partition's load is counted against the stores' budget while it is held (the
    budget's ``peak`` shows what the intersection needed); its result is held or sealed
    like the merged chunks. Raises :class:`StoreClosed` if a store is closed meanwhile
    (its job ended).
    """
    if not stores:
        raise ValueError("an intersection needs stores")
    if len({id(store.partitioner) for store in stores}) > 1:
        raise ValueError("stores of one intersection must share one partitioner")
    budget = stores[0].budget

    blocks = SealedPayloads(budget, spill, held_limit(budget))

    def intersect_partition(p: int) -> SortedRun:
        load = sum(store.partition_bytes(p) for store in stores)
        with budget.working_set(load):
            found = intersect_sorted_records([store.partition(p) for store in stores])
            return SortedRun(blocks, found)

    # Partitions are independent and numpy lets go of the GIL while it searches and
    # sorts: a few at a time use the cores the waiting parties leave idle.
    with ThreadPoolExecutor(INTERSECT_THREADS, thread_name_prefix="intersect") as pool:
        futures = [pool.submit(intersect_partition, p) for p in range(PARTITIONS)]
    failed = next((future.exception() for future in futures if future.exception()), None)
    if failed is not None:
        blocks.close()  # every run made is let go: its memory and files
        raise failed
    runs = [future.result() for future in futures]
    return Intersection(
        result=SortedResult.merged(runs, blocks, chunk_records, salts),
        distinct=[store.records for store in stores],
        set_sha256=[store.set_sha256 for store in stores],
    )
