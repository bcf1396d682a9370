"""Reading a data provider's input files: text a block of lines at a time, CSV and
Parquet through polars' scans, and every read error as one line naming the file.

Text files hold one item per line: surrounding whitespace (including CR) is stripped and
blank lines are skipped.
"""

from __future__ import annotations

import codecs
import gzip
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from teepsi.contract.normalization import TRIM_CHARS
from teepsi.engine.table_spec import TEXT_COLUMN, TableError, TableFormat, TableSpec, is_compressed

#: Largest text item, in bytes, after stripping.
MAX_TEXT_ITEM_BYTES = 64 * 1024
#: Bytes of a text file parsed per batch, at most.
TEXT_BLOCK_BYTES = 8 << 20
#: Bytes of a CSV file polars' streaming scan reads per chunk. Its default holds about
#: 400 MB in flight on two threads (a 10M-row party's budget is 1 GiB); 4 MiB holds about
#: 200 MB, at the same speed. ``POLARS_CSV_CHUNK_SIZE`` set by an operator wins.
CSV_SCAN_CHUNK_BYTES = 4 << 20
#: Parquet row groups polars' scan decodes ahead. Its default holds two or three decoded
#: row groups (about 0.6 GB at 1M rows of five text columns); one ahead costs no CPU.
#: ``POLARS_ROW_GROUP_PREFETCH_SIZE`` set by an operator wins.
PARQUET_ROW_GROUPS_AHEAD = 1


def check_readable(path: Path, fmt: TableFormat) -> None:
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
        raise open_error(path, exc) from None


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
        raise open_error(path, exc) from None
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
            f"{path}: a directory of Parquet files: set the table format to parquet to "
            "read them as one table"
        )
    return TableError(f"{path}: is a directory, expected a data file")


def open_error(path: Path, error: OSError) -> TableError:
    if isinstance(error, FileNotFoundError):
        return TableError(f"{path}: no such file; check the data path")
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
        return open_error(path, exc)
    return TableError(f"{path}: cannot be parsed")


def _text_blocks(path: Path, block_bytes: int, name: Path) -> Iterator[tuple[bytes, int]]:
    """The file at ``path`` (called ``name`` in errors) in blocks of whole lines, with each
    block's byte offset.

    A block's partial last line is read again with the next block (a seek back), so
    each block is one read and at most one copy, and no block is joined to another.
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise open_error(name, exc) from None
    offset = at = 0  # where the next block starts, where the handle is
    with handle:
        while True:
            try:
                if at != offset:
                    handle.seek(offset)
                chunk = handle.read(block_bytes)
                if not chunk:
                    return
                cut = chunk.rfind(b"\n") + 1
                while not cut:  # one line longer than a block: read on to its end
                    more = handle.read(block_bytes)
                    if not more:
                        cut = len(chunk)  # the last line, without a newline
                        break
                    chunk += more
                    cut = chunk.rfind(b"\n", len(chunk) - len(more)) + 1
            except OSError as exc:
                raise open_error(name, exc) from None
            yield (chunk if cut == len(chunk) else chunk[:cut]), offset
            at = offset + len(chunk)
            offset += cut


def _line_at(path: Path, offset: int, name: Path) -> int:
    """The line number of the byte at ``offset`` (for error messages only)."""
    line, at = 1, 0
    try:
        with path.open("rb") as handle:
            while at < offset and (block := handle.read(min(TEXT_BLOCK_BYTES, offset - at))):
                line += block.count(b"\n")
                at += len(block)
    except OSError as exc:
        raise open_error(name, exc) from None
    return line


#: Bytes the trim strips other than the newline that ends a line: a block without any of
#: them has no item to strip (polars drops the CR of a CRLF, but a lone CR would stay).
_STRIP_BYTES = tuple(c.encode() for c in TRIM_CHARS if c != "\n")


def text_items(
    spec: TableSpec, memory_budget: int, path: Path | None = None
) -> Iterator[pl.Series]:
    """The text file's items (stripped, non-blank lines), a block at a time (blocks
    smaller under a small ``memory_budget``), read from ``path`` (default: the spec's)."""
    block_bytes = min(TEXT_BLOCK_BYTES, max(64 * 1024, memory_budget // 32))
    source = path or spec.path
    for data, offset in _text_blocks(source, block_bytes, spec.path):
        nul = data.find(b"\0")
        if nul >= 0:
            line = _line_at(source, offset + nul, spec.path)
            raise TableError(f"{spec.path}: line {line}: contains a NUL byte; items must be text")
        if data.isspace():
            continue
        try:
            # One column per line: NUL is absent (checked above), so it can be the separator.
            frame = pl.read_csv(
                data,
                has_header=False,
                separator="\x00",
                quote_char=None,
                new_columns=[TEXT_COLUMN],
                schema={TEXT_COLUMN: pl.String},
            )
        except pl.exceptions.ComputeError:
            raise (
                _utf8_error(spec.path, data, _line_at(source, offset, spec.path))
                or TableError(f"{spec.path}: cannot be parsed")
            ) from None
        if any(byte in data for byte in _STRIP_BYTES):
            yield stripped_items(spec, frame)
        else:
            # Nothing to strip: the blank lines (read as nulls) are all there is to drop.
            yield _within_item_limit(spec, frame[TEXT_COLUMN].drop_nulls())


def stripped_items(spec: TableSpec, frame: pl.DataFrame) -> pl.Series:
    """Items from a frame with one string column "item" (lines, unstripped)."""
    items = frame.select(pl.col(TEXT_COLUMN).str.strip_chars(TRIM_CHARS)).filter(
        pl.col(TEXT_COLUMN).str.len_bytes() > 0
    )
    return _within_item_limit(spec, items[TEXT_COLUMN])


def _within_item_limit(spec: TableSpec, items: pl.Series) -> pl.Series:
    longest = items.str.len_bytes().max()
    if isinstance(longest, int) and longest > MAX_TEXT_ITEM_BYTES:
        raise TableError(
            f"{spec.path}: an item of {longest} bytes exceeds the limit of "
            f"{MAX_TEXT_ITEM_BYTES} bytes"
        )
    return items


def scan_table(spec: TableSpec, path: Path | None = None) -> pl.LazyFrame:
    """The input as a lazy frame, read from ``path`` (default: the spec's; the format and
    compression are the spec's)."""
    source = path or spec.path
    if spec.format is TableFormat.CSV:
        os.environ.setdefault("POLARS_CSV_CHUNK_SIZE", str(CSV_SCAN_CHUNK_BYTES))
        options: dict[str, Any] = {
            "separator": spec.delimiter,
            "quote_char": spec.quote_char,
            "infer_schema": False,  # every column as text: keys compare as written
        }
        if is_compressed(spec.path):
            # Polars cannot scan compressed CSV: gzip CSV is read whole, decompressed, so
            # --memory-budget does not bound this read (only what is kept of it after).
            return pl.read_csv(source, **options).lazy()
        return pl.scan_csv(source, **options)
    os.environ.setdefault("POLARS_ROW_GROUP_PREFETCH_SIZE", str(PARQUET_ROW_GROUPS_AHEAD))
    if source.is_dir():  # a Parquet directory (Spark and others): its parts, as one
        return pl.scan_parquet(parquet_parts(source))
    return pl.scan_parquet(source)


@contextmanager
def parse_errors(spec: TableSpec) -> Iterator[None]:
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
