"""A data provider's table: reading text, CSV or Parquet, and writing its matching rows.

Text files hold one item per line: surrounding whitespace (including CR) is stripped and
blank lines are skipped. CSV and Parquet files are tables with one or more key columns;
the output is the party's own rows whose key is in the intersection, every column kept,
in the input's format, ordered by key (semi-join semantics: a key repeated in the table
matches once but returns all its rows).
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

from teepsi.engine.intersect import as_u128, sorted_unique, split_u128
from teepsi.engine.keys import (
    TRIM_CHARS,
    Normalization,
    U64Array,
    hash_keys,
    key_scheme_id,
    normalized_keys,
)
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


@dataclass
class Table:
    """A loaded input: its rows and each row's normalised key (null when it has none)."""

    spec: TableSpec
    frame: pl.DataFrame
    keys: pl.Series
    rows_read: int

    @property
    def rows_with_key(self) -> int:
        return len(self.keys) - self.keys.null_count()

    def key_records(self, seeds: tuple[int, int]) -> tuple[U64Array, U64Array]:
        """The distinct keys' records, sorted: what a party uploads.

        De-duplicating here keeps "duplicates count once" true for the server's item
        limits, and the server never learns how often a key repeats in a table.
        """
        hi, lo = hash_keys(self.keys.drop_nulls(), seeds)
        return split_u128(sorted_unique(hi, lo))


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _open_error(path, exc) from None
    if is_compressed(path):  # only gzip CSV gets here (detect_format); for line numbers
        import gzip

        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise TableError(f"{path}: not a valid gzip file: {exc}") from None
    return data


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


def _utf8_error(path: Path, data: bytes) -> TableError:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return TableError(
            f"{path}: line {line}: not valid UTF-8 (byte offset {exc.start}); "
            "save the file as UTF-8"
        )
    return TableError(f"{path}: cannot be parsed")


def _read_text(spec: TableSpec) -> Table:
    data = _read_bytes(spec.path)
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise TableError(f"{spec.path}: line {line}: contains a NUL byte; items must be text")
    if not data.strip():
        frame = pl.DataFrame({TEXT_COLUMN: []}, schema={TEXT_COLUMN: pl.String})
    else:
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
            raise _utf8_error(spec.path, data) from None
    return table_from_frame(frame, spec)


def table_from_frame(frame: pl.DataFrame, spec: TableSpec) -> Table:
    """A text table from a frame with one string column "item" (lines, unstripped)."""
    frame = frame.select(pl.col(TEXT_COLUMN).str.strip_chars(TRIM_CHARS)).filter(
        pl.col(TEXT_COLUMN).str.len_bytes() > 0
    )
    longest = frame[TEXT_COLUMN].str.len_bytes().max()
    if isinstance(longest, int) and longest > MAX_TEXT_ITEM_BYTES:
        raise TableError(
            f"{spec.path}: an item of {longest} bytes exceeds the limit of "
            f"{MAX_TEXT_ITEM_BYTES} bytes"
        )
    keys = normalized_keys(frame, [TEXT_COLUMN], spec.normalization)
    return Table(spec=spec, frame=frame, keys=keys, rows_read=len(frame))


def _read_structured(spec: TableSpec) -> Table:
    if not spec.key_columns:
        raise TableError(f"{spec.path}: name the key column(s) with --key COLUMN")
    _check_readable(spec.path, spec.format)
    if spec.format is TableFormat.CSV:
        try:
            # From the path, not from bytes read here: polars then parses with every core.
            frame = pl.read_csv(
                spec.path,
                separator=spec.delimiter,
                quote_char=spec.quote_char,
                infer_schema=False,  # every column as text: keys compare as written
            )
        except pl.exceptions.ComputeError as exc:
            if "utf-8" in str(exc).lower():
                raise _utf8_error(spec.path, _read_bytes(spec.path)) from None
            raise TableError(
                f"{spec.path}: not a valid CSV file: {str(exc).splitlines()[0]}"
            ) from None
        except pl.exceptions.NoDataError:
            raise TableError(f"{spec.path}: empty file; a CSV input needs a header row") from None
    else:
        try:
            source = parquet_parts(spec.path) if spec.path.is_dir() else spec.path
            frame = pl.read_parquet(source)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise TableError(f"{spec.path}: not a readable Parquet file: {exc}") from None
    missing = [c for c in spec.key_columns if c not in frame.columns]
    if missing:
        raise TableError(
            f"{spec.path}: no column {missing[0]!r} (columns: {', '.join(frame.columns[:20])}); "
            "pass --key with one of them"
        )
    # One contiguous chunk per column: gathering the matching rows from the hundreds of
    # chunks a parallel reader leaves costs ten times more than this copy.
    frame = frame.rechunk()
    keys = normalized_keys(frame, spec.key_columns, spec.normalization)
    return Table(spec=spec, frame=frame, keys=keys, rows_read=len(frame))


def read_table(spec: TableSpec) -> Table:
    """Load the party's input as ``spec`` says."""
    if spec.format is TableFormat.TEXT:
        return _read_text(spec)
    return _read_structured(spec)


def matching_rows(
    table: Table,
    seeds: tuple[int, int],
    result_hi: U64Array,
    result_lo: U64Array,
) -> pl.DataFrame:
    """The table's rows whose key is in the result, ordered by key (stable within a key).

    For text input: the distinct matching items (their normalised form), sorted bytewise.
    """
    keyed = np.flatnonzero(table.keys.is_not_null().to_numpy())
    hi, lo = hash_keys(table.keys.gather(keyed), seeds)
    wanted = as_u128(result_hi, result_lo)
    hit = as_u128(hi, lo).is_in(wanted.implode()).to_numpy()
    rows = keyed[hit]
    keys = table.keys.gather(rows)
    if table.spec.format is TableFormat.TEXT:
        items = keys.unique()
        return items.gather(key_order(items)).alias(TEXT_COLUMN).to_frame()
    # One gather of every column, in key order: ties keep input order, so the output is
    # deterministic (and the same with or without spilling).
    ordered: pl.DataFrame = table.frame[rows[key_order(keys)]]
    return _compact_strings(ordered)


#: Polars stores strings up to this many bytes inline; longer ones point into a buffer.
_INLINE_STRING_BYTES = 12


def _compact_strings(frame: pl.DataFrame) -> pl.DataFrame:
    """Copy long string columns into fresh, contiguous buffers.

    After a gather in key order, long strings still point into the whole input's buffers
    in scattered order: writing them costs a cache miss each (writing 5M rows took twice
    as long), and they keep every input row's text alive. One copy through Arrow fixes
    both.
    """
    columns: list[pl.Series] = []
    for name, dtype in frame.schema.items():
        longest = frame[name].str.len_bytes().max() if dtype == pl.String else None
        if isinstance(longest, int) and longest > _INLINE_STRING_BYTES:
            copied = pl.Series(name, frame[name].to_arrow().cast(pa.large_string()))
            columns.append(copied)
    return frame.with_columns(columns) if columns else frame


#: Keys longer than this are sorted by polars' string sort instead of as words.
_MAX_WORD_SORT_BYTES = 128
#: Word columns may take this many bytes beyond twice the keys' own before polars sorts.
_WORD_SORT_ALLOWANCE = 64 << 20
#: For k = 0..8: a big-endian 64-bit word's mask keeping its first k bytes.
_KEEP_FIRST_BYTES = np.array(
    [0] + [((1 << (8 * k)) - 1) << (8 * (8 - k)) for k in range(1, 9)], dtype=np.uint64
)


def key_order(keys: pl.Series) -> npt.NDArray[np.int64]:
    """The permutation that sorts ``keys`` (no nulls) bytewise, stable.

    Each key's UTF-8 bytes become big-endian 64-bit words, zero-padded, paired into 128-bit
    columns; then its length (a key that is a zero-padded prefix of another sorts first,
    as bytewise order wants) and its position (stability). Sorting those integer columns
    costs about half the CPU of polars' string sort, which matters at millions of rows.
    Keys over 128 bytes, or too many to lay out, go through polars' string sort.
    """
    count = len(keys)
    if count < 2:
        return np.arange(count, dtype=np.int64)
    array = keys.to_arrow()
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not pa.types.is_large_string(array.type):
        array = array.cast(pa.large_string())
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[array.offset : array.offset + count + 1]
    lengths = np.diff(offsets)
    words = -(-int(lengths.max()) // 8)
    start, end = int(offsets[0]), int(offsets[-1])
    if (
        array.null_count
        or count >= 1 << 32  # the position shares a 64-bit column with the length
        or words * 8 > _MAX_WORD_SORT_BYTES
        or (count * words * 8 > 2 * (end - start) + _WORD_SORT_ALLOWANCE)
    ):
        frame = keys.to_frame("k").with_row_index("i").sort(["k", "i"])
        return frame["i"].to_numpy().astype(np.int64, copy=False)
    # The keys' bytes and 8 zero bytes, read as a big-endian word at every byte offset.
    data = np.zeros(end - start + 8, dtype=np.uint8)
    if data_buffer is not None:
        data[: end - start] = np.frombuffer(data_buffer, dtype=np.uint8)[start:end]
    word_at = np.ndarray(shape=(end - start + 1,), dtype=">u8", buffer=data, strides=(1,))
    starts = offsets[:-1] - start
    columns: dict[str, pl.Series] = {}
    for pair in range(0, words, 2):
        halves = [
            word_at[np.minimum(starts + 8 * w, end - start)].astype(np.uint64)
            & _KEEP_FIRST_BYTES[np.clip(lengths - 8 * w, 0, 8)]
            for w in (pair, pair + 1)
        ]
        columns[f"w{pair}"] = as_u128(halves[0], halves[1])
    position = np.arange(count, dtype=np.uint64)
    columns["tail"] = pl.Series((lengths.astype(np.uint64) << np.uint64(32)) | position)
    order = pl.DataFrame(columns).select(pl.arg_sort_by(list(columns))).to_series()
    return order.to_numpy().astype(np.int64, copy=False)


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
