"""Writing a data provider's matching rows: in its input's format, to a private file
(atomically, mode 0600) or to standard output."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import polars as pl
from polars.io.plugins import register_io_source

from teepsi.engine.table_spec import TEXT_COLUMN, TableError, TableFormat, TableSpec
from teepsi.privatefile import private_writer


def text_lines(rows: pl.DataFrame) -> bytes:
    """Text output as bytes: each item followed by a newline (polars' CSV writer, never
    quoting, with one column: a third less CPU than joining the strings)."""
    if not len(rows):
        return b""
    lines = io.BytesIO()
    rows.select(TEXT_COLUMN).write_csv(lines, include_header=False, quote_style="never")
    return lines.getvalue()


#: ``--output -``: the rows go to standard output.
STDOUT_PATH = "-"


#: Text output is joined into lines this many rows at a time: the whole output joined at
#: once would take about three more copies of it (a string, its bytes, the lines).
TEXT_WRITE_ROWS = 1 << 18


class RowPieces(Protocol):
    """Rows in output order that come a piece at a time (engine.matching.MatchingRows)."""

    def pieces(self) -> Iterator[pl.DataFrame]: ...

    def frame(self) -> pl.DataFrame: ...


def text_pieces(rows: pl.DataFrame | RowPieces) -> Iterator[bytes]:
    """Text output as bytes, a bounded number of lines at a time."""
    for piece in _pieces(rows):
        for start in range(0, len(piece), TEXT_WRITE_ROWS):
            yield text_lines(piece.slice(start, TEXT_WRITE_ROWS))


def _pieces(rows: pl.DataFrame | RowPieces) -> Iterator[pl.DataFrame]:
    if isinstance(rows, pl.DataFrame):
        yield rows
    else:
        yield from rows.pieces()


def _write_rows_to(rows: pl.DataFrame | RowPieces, spec: TableSpec, handle: BinaryIO) -> None:
    if spec.format is TableFormat.TEXT:
        for lines in text_pieces(rows):
            handle.write(lines)
    elif spec.format is TableFormat.CSV:
        quote = spec.quote_char or '"'
        for at, piece in enumerate(_pieces(rows)):
            piece.write_csv(
                handle, include_header=at == 0, separator=spec.delimiter, quote_char=quote
            )
    else:
        _write_parquet(rows, handle)


#: Rows per Parquet row group, fixed: the file's bytes are the same whether the rows came
#: a piece at a time or all at once.
PARQUET_ROW_GROUP_ROWS = 1 << 17


def _write_parquet(rows: pl.DataFrame | RowPieces, handle: BinaryIO) -> None:
    if isinstance(rows, pl.DataFrame):
        rows.write_parquet(handle, row_group_size=PARQUET_ROW_GROUP_ROWS)
        return
    pieces = rows.pieces()
    first = next(pieces)  # there is always one, if only empty: it has the schema
    failed: list[BaseException] = []

    def source(*_: object) -> Iterator[pl.DataFrame]:
        try:
            yield first
            yield from pieces
        except BaseException as exc:  # polars would give it back as its own error
            failed.append(exc)
            raise

    # Polars' streaming sink pulls the pieces one at a time: never every row at once.
    try:
        sink = register_io_source(source, schema=first.schema)
        sink.sink_parquet(handle, row_group_size=PARQUET_ROW_GROUP_ROWS)
    except pl.exceptions.PolarsError:
        if failed:
            raise failed[0] from None
        raise


def write_rows(
    rows: pl.DataFrame | RowPieces,
    spec: TableSpec,
    path: str | Path,
    *,
    stdout: BinaryIO | None = None,
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
        raise TableError(f"cannot write the output path {path}: {reason}") from None
