"""A data provider's records in key-record order, a range partition at a time: its
distinct records (what it uploads) and, for each, the rows it came from (what the
matching needs). Sorting them once serves the upload, the receipt check and the matching,
which then walks the sorted result along them instead of searching for every row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from teepsi.engine.intersect import first_digests_distinct, members_of_sorted, record_order
from teepsi.engine.records import U64Array
from teepsi.engine.store import PARTITIONS, MemoryBudget, RangePartitioner, UnsortedRecordStore
from teepsi.memory import release_free_memory


@dataclass
class SortedPart:
    """One range partition of a table's records, in order: its distinct records, and
    the rows of each (in row order)."""

    hi: U64Array
    lo: U64Array
    #: Where each distinct record's rows start in ``rows``; None when no record repeats
    #: (the usual case: 8 bytes a record saved).
    first: npt.NDArray[np.intp] | None
    rows: U64Array
    #: No two distinct records share a first digest (the usual case).
    distinct_first: bool

    @classmethod
    def of(cls, hi: U64Array, lo: U64Array, rows: U64Array) -> SortedPart:
        """From records and their rows in row order (as the store keeps them)."""
        order = record_order(hi, lo)  # stable: each record's rows stay in row order
        hi, lo, rows = hi[order], lo[order], rows[order]
        new = np.ones(len(hi), dtype=np.bool_)
        new[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        if new.all():
            return cls(hi, lo, None, rows, first_digests_distinct(hi))
        first = np.flatnonzero(new)
        hi, lo = hi[first], lo[first]
        return cls(hi, lo, first, rows, first_digests_distinct(hi))

    @property
    def nbytes(self) -> int:
        first = 0 if self.first is None else self.first.nbytes
        return self.hi.nbytes + self.lo.nbytes + first + self.rows.nbytes

    def found(self, sorted_hi: U64Array, sorted_lo: U64Array) -> npt.NDArray[np.intp]:
        """The indices of those distinct records that are among these sorted, distinct
        records (ascending)."""
        if not len(self.hi) or not len(sorted_hi):
            return np.empty(0, dtype=np.intp)
        if not self.distinct_first:  # two share a first digest (rare): whole values
            return np.flatnonzero(members_of_sorted(self.hi, self.lo, sorted_hi, sorted_lo))
        # Each wanted record has one candidate; sorted needles walk the array in order.
        at = np.minimum(np.searchsorted(self.hi, sorted_hi), len(self.hi) - 1)
        hit = (self.hi[at] == sorted_hi) & (self.lo[at] == sorted_lo)
        present: npt.NDArray[np.intp] = at[hit]
        return present

    def rows_of(self, found: npt.NDArray[np.intp], every_row: bool) -> U64Array:
        """The rows of these distinct records: every one, or each record's first."""
        if self.first is None:  # one row each
            found_rows: U64Array = self.rows[found]
            return found_rows
        starts = self.first[found]
        if not every_row:
            return self.rows[starts]
        ends = np.append(self.first[1:], len(self.rows))[found]
        counts = ends - starts
        # Each run start..end laid out one after another, without a loop over runs.
        shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        rows: U64Array = self.rows[np.arange(int(counts.sum()), dtype=np.intp) + shift]
        return rows


#: Partitions sorted between two returns of freed memory to the system.
_TRIM_EVERY = 8


class SortedRecords:
    """A table's hashed records and their rows (held by a record store), sorted a range
    partition at a time.

    When the store did not spill, each partition is sorted once and kept (the upload,
    the receipt check and the matching all read them), leaving the store as it is sorted;
    else the partitions are sorted again from the store each time.
    """

    def __init__(self, store: UnsortedRecordStore, budget: MemoryBudget) -> None:
        self._store: UnsortedRecordStore | None = store
        self._budget = budget
        #: The first partitions, sorted (all of them, once read), when not spilled.
        self._sorted: list[SortedPart] = []

    def parts(self) -> Iterator[SortedPart]:
        """Every partition, sorted, in order."""
        store = self._store
        if store is None and len(self._sorted) < PARTITIONS:
            raise ValueError("the records were released")
        for p in range(PARTITIONS):
            if p < len(self._sorted):
                yield self._sorted[p]
                continue
            assert store is not None
            if store.spilled:
                yield SortedPart.of(*store.partition_rows(p))
                continue
            part = SortedPart.of(*store.take_partition_rows(p))
            self._sorted.append(part)  # a later pass starts from here if this one stops
            self._budget.try_reserve(part.nbytes)
            if len(self._sorted) == PARTITIONS:
                store.close()
                self._store = None
            if p % _TRIM_EVERY == _TRIM_EVERY - 1:
                # What the sorted partitions left of the store goes back as it shrinks:
                # else the store's and the sorted records' memory add up at the end.
                release_free_memory()
            yield part

    def rows_in(self, result_hi: U64Array, result_lo: U64Array, *, every_row: bool) -> U64Array:
        """The rows, ascending, whose record is in the (sorted, distinct) result: every
        such row, or the first of each record. The records are released after."""
        found = list(self._rows_found(result_hi, result_lo, every_row))
        rows: U64Array = np.concatenate(found) if found else np.empty(0, np.uint64)
        del found
        rows.sort()  # in place: the rows once, not twice, at the peak
        return rows

    def first_rows_in(
        self, result_hi: U64Array, result_lo: U64Array, row_count: int
    ) -> npt.NDArray[np.bool_]:
        """For each of ``row_count`` rows: is it the first row of a record in the result?
        (:meth:`rows_in` as a mask: a byte a row, not 8 a matching row.)"""
        wanted = np.zeros(row_count, dtype=np.bool_)
        for rows in self._rows_found(result_hi, result_lo, every_row=False):
            wanted[rows] = True
        return wanted

    def _rows_found(
        self, result_hi: U64Array, result_lo: U64Array, every_row: bool
    ) -> Iterator[U64Array]:
        """Per partition, the rows whose record is in the result; released after."""
        bounds = RangePartitioner.bounds(result_hi)
        for p, part in enumerate(self.parts()):
            wanted = slice(bounds[p], bounds[p + 1])  # the result's records in this range
            yield part.rows_of(part.found(result_hi[wanted], result_lo[wanted]), every_row)
        self.close()

    def close(self) -> None:
        """Release every record (memory and spill files)."""
        self._budget.release(sum(part.nbytes for part in self._sorted))
        self._sorted = []
        if self._store is not None:
            self._store.close()
            self._store = None
