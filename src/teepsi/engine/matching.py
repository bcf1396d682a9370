"""A data provider's matching rows: the rows of its table whose key is in the result,
read again from its file, ordered by key.

CSV and Parquet: the party's own rows whose key is in the intersection, every column
kept, ordered by key (semi-join semantics: a key repeated in the table matches once but
returns all its rows). Text: the distinct matching items, normalised, sorted bytewise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import polars as pl

from teepsi.engine.intersect import sorted_unique_records
from teepsi.engine.item_ranges import (
    ItemRanges,
    distinct_in_key_order,
    item_bytes,
    matching_items,
)
from teepsi.engine.key_order import (
    compact_strings,
    held_bytes,
    order_by_prefix,
)
from teepsi.engine.reading import parse_errors
from teepsi.engine.records import U64Array, normalized_keys
from teepsi.engine.row_pieces import HELD_BUDGET_SHARE, batches_at, pieces_in_key_order
from teepsi.engine.table_spec import TEXT_COLUMN, TableFormat
from teepsi.engine.tables import Table

#: A piece written at a time holds at most this share of the table's memory budget
#: (polars' estimate; putting a piece in key order takes a few times that).
PIECE_BUDGET_SHARE = 32
#: Matching text items are held, to be put in order at once, up to this share of the
#: budget; beyond it they are handed out a range of keys at a time.
HELD_ITEMS_SHARE = 4
#: Rows sampled from the input's head to estimate its bytes per row.
_SAMPLE_ROWS = 1024


class MatchingRows:
    """A data provider's matching rows, ordered by key (stable within a key).

    Text: the distinct matching items, held (they are the keys) when they fit a share of
    the budget, else read again a range of keys at a time (:class:`ItemRanges`). CSV
    and Parquet: the
    matching rows' positions and key order, and the rows themselves when they fit a
    share of the budget; else they are read again from the input when asked for, with
    one scan, and handed out a piece of at most a budget's share at a time
    (:meth:`pieces`), so writing them never holds every row at once.
    """

    def __init__(
        self,
        table: Table,
        *,
        items: pl.DataFrame | None = None,
        ranges: ItemRanges | None = None,
        rows: pl.DataFrame | None = None,
        positions: npt.NDArray[np.uint64] | None = None,
        order: npt.NDArray[np.int64] | None = None,
    ) -> None:
        self._table = table
        self._items = items
        #: Text items too many to hold: handed out a range of keys at a time.
        self._ranges = ranges
        #: The rows at ``positions``, when they were small enough to hold.
        self._rows = rows
        #: Ascending row positions, and the permutation of them that is key order.
        self._positions = positions if positions is not None else np.empty(0, np.uint64)
        self._order = order if order is not None else np.empty(0, np.int64)

    def __len__(self) -> int:
        if self._ranges is not None:
            return len(self._ranges)
        return len(self._items) if self._items is not None else len(self._positions)

    def frame(self) -> pl.DataFrame:
        """Every matching row at once (the Python API; small results)."""
        return pl.concat(list(self.pieces(max(1, len(self)))), rechunk=True)

    def piece_rows(self) -> int:
        """Rows per piece: a budget's share, at the bytes per row of the input's head."""
        if self._rows is not None:  # held: they are the measure, the input is not read
            row_bytes = max(1, held_bytes(self._rows) // max(1, len(self._rows)))
        else:
            row_bytes = max(1, _estimated_bytes(self._table, _SAMPLE_ROWS) // _SAMPLE_ROWS)
        return max(1, self._table.budget.limit_bytes // PIECE_BUDGET_SHARE // row_bytes)

    def pieces(self, piece_rows: int | None = None) -> Iterator[pl.DataFrame]:
        """The rows in key order, in consecutive pieces of at most ``piece_rows`` rows
        (default :meth:`piece_rows`); at least one piece, empty for no rows."""
        if self._items is not None:
            yield self._items
            return
        if self._ranges is not None:
            yield from self._ranges.pieces()
            return
        if not len(self._positions):
            yield rows_at(self._table, self._positions)
            return
        size = piece_rows if piece_rows is not None else self.piece_rows()
        if self._rows is not None:
            for start in range(0, len(self._order), size):
                piece = self._rows[self._order[start : start + size]]
                yield compact_strings(piece)  # in output order, not scattered over the rows
            return
        yield from pieces_in_key_order(self._table, self._positions, self._order, size)


def find_matching_rows(
    table: Table,
    seeds: tuple[int, int],
    result_hi: U64Array,
    result_lo: U64Array,
) -> MatchingRows:
    """The table's rows whose key is in the result (:class:`MatchingRows`).

    The records are the ones hashed for the upload; only the matching rows' keys are read
    again here, their other columns when the rows are written.
    """
    result_hi, result_lo = sorted_unique_records(result_hi, result_lo)
    spec = table.spec
    if spec.format is TableFormat.TEXT and not table.in_memory:
        return _matching_items(table, seeds, result_hi, result_lo)
    if len(result_hi):
        table.hash(seeds)
        # Text: one row per distinct key (an item is its key); tables: every row.
        every = spec.format is not TableFormat.TEXT
        positions, keys, prefix = table.matching_positions(result_hi, result_lo, every_row=every)
    else:
        positions, keys = np.empty(0, np.uint64), pl.Series([], dtype=pl.String)
        prefix = pl.Series([], dtype=pl.UInt128)
    if spec.format is TableFormat.TEXT:  # in memory: the keys are the items
        return MatchingRows(table, items=distinct_in_key_order(keys))
    normalizing = (spec.key_columns, spec.normalization)
    limit = table.budget.limit_bytes // HELD_BUDGET_SHARE
    rows = None
    if _estimated_bytes(table, len(positions)) <= limit:
        rows = _read_rows(table, positions, None, limit)
    if rows is not None:  # every column, read once and held: they fit a budget's share
        held = rows

        def keys_at(at: npt.NDArray[np.int64]) -> pl.Series:
            return normalized_keys(held[at], *normalizing)
    else:  # too many to hold: read again when written, and their keys only where tied

        def keys_at(at: npt.NDArray[np.int64]) -> pl.Series:
            ascending = np.sort(at)
            found = rows_at(table, positions[ascending], only=spec.key_columns)
            return normalized_keys(found, *normalizing).gather(np.searchsorted(ascending, at))

    # By the keys' prefixes, found when they were hashed; ties by their whole keys, then
    # by input order, so the output is deterministic (and the same with or without
    # spilling).
    order = order_by_prefix(prefix, keys_at)
    return MatchingRows(table, rows=rows, positions=positions, order=order)


def _estimated_bytes(table: Table, count: int) -> int:
    """What ``count`` of the input's rows would hold, at the bytes per row of its head."""
    if not count:
        return 0
    table.check_unchanged()
    with parse_errors(table.spec):
        sample = table.scan().head(_SAMPLE_ROWS).collect()
    return held_bytes(sample) * count // max(1, len(sample))


def matching_rows(
    table: Table,
    seeds: tuple[int, int],
    result_hi: U64Array,
    result_lo: U64Array,
) -> pl.DataFrame:
    """The table's rows whose key is in the result, ordered by key (stable within a key),
    all at once. For text input: the distinct matching items (their normalised form),
    sorted bytewise."""
    return find_matching_rows(table, seeds, result_hi, result_lo).frame()


def _matching_items(
    table: Table, seeds: tuple[int, int], result_hi: U64Array, result_lo: U64Array
) -> MatchingRows:
    """A text file's distinct matching items: read again and held, when they fit a share
    of the budget; else handed out a range of keys at a time (:class:`ItemRanges`)."""
    if len(result_hi):
        table.hash(seeds)
        wanted = table.matching_first_rows(result_hi, result_lo)
    else:
        wanted = np.zeros(table.rows_read, dtype=np.bool_)
    count = int(np.count_nonzero(wanted))
    if item_bytes(table, count) > table.budget.limit_bytes // HELD_ITEMS_SHARE:
        return MatchingRows(table, ranges=ItemRanges(table, wanted))
    found = list(matching_items(table, wanted))
    del wanted
    # One chunk: gathering them in key order from a chunk per block is ten times slower.
    keys = pl.concat(found, rechunk=True) if found else pl.Series(TEXT_COLUMN, [], dtype=pl.String)
    del found
    return MatchingRows(table, items=distinct_in_key_order(keys))


def rows_at(
    table: Table, positions: npt.NDArray[np.uint64], *, only: Sequence[str] | None = None
) -> pl.DataFrame:
    """The input's rows at these ascending positions, read again with one scan: every
    column, or ``only`` these."""
    rows = _read_rows(table, positions, only, None)
    assert rows is not None
    return rows


def _read_rows(
    table: Table,
    positions: npt.NDArray[np.uint64],
    only: Sequence[str] | None,
    limit_bytes: int | None,
) -> pl.DataFrame | None:
    """:func:`rows_at`, or None as soon as the rows would hold over ``limit_bytes``."""
    if not len(positions):
        with parse_errors(table.spec):
            scan = table.scan()
            return (scan if only is None else scan.select(only)).head(0).collect()
    held = 0
    parts: list[list[pl.Series]] = []
    for batch in batches_at(table, positions, only):
        # Each batch copied: a filter's views would keep every row's text alive.
        kept = compact_strings(batch)
        held += held_bytes(kept)
        if limit_bytes is not None and held > limit_bytes:
            return None
        parts.append(kept.get_columns())
    # One contiguous chunk per column (gathering in key order from many chunks costs
    # far more than this copy), a column at a time: the peak is the rows and a column.
    columns: list[pl.Series] = []
    for at in range(len(parts[0])):
        columns.append(pl.concat([part[at] for part in parts], rechunk=True))
        for part in parts:
            part[at] = columns[-1].clear()
    return pl.DataFrame(columns)
