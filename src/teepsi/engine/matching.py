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
from teepsi.engine.key_order import compact_strings, distinct_key_order, key_order
from teepsi.engine.reading import parse_errors, text_items
from teepsi.engine.records import U64Array, normalized_keys, stripped_item_keys
from teepsi.engine.table_spec import TEXT_COLUMN, TableError, TableFormat
from teepsi.engine.tables import Table

#: A piece written at a time holds at most this share of the table's memory budget
#: (polars' estimate; the process holds about 2.5 times that while reading a piece).
PIECE_BUDGET_SHARE = 16
#: Rows sampled from the input's head to estimate its bytes per row.
_SAMPLE_ROWS = 1024


class MatchingRows:
    """A data provider's matching rows, ordered by key (stable within a key).

    Text: the distinct matching items, held (they are the keys). CSV and Parquet: the
    matching rows' positions in key order, the rows themselves read again from the input
    when asked for, a piece of at most a budget's share at a time (:meth:`pieces`), so
    writing them never holds every column of every row.
    """

    def __init__(
        self,
        table: Table,
        *,
        items: pl.DataFrame | None = None,
        positions: npt.NDArray[np.uint64] | None = None,
        order: npt.NDArray[np.int64] | None = None,
    ) -> None:
        self._table = table
        self._items = items
        #: Ascending row positions, and the permutation of them that is key order.
        self._positions = positions if positions is not None else np.empty(0, np.uint64)
        self._order = order if order is not None else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else len(self._positions)

    def frame(self) -> pl.DataFrame:
        """Every matching row at once (the Python API; small results)."""
        if self._items is not None:
            return self._items
        rows = rows_at(self._table, self._positions)
        columns = rows.get_columns()
        del rows  # the columns list is now all that holds them
        return _gather_compact(columns, self._order)

    def piece_rows(self) -> int:
        """Rows per piece: a budget's share, at the bytes per row of the input's head."""
        head = np.arange(min(_SAMPLE_ROWS, len(self._positions)), dtype=np.uint64)
        sample = rows_at(self._table, head)
        row_bytes = max(1, int(sample.estimated_size()) // max(1, len(sample)))
        return max(1, self._table.budget.limit_bytes // PIECE_BUDGET_SHARE // row_bytes)

    def pieces(self, piece_rows: int | None = None) -> Iterator[pl.DataFrame]:
        """The rows in key order, in consecutive pieces of at most ``piece_rows`` rows
        (default :meth:`piece_rows`); at least one piece, empty for no rows."""
        if self._items is not None:
            yield self._items
            return
        if not len(self._positions):
            yield rows_at(self._table, self._positions)
            return
        size = piece_rows if piece_rows is not None else self.piece_rows()
        for start in range(0, len(self._order), size):
            # The piece's rows come back in position order; ``rank`` puts them in key order.
            wanted = self._order[start : start + size]
            ascending = np.sort(wanted)
            rows = rows_at(self._table, self._positions[ascending])
            rank = np.searchsorted(ascending, wanted)
            yield compact_strings(rows.select(pl.all().gather(rank)))
            del rows


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
    if len(result_hi):
        table.hash(seeds)
        positions, keys = table.matching_positions(result_hi, result_lo)
    else:
        positions, keys = np.empty(0, np.uint64), pl.Series([], dtype=pl.String)
    if spec.format is TableFormat.TEXT:
        if not table.in_memory:
            keys = stripped_item_keys(items_at(table, positions), spec.normalization)
        del positions  # the items are all that is needed now (40 MB at 5M)
        return MatchingRows(table, items=_distinct_in_key_order(keys))
    # The order comes from the key columns alone. Ties keep input order, so the output
    # is deterministic (and the same with or without spilling).
    key_rows = rows_at(table, positions, only=spec.key_columns)
    keys = normalized_keys(key_rows, spec.key_columns, spec.normalization)
    del key_rows  # the normalised keys are a copy: the peak is one copy, not two
    return MatchingRows(table, positions=positions, order=key_order(keys))


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


def _distinct_in_key_order(keys: pl.Series) -> pl.DataFrame:
    """Text output: the distinct keys, sorted bytewise, as column "item".

    Not copied compactly (:func:`compact_strings`): writing the lines reads them in order
    once anyway, and a compact copy first cost more than it saved the writing (1.4 s for
    0.6 s at 5M e-mails). The keys are the matching items only, so nothing else is kept.
    """
    return keys.gather(distinct_key_order(keys)).alias(TEXT_COLUMN).to_frame()


def items_at(table: Table, positions: npt.NDArray[np.uint64]) -> pl.Series:
    """Text input: the items at these ascending positions, read again."""
    table.check_unchanged()
    wanted = np.zeros(table.rows_read, dtype=np.bool_)
    wanted[positions] = True
    found: list[pl.Series] = []
    position = 0
    for items in text_items(table.spec, table.budget.limit_bytes):
        if position + len(items) > table.rows_read:
            raise TableError(f"{table.spec.path}: changed while this run read it; run again")
        matched = items.filter(pl.Series(wanted[position : position + len(items)]))
        # A copy of the matching items only: the filter's views keep the whole block.
        found.append(compact_strings(matched.to_frame()).to_series())
        position += len(items)
    if position != table.rows_read:
        raise TableError(f"{table.spec.path}: changed while this run read it; run again")
    # One chunk: gathering them in key order from a chunk per block is ten times slower.
    return pl.concat(found, rechunk=True) if found else pl.Series(TEXT_COLUMN, [], dtype=pl.String)


def rows_at(
    table: Table, positions: npt.NDArray[np.uint64], *, only: Sequence[str] | None = None
) -> pl.DataFrame:
    """The input's rows at these ascending positions, read again with one scan: every
    column, or ``only`` these."""
    spec = table.spec
    table.check_unchanged()
    with parse_errors(spec):
        scan = table.scan()
        if only is not None:
            scan = scan.select(only)
        if not len(positions):
            return scan.head(0).collect()
        index = "__teepsi_row"
        while index in scan.collect_schema().names():
            index += "_"
        wanted = pl.Series(positions).cast(pl.get_index_type()).implode()
        batches = (
            scan.with_row_index(index)
            .filter(pl.col(index).is_in(wanted))
            # A quarter of a read batch: the scan parses every row, and the batches it
            # holds in flight, not the rows kept, set the peak (about 0.5 GB at 1M rows).
            .collect_batches(chunk_size=table.rows_per_batch // 4)
        )
        # Each batch copied: a filter's views would keep every row's text alive.
        parts = [compact_strings(batch).get_columns() for batch in batches]
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


def _gather_compact(columns: list[pl.Series], order: npt.NDArray[np.int64]) -> pl.DataFrame:
    """The columns gathered in ``order``, one at a time, each released from ``columns``
    once gathered: the peak is the input and one column, not two whole tables."""
    gathered: list[pl.Series] = []
    while columns:
        column = columns.pop(0)
        gathered.append(compact_strings(column.gather(order).to_frame()).to_series())
        del column
    return pl.DataFrame(gathered)
