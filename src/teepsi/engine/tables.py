"""A data provider's table: reading text, CSV or Parquet, and writing its matching rows.

Text files hold one item per line: surrounding whitespace (including CR) is stripped and
blank lines are skipped. CSV and Parquet files are tables with one or more key columns;
the output is the party's own rows whose key is in the intersection, every column kept,
in the input's format, ordered by key (semi-join semantics: a key repeated in the table
matches once but returns all its rows).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import polars as pl

from teepsi.contract.normalization import TRIM_CHARS, Normalization
from teepsi.engine.intersect import (
    feed_records,
    members_of_sorted,
    sorted_unique_records,
)
from teepsi.engine.records import (
    RECORD_BYTES,
    RECORD_DTYPE,
    U64Array,
    hash_keys,
    key_scheme_id,
    normalized_keys,
)
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import PARTITIONS, MemoryBudget, UnsortedRecordStore
from teepsi.privatefile import private_writer

#: Largest text item, in bytes, after stripping.
MAX_TEXT_ITEM_BYTES = 64 * 1024
TEXT_COLUMN = "item"


class TableError(ValueError):
    """Input that cannot be read as asked; one line naming the file and the problem."""


class TableFormat(StrEnum):
    TEXT = "text"
    CSV = "csv"
    PARQUET = "parquet"


_EXTENSIONS = {
    ".csv": TableFormat.CSV,
    ".tsv": TableFormat.CSV,
    ".parquet": TableFormat.PARQUET,
    ".pq": TableFormat.PARQUET,
}
#: Compression suffixes recognised, so a compressed file is never read as text.
COMPRESSED_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4"})


def detect_format(path: str | Path, explicit: str | None = None) -> TableFormat:
    """The format named by ``explicit``, else by the file extension (text by default)."""
    if explicit:
        try:
            return TableFormat(explicit)
        except ValueError:
            raise TableError(f"--format {explicit!r}: use text, csv or parquet") from None
    suffixes = [x.lower() for x in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        inner = suffixes[-2] if len(suffixes) > 1 else ""
        if suffixes[-1] == ".gz" and _EXTENSIONS.get(inner) is TableFormat.CSV:
            return TableFormat.CSV  # polars reads gzip CSV itself
        raise TableError(
            f"{path}: a {suffixes[-1]}-compressed file is read only as gzip CSV (.csv.gz, "
            ".tsv.gz): decompress it first, or name it .csv.gz if it is gzip CSV"
        )
    return _EXTENSIONS.get(suffixes[-1] if suffixes else "", TableFormat.TEXT)


def is_compressed(path: Path) -> bool:
    return path.suffix.lower() in COMPRESSED_SUFFIXES


@dataclass(frozen=True)
class TableSpec:
    """How to read one party's input, and so how to write its output."""

    path: Path
    format: TableFormat = TableFormat.TEXT
    key_columns: tuple[str, ...] = ()
    delimiter: str = ","
    quote_char: str | None = '"'
    normalization: Normalization = field(default_factory=Normalization)

    @property
    def arity(self) -> int:
        return 1 if self.format is TableFormat.TEXT else len(self.key_columns)

    @property
    def key_scheme(self) -> str:
        return key_scheme_id(self.normalization, self.arity)


#: A data provider's default ``--memory-budget``: fits the 2 GiB enclave it runs in.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Rows per batch while reading, at most (a small budget makes batches smaller).
BATCH_ROWS = 1 << 20
#: Bytes of a text file parsed per batch, at most.
TEXT_BLOCK_BYTES = 32 << 20
_KEY, _ROW, _HI, _LO = "key", "row", "hi", "lo"


@dataclass
class _Batch:
    """One batch of keyed rows: row positions, normalised keys until hashed, then records."""

    #: Columns row, key (dropped once hashed, but for in-memory tables), hi and lo once
    #: hashed; None while sealed.
    frame: pl.DataFrame | None
    index: int
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
        self._store: UnsortedRecordStore | None = None
        self._sorted: list[tuple[U64Array, U64Array]] | None = None
        self._stamp: tuple[int, int] | None = None

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
        self._sorted = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _spill_area(self) -> SpillArea:
        if self._spill is None:
            try:
                self._spill = SpillArea(self._spill_dir)
            except OSError as exc:
                raise TableError(
                    f"over --memory-budget, and cannot create a spill area: {exc.strerror}"
                ) from None
        return self._spill

    def _add(self, keys: pl.Series, rows: npt.NDArray[np.uint64]) -> None:
        """Keep one batch's keys (no nulls) and their row positions."""
        frame = pl.DataFrame({_ROW: pl.Series(rows, dtype=pl.UInt64), _KEY: keys})
        self.rows_with_key += len(frame)
        if not len(frame):
            return
        batch = _Batch(frame=frame, index=len(self._batches))
        # Room for its records too: they join the batch once the seeds are known.
        need = int(frame.estimated_size()) + len(frame) * RECORD_BYTES
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
        """Hash every key once under the job's seeds (again only if the seeds change)."""
        if self._seeds == seeds:
            return
        if self._seeds is not None and not self.in_memory:
            raise ValueError("the keys were dropped once hashed: read the table again")
        if self._store is not None:
            self._store.close()
        self._sorted = None
        needed = self.rows_with_key * RECORD_BYTES
        over = self.budget.held + needed > self.budget.limit_bytes
        store = UnsortedRecordStore(self.budget, self._spill_area() if over else None)
        for batch, frame in self._frames():
            hi, lo = hash_keys(frame[_KEY], seeds)
            hashed = frame.with_columns(pl.Series(_HI, hi), pl.Series(_LO, lo))
            if not self.in_memory:
                hashed = hashed.drop(_KEY)  # the file has them, for the matching rows
            store.add(hi, lo)
            if batch.frame is not None:
                batch.frame = hashed
            else:
                self._seal(batch, hashed)
        store.finish()
        self._store, self._seeds = store, seeds

    def distinct_records(self) -> Iterator[tuple[U64Array, U64Array]]:
        """The distinct records, sorted, a part at a time (parts in order): what a party
        uploads, after :meth:`hash`.

        De-duplicating here keeps "duplicates count once" true for the server's item
        limits, and the server never learns how often a key repeats in a table.
        """
        if self._sorted is not None:
            yield from self._sorted
            return
        store = self._store
        if store is None:
            raise ValueError("hash the table with the job's seeds first")
        keep = not store.spilled  # sorted parts fit where the unsorted ones did
        parts: list[tuple[U64Array, U64Array]] = []
        for p in range(PARTITIONS):
            part = sorted_unique_records(*store.partition(p))
            if keep:
                parts.append(part)
            yield part
        if keep:
            store.close()
            self._store = None
            self._sorted = parts
            self.budget.try_reserve(sum(len(hi) for hi, _ in parts) * RECORD_BYTES)

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

    def _matching_positions(self, result_hi: U64Array, result_lo: U64Array) -> pl.DataFrame:
        """Position (and, in memory, key) of each row whose record is in the result, in
        row order. The table's last use: the records are released, each batch once looked
        at (the upload and the receipt check are done by now)."""
        self._sorted = None
        if self._store is not None:
            self._store.close()
            self._store = None
        found: list[pl.DataFrame] = []
        for batch, frame in self._frames():
            hit = members_of_sorted(
                frame[_HI].to_numpy(), frame[_LO].to_numpy(), result_hi, result_lo
            )
            found.append(frame.filter(pl.Series(hit)).drop(_HI, _LO))
            self.budget.release(batch.reserved)
            batch.frame, batch.reserved = None, 0
            if batch.segment is not None:
                batch.segment.unlink(missing_ok=True)
                batch.segment = None
        self._batches = []
        if not found:
            return pl.DataFrame(schema={_ROW: pl.UInt64, _KEY: pl.String})
        return pl.concat(found)

    def _check_unchanged(self) -> None:
        try:
            info = self.spec.path.stat()
        except OSError as exc:
            raise _open_error(self.spec.path, exc) from None
        if self._stamp != (info.st_size, info.st_mtime_ns):
            raise TableError(f"{self.spec.path}: changed while this run read it; run again")

    def _items_at(self, positions: npt.NDArray[np.uint64]) -> pl.Series:
        """Text input: the items at these ascending positions, read again."""
        self._check_unchanged()
        wanted = np.zeros(self.rows_read, dtype=np.bool_)
        wanted[positions] = True
        found: list[pl.Series] = []
        position = 0
        for items in _text_items(self):
            if position + len(items) > self.rows_read:
                raise TableError(f"{self.spec.path}: changed while this run read it; run again")
            matched = items.filter(pl.Series(wanted[position : position + len(items)]))
            # A copy of the matching items only: the filter's views keep the whole block.
            found.append(_compact_strings(matched.to_frame()).to_series())
            position += len(items)
        if position != self.rows_read:
            raise TableError(f"{self.spec.path}: changed while this run read it; run again")
        return pl.concat(found) if found else pl.Series(TEXT_COLUMN, [], dtype=pl.String)

    def _stamp_file(self) -> None:
        try:
            info = self.spec.path.stat()
        except OSError as exc:
            raise _open_error(self.spec.path, exc) from None
        self._stamp = (info.st_size, info.st_mtime_ns)

    def _rows_at(self, positions: npt.NDArray[np.uint64]) -> pl.DataFrame:
        """The input's rows at these ascending positions, every column, read again."""
        spec = self.spec
        self._check_unchanged()
        with _parse_errors(spec):
            scan = _scan(spec)
            if not len(positions):
                return scan.head(0).collect()
            index = "__teepsi_row"
            while index in scan.collect_schema().names():
                index += "_"
            wanted = pl.Series(positions).cast(pl.get_index_type()).implode()
            batches = (
                scan.with_row_index(index)
                .filter(pl.col(index).is_in(wanted))
                .collect_batches(chunk_size=self.rows_per_batch)
            )
            # Each batch copied: a filter's views would keep every row's text alive.
            parts = [_compact_strings(batch).get_columns() for batch in batches]
        if not parts:
            raise TableError(f"{spec.path}: changed while this run read it; run again")
        # One contiguous chunk per column (gathering in key order from many chunks costs
        # far more than this copy), a column at a time: the peak is the rows and a column.
        columns: list[pl.Series] = []
        for at in range(len(parts[0])):
            columns.append(pl.concat([part[at] for part in parts], rechunk=True))
            for part in parts:
                part[at] = columns[-1].clear()
        found = pl.DataFrame(columns)
        del columns, parts
        if not np.array_equal(found[index].to_numpy(), positions):
            raise TableError(f"{spec.path}: changed while this run read it; run again")
        return found.drop(index)


def _check_readable(path: Path, fmt: TableFormat) -> None:
    """Fail with one line unless ``path`` is a file this process can open (for Parquet:
    or a directory of Parquet parts, as Spark and others write a table)."""
    if fmt is TableFormat.PARQUET and path.is_dir():
        parquet_parts(path)
        return
    try:
        with path.open("rb"):
            pass
    except IsADirectoryError:
        raise directory_error(path) from None
    except OSError as exc:
        raise _open_error(path, exc) from None


def parquet_parts(path: Path) -> list[Path]:
    """The part files of a Parquet directory, in name order: ``*.parquet`` files, without
    the hidden ``.crc`` checksums and ``_SUCCESS`` markers Spark and Hadoop write beside."""
    try:
        parts = sorted(
            p
            for p in path.iterdir()
            if p.suffix.lower() in (".parquet", ".pq") and not p.name.startswith((".", "_"))
        )
    except OSError as exc:
        raise _open_error(path, exc) from None
    if not parts:
        raise TableError(f"{path}: a directory without .parquet files; expected a data file")
    return parts


def directory_error(path: Path) -> TableError:
    try:
        parquet = any(p.suffix.lower() in (".parquet", ".pq") for p in path.iterdir())
    except OSError:
        parquet = False
    if parquet:
        return TableError(
            f"{path}: a directory of Parquet files: pass --format parquet to read them as one table"
        )
    return TableError(f"{path}: is a directory, expected a data file")


def _open_error(path: Path, error: OSError) -> TableError:
    if isinstance(error, FileNotFoundError):
        return TableError(f"{path}: no such file; check the --data path")
    if isinstance(error, IsADirectoryError):
        return directory_error(path)
    return TableError(f"{path}: cannot read: {error.strerror}")


def _utf8_error(path: Path, data: bytes, first_line: int = 1) -> TableError | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        return TableError(
            f"{path}: line {line}: not valid UTF-8 (byte offset {exc.start}); "
            "save the file as UTF-8"
        )
    return None


def _utf8_error_in_file(path: Path) -> TableError:
    """The first invalid UTF-8 in a file, found a block at a time (never all of it)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    try:
        # Only gzip CSV is read compressed (detect_format); offsets count its decompressed bytes.
        with gzip.open(path, "rb") if is_compressed(path) else path.open("rb") as handle:
            while block := handle.read(TEXT_BLOCK_BYTES):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    # exc.start counts from the decoder's pending bytes, then this block.
                    at = max(0, exc.start - (len(exc.object) - len(block)))
                    line += block.count(b"\n", 0, at)
                    return TableError(
                        f"{path}: line {line}: not valid UTF-8 "
                        f"(byte offset {offset + at}); save the file as UTF-8"
                    )
                line += block.count(b"\n")
                offset += len(block)
    except (gzip.BadGzipFile, EOFError) as exc:
        return TableError(f"{path}: not a valid gzip file: {exc}")
    except OSError as exc:
        return _open_error(path, exc)
    return TableError(f"{path}: cannot be parsed")


def _text_blocks(path: Path, block_bytes: int) -> Iterator[tuple[bytes, int]]:
    """The file in blocks of whole lines, with each block's first line number."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _open_error(path, exc) from None
    line, carry = 1, b""
    with handle:
        while True:
            try:
                chunk = handle.read(block_bytes)
            except OSError as exc:
                raise _open_error(path, exc) from None
            data = carry + chunk
            cut = len(data) if not chunk else data.rfind(b"\n") + 1
            if cut:
                block, carry = data[:cut], data[cut:]
                yield block, line
                line += block.count(b"\n")
            else:
                carry = data  # one line longer than a block: read on
            if not chunk:
                return


def _text_items(table: Table) -> Iterator[pl.Series]:
    """The text file's items (stripped, non-blank lines), a block at a time."""
    spec = table.spec
    block_bytes = min(TEXT_BLOCK_BYTES, max(64 * 1024, table.budget.limit_bytes // 32))
    for data, first_line in _text_blocks(spec.path, block_bytes):
        nul = data.find(b"\0")
        if nul >= 0:
            line = first_line + data.count(b"\n", 0, nul)
            raise TableError(f"{spec.path}: line {line}: contains a NUL byte; items must be text")
        if not data or data.isspace():
            continue
        try:
            # One column per line: NUL is absent (checked above), so it can be the separator.
            frame = pl.read_csv(
                io.BytesIO(data),
                has_header=False,
                separator="\x00",
                quote_char=None,
                new_columns=[TEXT_COLUMN],
                schema={TEXT_COLUMN: pl.String},
            )
        except pl.exceptions.ComputeError:
            raise (
                _utf8_error(spec.path, data, first_line)
                or TableError(f"{spec.path}: cannot be parsed")
            ) from None
        yield _stripped_items(table.spec, frame)


def _stripped_items(spec: TableSpec, frame: pl.DataFrame) -> pl.Series:
    """Items from a frame with one string column "item" (lines, unstripped)."""
    items = frame.select(pl.col(TEXT_COLUMN).str.strip_chars(TRIM_CHARS)).filter(
        pl.col(TEXT_COLUMN).str.len_bytes() > 0
    )
    longest = items[TEXT_COLUMN].str.len_bytes().max()
    if isinstance(longest, int) and longest > MAX_TEXT_ITEM_BYTES:
        raise TableError(
            f"{spec.path}: an item of {longest} bytes exceeds the limit of "
            f"{MAX_TEXT_ITEM_BYTES} bytes"
        )
    return items[TEXT_COLUMN]


def _add_items(table: Table, items: pl.Series) -> None:
    keys = normalized_keys(items.to_frame(), [TEXT_COLUMN], table.spec.normalization)
    _add_keys(table, keys, table.rows_read)
    table.rows_read += len(items)


def _add_keys(table: Table, keys: pl.Series, position: int) -> None:
    """One batch's keys (null where a row has none), its first row at ``position``."""
    keyed = keys.is_not_null().to_numpy()
    rows = np.flatnonzero(keyed).astype(np.uint64) + np.uint64(position)
    table._add(keys.filter(pl.Series(keyed)), rows)


def table_from_frame(
    frame: pl.DataFrame, spec: TableSpec, *, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> Table:
    """A text table from a frame with one string column "item" (lines, unstripped)."""
    table = Table(spec, memory_budget=memory_budget, in_memory=True)
    for start in range(0, len(frame), table.rows_per_batch):
        _add_items(table, _stripped_items(spec, frame.slice(start, table.rows_per_batch)))
    return table


def _scan(spec: TableSpec) -> pl.LazyFrame:
    if spec.format is TableFormat.CSV:
        options: dict[str, Any] = {
            "separator": spec.delimiter,
            "quote_char": spec.quote_char,
            "infer_schema": False,  # every column as text: keys compare as written
        }
        if is_compressed(spec.path):
            # Polars cannot scan compressed CSV: gzip CSV is read whole, decompressed, so
            # --memory-budget does not bound this read (only what is kept of it after).
            return pl.read_csv(spec.path, **options).lazy()
        return pl.scan_csv(spec.path, **options)
    if spec.path.is_dir():  # a Parquet directory (Spark and others): its parts, as one
        return pl.scan_parquet(parquet_parts(spec.path))
    return pl.scan_parquet(spec.path)


@contextmanager
def _parse_errors(spec: TableSpec) -> Iterator[None]:
    """Polars' errors while reading CSV or Parquet, as one line naming the file."""
    try:
        yield
    except pl.exceptions.NoDataError:
        raise TableError(f"{spec.path}: empty file; a CSV input needs a header row") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        if spec.format is TableFormat.PARQUET:
            raise TableError(f"{spec.path}: not a readable Parquet file: {exc}") from None
        if not isinstance(exc, (pl.exceptions.ComputeError, pl.exceptions.SchemaError, OSError)):
            raise
        if "utf-8" in str(exc).lower():
            raise _utf8_error_in_file(spec.path) from None
        raise TableError(f"{spec.path}: not a valid CSV file: {str(exc).splitlines()[0]}") from None


def _read_structured(table: Table) -> None:
    spec = table.spec
    if not spec.key_columns:
        raise TableError(f"{spec.path}: name the key column(s) with --key COLUMN")
    _check_readable(spec.path, spec.format)
    with _parse_errors(spec):
        scan = _scan(spec)
        columns = scan.collect_schema().names()
        missing = [c for c in spec.key_columns if c not in columns]
        if missing:
            raise TableError(
                f"{spec.path}: no column {missing[0]!r} (columns: {', '.join(columns[:20])}); "
                "pass --key with one of them"
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


def read_table(
    spec: TableSpec,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    spill_dir: Path | None = None,
) -> Table:
    """Read the party's input as ``spec`` says, within ``memory_budget`` bytes."""
    table = Table(spec, memory_budget=memory_budget, spill_dir=spill_dir)
    try:
        table._stamp_file()  # before reading: a change while it reads is caught too
        if spec.format is TableFormat.TEXT:
            for items in _text_items(table):
                _add_items(table, items)
        else:
            _read_structured(table)
    except BaseException:
        table.close()
        raise
    return table


def matching_rows(
    table: Table,
    seeds: tuple[int, int],
    result_hi: U64Array,
    result_lo: U64Array,
) -> pl.DataFrame:
    """The table's rows whose key is in the result, ordered by key (stable within a key).

    For text input: the distinct matching items (their normalised form), sorted bytewise.
    The records are the ones hashed for the upload; only the matching rows are read again.
    """
    result_hi, result_lo = sorted_unique_records(result_hi, result_lo)
    spec = table.spec
    if len(result_hi):
        table.hash(seeds)
        found = table._matching_positions(result_hi, result_lo)
    else:
        found = pl.DataFrame(schema={_ROW: pl.UInt64, _KEY: pl.String})
    positions = found[_ROW].to_numpy()
    if spec.format is TableFormat.TEXT:
        if table.in_memory:
            keys = found[_KEY]
        else:
            items = table._items_at(positions).to_frame()
            keys = normalized_keys(items, [TEXT_COLUMN], spec.normalization)
        del found
        ordered = keys.gather(key_order(keys))
        # Sorted, so repeats are neighbours: cheaper than hashing every string to drop them.
        distinct = ordered.filter((ordered != ordered.shift(1)).fill_null(True))
        return _compact_strings(distinct.alias(TEXT_COLUMN).to_frame())
    del found
    rows = table._rows_at(positions)
    keys = normalized_keys(rows, spec.key_columns, spec.normalization)
    # Ties keep input order, so the output is deterministic (and the same with or
    # without spilling).
    order = key_order(keys)
    del keys
    columns = rows.get_columns()
    del rows  # the columns list is now all that holds them
    return _gather_compact(columns, order)


#: Polars stores strings up to this many bytes inline; longer ones point into a buffer.
_INLINE_STRING_BYTES = 12


def _gather_compact(columns: list[pl.Series], order: npt.NDArray[np.int64]) -> pl.DataFrame:
    """The columns gathered in ``order``, one at a time, each released from ``columns``
    once gathered: the peak is the input and one column, not two whole tables."""
    gathered: list[pl.Series] = []
    while columns:
        column = columns.pop(0)
        gathered.append(_compact_strings(column.gather(order).to_frame()).to_series())
        del column
    return pl.DataFrame(gathered)


def _compact_strings(frame: pl.DataFrame) -> pl.DataFrame:
    """Copy long string columns into fresh, contiguous buffers.

    After a gather in key order, long strings still point into the whole input's buffers
    in scattered order: writing them costs a cache miss each (writing 5M rows took twice
    as long), and they keep every input row's text alive. Concatenating each with "" is a
    copy in row order (a cast or a slice would keep the old buffers).
    """
    columns: list[pl.Expr] = []
    for name, dtype in frame.schema.items():
        longest = frame[name].str.len_bytes().max() if dtype == pl.String else None
        if isinstance(longest, int) and longest > _INLINE_STRING_BYTES:
            columns.append(pl.concat_str([pl.col(name), pl.lit("")]).alias(name))
    return frame.with_columns(columns) if columns else frame


def _prefix_word(at: int) -> pl.Expr:
    """Bytes ``at`` .. ``at`` + 8 of the 16-byte column "b", as a big-endian number."""
    word = pl.col("b").bin.slice(at, 8).bin.reinterpret(dtype=pl.UInt64, endianness="big")
    return word.cast(pl.UInt128)


def key_order(keys: pl.Series) -> npt.NDArray[np.int64]:
    """The permutation that sorts ``keys`` (no nulls) bytewise, stable.

    Each key's first 16 UTF-8 bytes, zero-padded, become one 128-bit number, and those
    are sorted: an integer sort, several times cheaper than polars' string sort. Only keys
    whose number another key shares (a common 16-byte prefix, or a shorter key padded
    with zeros) are then put in order by their whole bytes and position, with polars.
    """
    count = len(keys)
    if count < 2:
        return np.arange(count, dtype=np.int64)
    # Padding to 16 characters gives at least 16 bytes (a character is one byte or more).
    prefix = (
        keys.to_frame("k")
        .select(b=pl.col("k").str.pad_end(16, "\x00").cast(pl.Binary).bin.head(16))
        .select(p=_prefix_word(0) * (1 << 64) + _prefix_word(8))["p"]
    )
    order = prefix.arg_sort().to_numpy().astype(np.int64)
    ranked = prefix.gather(order)
    tied = ((ranked == ranked.shift(1)).fill_null(False)) | (
        (ranked == ranked.shift(-1)).fill_null(False)
    )
    if tied.any():
        at = np.flatnonzero(tied.to_numpy())
        rows = order[at]
        # Runs of one prefix are contiguous, and stay so sorted by (prefix, key, position).
        ties = pl.DataFrame({"p": ranked.gather(at), "k": keys.gather(rows), "i": rows})
        order[at] = ties.sort(["p", "k", "i"])["i"].to_numpy()
    return order


def text_lines(rows: pl.DataFrame) -> bytes:
    """Text output as bytes: each item followed by a newline."""
    if not len(rows):
        return b""
    return str((rows[TEXT_COLUMN] + "\n").str.join("")[0]).encode()


#: ``--output -``: the rows go to standard output.
STDOUT_PATH = "-"


def _write_rows_to(rows: pl.DataFrame, spec: TableSpec, handle: BinaryIO) -> None:
    if spec.format is TableFormat.TEXT:
        handle.write(text_lines(rows))
    elif spec.format is TableFormat.CSV:
        rows.write_csv(handle, separator=spec.delimiter, quote_char=spec.quote_char or '"')
    else:
        rows.write_parquet(handle)


def write_rows(
    rows: pl.DataFrame, spec: TableSpec, path: str | Path, *, stdout: BinaryIO | None = None
) -> None:
    """Write rows in the input's format: to ``path`` atomically with mode 0600 (the old
    file, if any, stays whole until the new one is complete), or to ``stdout`` for "-"."""
    try:
        if str(path) == STDOUT_PATH:
            out = stdout if stdout is not None else sys.stdout.buffer
            _write_rows_to(rows, spec, out)
            out.flush()
            return
        with private_writer(path) as handle:
            _write_rows_to(rows, spec, handle)
    except (OSError, pl.exceptions.PolarsError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise TableError(f"cannot write --output {path}: {reason}") from None
