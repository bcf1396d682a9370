"""A data provider's table: its input read for its keys, within a memory budget.

This module is the table API: :func:`read_table`, :class:`Table`, and (from the modules
it is made of) :class:`TableSpec`, :class:`TableFormat`, :class:`TableError`,
:func:`detect_format` and the writers. Reading files is :mod:`teepsi.engine.reading`,
key order :mod:`teepsi.engine.key_order`, the matching rows :mod:`teepsi.engine.matching`,
writing them :mod:`teepsi.engine.output`.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import polars as pl

from teepsi.contract.normalization import Normalization
from teepsi.engine.input_file import PinnedInput
from teepsi.engine.intersect import (
    feed_records,
)
from teepsi.engine.key_order import key_prefixes
from teepsi.engine.output import STDOUT_PATH, text_lines, write_rows
from teepsi.engine.reading import (
    check_readable,
    directory_error,
    parse_errors,
    scan_table,
    stripped_items,
    text_items,
)
from teepsi.engine.records import (
    RECORD_DTYPE,
    U64Array,
    hash_keys,
    normalized_keys,
    stripped_item_keys,
)
from teepsi.engine.sorted_records import SortedRecords
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import MemoryBudget, UnsortedRecordStore
from teepsi.engine.table_spec import (
    TEXT_COLUMN,
    TableError,
    TableFormat,
    TableSpec,
    detect_format,
)
from teepsi.memory import release_free_memory

__all__ = [
    "BATCH_ROWS",
    "DEFAULT_MEMORY_BUDGET",
    "STDOUT_PATH",
    "TEXT_COLUMN",
    "Table",
    "TableError",
    "TableFormat",
    "TableSpec",
    "detect_format",
    "directory_error",
    "read_table",
    "table_from_dataframe",
    "table_from_frame",
    "text_lines",
    "write_rows",
]

#: A data provider's default memory budget: fits the 2 GiB enclave it runs in.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Rows per batch while reading, at most (a small budget makes batches smaller).
BATCH_ROWS = 1 << 20
_KEY, _ROW, _PREFIX = "key", "row", "prefix"
#: A structured row's key prefix (its place in key order, ties aside): 16 bytes.
_PREFIX_BYTES = 16
#: A keyed row's record and its row position, as the record store holds them.
_STORED_BYTES = UnsortedRecordStore.WORDS * RECORD_DTYPE.itemsize


@dataclass
class _Batch:
    """One batch of keyed rows: row positions, normalised keys until hashed, then records."""

    #: Columns row (absent when the rows are consecutive), key (dropped once hashed, but
    #: for in-memory tables), prefix once hashed (CSV and Parquet); None while sealed.
    frame: pl.DataFrame | None
    index: int
    #: Position of the first row, when the rows are consecutive (text: no row column).
    first_row: int = 0
    #: Bytes this batch holds against the budget while in memory.
    reserved: int = 0
    segment: Path | None = None
    generation: int = 0


class Table:
    """A read input: for each row with a key, its position and normalised key.

    Only the key columns are read, in batches, held within a memory budget; batches over
    it are sealed to disk (:mod:`teepsi.engine.spill`: encrypted, deleted on close). Once
    the job's seeds are known every key is hashed once and the keys are dropped: the
    records serve the upload, the receipt check and the matching. The matching rows are
    read again from the file when the result has arrived (:func:`matching_rows`).
    """

    def __init__(
        self,
        spec: TableSpec,
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        spill_dir: Path | None = None,
        in_memory: bool = False,
    ) -> None:
        self.spec = spec
        #: No file to read again: the keys are kept (small tables, run_party_items).
        self.in_memory = in_memory
        self.rows_read = 0
        self.rows_with_key = 0
        self.budget = MemoryBudget(memory_budget)
        self._spill_dir = spill_dir
        self._spill: SpillArea | None = None
        self._label = secrets.token_bytes(16)
        self._batches: list[_Batch] = []
        self._seeds: tuple[int, int] | None = None
        #: The hashed records with their rows, once hashed (until the matching).
        self._records: SortedRecords | None = None
        #: The input file, held open once reading starts (None for in-memory tables).
        self.input: PinnedInput | None = None
        #: The in-memory frame a structured table was made from (no file to read again).
        self.source: pl.DataFrame | None = None

    @property
    def rows_per_batch(self) -> int:
        return min(BATCH_ROWS, max(1024, self.budget.limit_bytes // 512))

    @property
    def spilled(self) -> bool:
        """True once anything of this table went to disk."""
        return self._spill is not None

    def close(self) -> None:
        """Drop everything held: memory released, sealed files deleted."""
        self._batches = []
        if self._records is not None:
            self._records.close()
            self._records = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _spill_area(self) -> SpillArea:
        if self._spill is None:
            self._spill = self.new_spill_area()
        return self._spill

    def new_spill_area(self) -> SpillArea:
        """A spill area of its own (the matching rows', which outlive the table's)."""
        try:
            return SpillArea(self._spill_dir)
        except OSError as exc:
            raise TableError(
                f"over the memory budget, and cannot create a spill area: {exc.strerror}"
            ) from None

    def _add(
        self, keys: pl.Series, rows: npt.NDArray[np.uint64] | None, first_row: int = 0
    ) -> None:
        """Keep one batch's keys (no nulls) and their row positions (None: consecutive
        from ``first_row``, as text items are, and then not stored)."""
        if rows is None:
            frame = pl.DataFrame({_KEY: keys})
        else:
            frame = pl.DataFrame({_ROW: pl.Series(rows, dtype=pl.UInt64), _KEY: keys})
        self.rows_with_key += len(frame)
        if not len(frame):
            return
        batch = _Batch(frame=frame, index=len(self._batches), first_row=first_row)
        # Room for its records too (and a structured key's prefix): they join the batch
        # once the seeds are known.
        extra = _STORED_BYTES + (0 if self.spec.format is TableFormat.TEXT else _PREFIX_BYTES)
        need = int(frame.estimated_size()) + len(frame) * extra
        if self.budget.try_reserve(need):
            batch.reserved = need
        else:
            self._seal(batch, frame)
        self._batches.append(batch)

    def _batch_label(self, batch: _Batch) -> bytes:
        return self._label + batch.index.to_bytes(4, "big") + batch.generation.to_bytes(4, "big")

    def _seal(self, batch: _Batch, frame: pl.DataFrame) -> None:
        buffer = io.BytesIO()
        frame.write_ipc(buffer, compression="uncompressed")
        old = batch.segment
        batch.generation += 1
        batch.segment = self._spill_area().write(buffer.getvalue(), self._batch_label(batch))
        if old is not None:
            old.unlink(missing_ok=True)
        batch.frame = None
        self.budget.release(batch.reserved)
        batch.reserved = 0

    def _frames(self) -> Iterator[tuple[_Batch, pl.DataFrame]]:
        for batch in self._batches:
            if batch.frame is not None:
                yield batch, batch.frame
                continue
            assert batch.segment is not None and self._spill is not None
            payload = self._spill.read(batch.segment, self._batch_label(batch))
            yield batch, pl.read_ipc(io.BytesIO(payload))

    def hash(self, seeds: tuple[int, int]) -> None:
        """Hash every key once under the job's seeds (again only if the seeds change).

        The records go to the store with their rows; a batch keeps only what the
        matching needs besides: a structured row's key prefix (its place in key order),
        and an in-memory table's keys. A file's text batches are then gone.
        """
        if self._seeds == seeds:
            return
        if self._seeds is not None and not self.in_memory:
            raise ValueError("the keys were dropped once hashed: read the table again")
        if self._records is not None:
            self._records.close()
        needed = self.rows_with_key * _STORED_BYTES
        over = self.budget.held + needed > self.budget.limit_bytes
        store = UnsortedRecordStore(self.budget, self._spill_area() if over else None)
        kept: list[_Batch] = []
        for batch, frame in self._frames():
            keys = frame[_KEY]
            hi, lo = hash_keys(keys, seeds)
            if _ROW in frame.columns:
                rows = frame[_ROW].to_numpy()
            else:
                rows = np.arange(batch.first_row, batch.first_row + len(frame), dtype=np.uint64)
            store.add_rows(hi, lo, rows)
            if self.spec.format is not TableFormat.TEXT and _PREFIX not in frame.columns:
                # The matching rows' key order, later, without reading their keys again.
                frame = frame.with_columns(key_prefixes(keys).alias(_PREFIX))
            if not self.in_memory:
                frame = frame.drop(_KEY)  # the file has them, for the matching rows
            if frame.width == 0:  # text read from a file: nothing more to keep
                self._drop(batch)
                continue
            kept.append(batch)
            if batch.frame is not None:
                batch.frame = frame
                self._hold(batch, int(frame.estimated_size()))
            else:
                self._seal(batch, frame)
        self._batches = kept
        store.finish()
        self._records, self._seeds = SortedRecords(store, self.budget), seeds
        release_free_memory()  # the keys are gone: what they took goes back

    def _hold(self, batch: _Batch, nbytes: int) -> None:
        """Count what an in-memory batch holds now (less than it reserved, once hashed)."""
        if nbytes < batch.reserved:
            self.budget.release(batch.reserved - nbytes)
            batch.reserved = nbytes

    def _drop(self, batch: _Batch) -> None:
        self.budget.release(batch.reserved)
        batch.frame, batch.reserved = None, 0
        if batch.segment is not None:
            batch.segment.unlink(missing_ok=True)
            batch.segment = None

    def distinct_records(self) -> Iterator[tuple[U64Array, U64Array]]:
        """The distinct records, sorted, a part at a time (parts in order): what a party
        uploads, after :meth:`hash`.

        De-duplicating here keeps "duplicates count once" true for the server's item
        limits, and the server never learns how often a key repeats in a table.
        """
        if self._records is None:
            raise ValueError("hash the table with the job's seeds first")
        for part in self._records.parts():
            yield part.hi, part.lo

    def own_set(self, salt: bytes) -> tuple[int, bytes]:
        """(distinct records, SHA-256 of salt and them): the receipt's entry for us."""
        digest = hashlib.sha256(salt)
        count = 0
        for hi, lo in self.distinct_records():
            feed_records([digest], hi, lo)
            count += len(hi)
        return count, digest.digest()

    def key_records(self, seeds: tuple[int, int]) -> tuple[U64Array, U64Array]:
        """All distinct records, sorted, in two arrays (for small tables and tests)."""
        self.hash(seeds)
        parts = list(self.distinct_records())
        return (
            np.concatenate([hi for hi, _ in parts]).astype(RECORD_DTYPE, copy=False),
            np.concatenate([lo for _, lo in parts]).astype(RECORD_DTYPE, copy=False),
        )

    def keys(self) -> pl.Series:
        """Every row's normalised key, rows without one left out (before hashing, or of an
        in-memory table)."""
        parts = [frame[_KEY] for _, frame in self._frames()]
        return pl.concat(parts) if parts else pl.Series(_KEY, [], dtype=pl.String)

    def matching_positions(
        self, result_hi: U64Array, result_lo: U64Array, *, every_row: bool = True
    ) -> tuple[npt.NDArray[np.uint64], pl.Series, pl.Series]:
        """Position of each row whose record is in the (sorted, distinct) result, in row
        order: every such row, or (``every_row`` False) the first row of each record; for
        an in-memory table its normalised key (else empty); for CSV and Parquet its key's
        prefix (:func:`teepsi.engine.key_order.key_prefixes`; else empty). The table's
        last use: the records and batches are released as they are looked at (the upload
        and the receipt check are done by now)."""
        if self._records is None:
            raise ValueError("hash the table with the job's seeds first")
        positions = self._records.rows_in(result_hi, result_lo, every_row=every_row)
        self._records = None
        keys: list[pl.Series] = []
        prefixes: list[pl.Series] = []
        for batch, frame in self._frames():
            if _ROW in frame.columns:
                rows = frame[_ROW].to_numpy()
                first, end = int(rows[0]), int(rows[-1]) + 1
            else:
                first, end = batch.first_row, batch.first_row + len(frame)
            at = positions[np.searchsorted(positions, first) : np.searchsorted(positions, end)]
            local = np.searchsorted(rows, at) if _ROW in frame.columns else at - np.uint64(first)
            if _KEY in frame.columns:
                keys.append(frame[_KEY].gather(local))
            if _PREFIX in frame.columns:
                prefixes.append(frame[_PREFIX].gather(local))
            self._drop(batch)
        self._batches = []
        release_free_memory()  # the records' memory, for the matching rows read next
        return (
            positions.astype(np.uint64, copy=False),
            pl.concat(keys) if keys else pl.Series(_KEY, [], dtype=pl.String),
            pl.concat(prefixes, rechunk=True) if prefixes else pl.Series([], dtype=pl.UInt128),
        )

    def matching_first_rows(
        self, result_hi: U64Array, result_lo: U64Array
    ) -> npt.NDArray[np.bool_]:
        """For each row read: is it the first row of a key in the (sorted, distinct)
        result? A text file's matching, which needs neither keys nor prefixes; the
        records are released."""
        if self._records is None:
            raise ValueError("hash the table with the job's seeds first")
        wanted = self._records.first_rows_in(result_hi, result_lo, self.rows_read)
        self._records = None
        for batch in self._batches:
            self._drop(batch)
        self._batches = []
        release_free_memory()  # the records' memory, for the items read next
        return wanted

    def scan(self) -> pl.LazyFrame:
        """The input as a lazy frame: its file, or the in-memory frame it was made from."""
        if self.source is not None:
            return self.source.lazy()
        return scan_table(self.spec, self.input_path)

    @property
    def input_path(self) -> Path:
        """Where the input is read: the file held open once reading started."""
        return self.input.path if self.input is not None else self.spec.path

    def check_unchanged(self) -> None:
        if self.input is not None:  # polars frames are immutable: nothing to check
            self.input.check_unchanged()


def _add_items(table: Table, items: pl.Series) -> None:
    """One batch of text items (stripped, none empty): every one has a key."""
    table._add(stripped_item_keys(items, table.spec.normalization), None, table.rows_read)
    table.rows_read += len(items)


def _add_keys(table: Table, keys: pl.Series, position: int) -> None:
    """One batch's keys (null where a row has none), its first row at ``position``."""
    if not keys.has_nulls():  # consecutive rows: no row column to keep (8 bytes a row)
        table._add(keys, None, position)
        return
    keyed = keys.is_not_null().to_numpy()
    rows = np.flatnonzero(keyed).astype(np.uint64) + np.uint64(position)
    table._add(keys.filter(pl.Series(keyed)), rows)


def table_from_frame(
    frame: pl.DataFrame, spec: TableSpec, *, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> Table:
    """A text table from a frame with one string column "item" (lines, unstripped)."""
    table = Table(spec, memory_budget=memory_budget, in_memory=True)
    for start in range(0, len(frame), table.rows_per_batch):
        _add_items(table, stripped_items(spec, frame.slice(start, table.rows_per_batch)))
    return table


def _read_structured(table: Table) -> None:
    spec = table.spec
    if not spec.key_columns:
        raise TableError(f"{spec.path}: name the key column(s)")
    if table.source is None:
        check_readable(spec.path, spec.format)
    with parse_errors(spec):
        scan = table.scan()
        columns = scan.collect_schema().names()
        missing = [c for c in spec.key_columns if c not in columns]
        if missing:
            raise TableError(
                f"{spec.path}: no column {missing[0]!r} (columns: {', '.join(columns[:20])}); "
                "name one of them as the key column"
            )
        position = 0
        # Only the key columns, a batch at a time: the other columns wait for the result.
        batches = scan.select(list(spec.key_columns)).collect_batches(
            chunk_size=table.rows_per_batch
        )
        for batch in batches:
            _add_keys(table, normalized_keys(batch, spec.key_columns, spec.normalization), position)
            position += len(batch)
    table.rows_read = position


def table_from_dataframe(
    data: object,
    key_columns: Sequence[str],
    *,
    normalization: Normalization | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Table:
    """A table over an in-memory frame: a polars DataFrame or LazyFrame, a pandas
    DataFrame or an Arrow table (whatever polars takes). Its columns keep their types, as
    Parquet's do; the matching rows come back as a polars DataFrame."""
    frame = _as_polars_frame(data)
    spec = TableSpec(
        path=Path("<memory>"),
        format=TableFormat.PARQUET,
        key_columns=tuple(key_columns),
        normalization=normalization or Normalization(),
    )
    table = Table(spec, memory_budget=memory_budget)
    table.source = frame
    try:
        _read_structured(table)
    except BaseException:
        table.close()
        raise
    return table


def _as_polars_frame(data: object) -> pl.DataFrame:
    if isinstance(data, pl.LazyFrame):
        return data.collect()
    if isinstance(data, pl.DataFrame):
        return data
    try:
        # pandas, Arrow and the Arrow C stream interface: polars checks what it is given
        return pl.DataFrame(cast(Any, data))
    except (TypeError, ValueError, ImportError, pl.exceptions.PolarsError) as exc:
        raise TableError(
            f"in-memory table: a {type(data).__name__} is not a table polars can read "
            f"({' '.join(str(exc).split())[:120]}); pass a polars, pandas or Arrow table"
        ) from None


def read_table(
    spec: TableSpec,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    spill_dir: Path | None = None,
) -> Table:
    """Read the party's input as ``spec`` says, within ``memory_budget`` bytes."""
    table = Table(spec, memory_budget=memory_budget, spill_dir=spill_dir)
    try:
        table.input = PinnedInput(spec.path)  # read by this: a change is caught
        if spec.format is TableFormat.TEXT:
            for items in text_items(spec, table.budget.limit_bytes, table.input_path):
                _add_items(table, items)
        else:
            _read_structured(table)
    except BaseException:
        table.close()
        raise
    return table
