"""A data provider's matching rows in key order, a piece at a time, from one scan.

The rows' places in key order are known once the result has come (their positions in
the input, and each one's rank). One scan of the input sends every matching row, with
its rank, to its piece (a run of consecutive ranks); pieces are held in memory up to a
share of the memory budget and sealed to the encrypted spill area beyond it. Each piece
is then put in rank order and handed out. The input is parsed once whatever the number
of pieces, and memory is bounded whatever the number of rows.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt
import polars as pl

from teepsi.engine.input_file import changed_error
from teepsi.engine.key_order import compact_strings, held_bytes
from teepsi.engine.reading import parse_errors
from teepsi.engine.spill import SpillArea

if TYPE_CHECKING:
    from teepsi.engine.tables import Table

#: Pieces held in memory, together, at most this share of the memory budget (the rest is
#: sealed to disk); the scan's batches and the piece being ordered come on top.
HELD_BUDGET_SHARE = 8
#: Input rows parsed per scan batch: a quarter of a read batch, since the scan holds a few
#: batches of every row in flight, not only the matching ones.
SCAN_BATCH_SHARE = 4


def free_column_name(taken: Sequence[str], base: str) -> str:
    """``base``, or ``base`` with underscores added: a column name the input has not."""
    name = base
    while name in taken:
        name += "_"
    return name


def batches_at(
    table: Table, positions: npt.NDArray[np.uint64], only: Sequence[str] | None = None
) -> Iterator[pl.DataFrame]:
    """The input's rows at these ascending positions (every column, or ``only`` these),
    read again with one scan, a batch at a time, in position order. Fails with one line
    if the input is no longer the one that was read."""
    spec = table.spec
    table.check_unchanged()
    done = 0
    with parse_errors(spec):
        scan = table.scan()
        if only is not None:
            scan = scan.select(only)
        index = free_column_name(scan.collect_schema().names(), "__teepsi_row")
        wanted = pl.Series(positions).cast(pl.get_index_type()).implode()
        batches = (
            scan.with_row_index(index)
            .filter(pl.col(index).is_in(wanted))
            .collect_batches(chunk_size=max(1, table.rows_per_batch // SCAN_BATCH_SHARE))
        )
        for batch in batches:
            size = len(batch)
            if not np.array_equal(batch[index].to_numpy(), positions[done : done + size]):
                raise changed_error(spec.path)
            done += size
            yield batch.drop(index)
    if done != len(positions):
        raise changed_error(spec.path)


@dataclass
class _Piece:
    """The rows of one run of ranks, as they came from the scan."""

    held: list[pl.DataFrame] = field(default_factory=list)
    held_bytes: int = 0
    #: Sealed parts: each file and the label it is bound to.
    sealed: list[tuple[Path, bytes]] = field(default_factory=list)


class HeldPieces:
    """The pieces of one scan, in memory and sealed, until each is handed out."""

    def __init__(self, count: int, table: Table) -> None:
        self.pieces = [_Piece() for _ in range(count)]
        self._table = table
        self._held_limit = table.budget.limit_bytes // HELD_BUDGET_SHARE
        self._held_bytes = 0
        self._spill: SpillArea | None = None
        self._label = secrets.token_bytes(16)
        self._sealed = 0

    def add(self, at: int, part: pl.DataFrame, size: int) -> None:
        """Add ``part`` (about ``size`` bytes of its own: parts of one batch share their
        strings' buffers, which polars would count once per part) to piece ``at``."""
        if self._held_bytes + size <= self._held_limit:
            self.pieces[at].held.append(part)
            self.pieces[at].held_bytes += size
            self._held_bytes += size
            return
        if self._spill is None:
            self._spill = self._table.new_spill_area()
        buffer = io.BytesIO()
        # Arrow's oldest string layout: only this part's strings, not the shared buffers.
        part.write_ipc(buffer, compression="uncompressed", compat_level=pl.CompatLevel.oldest())
        self._sealed += 1
        label = self._label + self._sealed.to_bytes(8, "big")
        self.pieces[at].sealed.append((self._spill.write(buffer.getvalue(), label), label))

    def take(self, at: int) -> list[pl.DataFrame]:
        """Piece ``at``'s parts, its memory and files released."""
        piece = self.pieces[at]
        parts, piece.held = piece.held, []
        self._held_bytes -= piece.held_bytes
        piece.held_bytes = 0
        for path, label in piece.sealed:
            assert self._spill is not None
            parts.append(pl.read_ipc(io.BytesIO(self._spill.read(path, label))))
            path.unlink(missing_ok=True)
        piece.sealed = []
        return parts

    def close(self) -> None:
        self.pieces = []
        if self._spill is not None:
            self._spill.close()
            self._spill = None


def pieces_in_key_order(
    table: Table,
    positions: npt.NDArray[np.uint64],
    order: npt.NDArray[np.int64],
    piece_rows: int,
) -> Iterator[pl.DataFrame]:
    """The input's rows at ``positions`` (ascending), in the key order ``order`` (a
    permutation of them), as consecutive pieces of at most ``piece_rows`` rows."""
    count = len(positions)
    rank = np.empty(count, dtype=np.int64)
    rank[order] = np.arange(count, dtype=np.int64)
    store = HeldPieces(-(-count // piece_rows), table)
    try:
        rank_column = _scan_into(table, positions, rank, piece_rows, store)
        for at in range(len(store.pieces)):
            piece = pl.concat(store.take(at), rechunk=True).sort(rank_column)
            # A compact copy: the sorted strings would point all over the piece's buffers.
            yield compact_strings(piece.drop(rank_column))
            del piece
    finally:
        store.close()


def _scan_into(
    table: Table,
    positions: npt.NDArray[np.uint64],
    rank: npt.NDArray[np.int64],
    piece_rows: int,
    store: HeldPieces,
) -> str:
    """One scan: each matching row, with its rank, to its piece. Returns the name of the
    rank column."""
    rank_column = piece_column = ""
    done = 0
    for batch in batches_at(table, positions):
        if not rank_column:  # names the input's columns do not take
            rank_column, piece_column = (
                free_column_name(batch.columns, f"__teepsi_{what}") for what in ("rank", "piece")
            )
        size = len(batch)
        ranks = rank[done : done + size]
        done += size
        # Copied once: a filter's strings keep every parsed row's text alive. The batch's
        # parts below share this copy's buffers.
        batch = compact_strings(batch.with_columns(pl.Series(rank_column, ranks)))
        row_bytes = held_bytes(batch) / size
        pieces = ranks // piece_rows
        if pieces[0] == pieces[-1] and bool(np.all(pieces == pieces[0])):
            store.add(int(pieces[0]), batch, int(row_bytes * size))
            continue
        split = batch.with_columns(pl.Series(piece_column, pieces)).partition_by(
            piece_column, as_dict=True, include_key=False
        )
        for key, part in split.items():
            store.add(int(cast(int, key[0])), part, int(row_bytes * len(part)))
    return rank_column
