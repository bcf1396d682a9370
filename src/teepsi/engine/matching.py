"""A data provider's matching rows: the rows of its table whose key is in the result,
read again from its file, ordered by key.

CSV and Parquet: the party's own rows whose key is in the intersection, every column
kept, ordered by key (semi-join semantics: a key repeated in the table matches once but
returns all its rows). Text: the distinct matching items, normalised, sorted bytewise.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import polars as pl

from teepsi.engine.intersect import sorted_unique_records
from teepsi.engine.key_order import compact_strings, key_order
from teepsi.engine.reading import parse_errors, text_items
from teepsi.engine.records import U64Array, normalized_keys
from teepsi.engine.table_spec import TEXT_COLUMN, TableError, TableFormat
from teepsi.engine.tables import Table


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
        positions, keys = table.matching_positions(result_hi, result_lo)
    else:
        positions, keys = np.empty(0, np.uint64), pl.Series([], dtype=pl.String)
    if spec.format is TableFormat.TEXT:
        if not table.in_memory:
            items = items_at(table, positions).to_frame()
            keys = normalized_keys(items, [TEXT_COLUMN], spec.normalization)
            del items
        return _distinct_in_key_order(keys)
    rows = rows_at(table, positions)
    keys = normalized_keys(rows, spec.key_columns, spec.normalization)
    # Ties keep input order, so the output is deterministic (and the same with or
    # without spilling).
    order = key_order(keys)
    del keys
    columns = rows.get_columns()
    del rows  # the columns list is now all that holds them
    return _gather_compact(columns, order)


def _distinct_in_key_order(keys: pl.Series) -> pl.DataFrame:
    """Text output: the distinct keys, sorted bytewise, as column "item". Each step's input
    is dropped once the next holds a compact copy: one copy of the items at a time, not
    one per step (5M matching e-mails are about 200 MB each)."""
    order = key_order(keys)
    ordered = compact_strings(keys.gather(order).alias(TEXT_COLUMN).to_frame())
    del keys, order
    # Sorted, so repeats are neighbours: cheaper than hashing every string to drop them.
    first = (ordered[TEXT_COLUMN] != ordered[TEXT_COLUMN].shift(1)).fill_null(True)
    if bool(first.all()):
        return ordered
    return compact_strings(ordered.filter(first))


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
    return pl.concat(found) if found else pl.Series(TEXT_COLUMN, [], dtype=pl.String)


def rows_at(table: Table, positions: npt.NDArray[np.uint64]) -> pl.DataFrame:
    """The input's rows at these ascending positions, every column, read again."""
    spec = table.spec
    table.check_unchanged()
    with parse_errors(spec):
        scan = table.scan()
        if not len(positions):
            return scan.head(0).collect()
        index = "__teepsi_row"
        while index in scan.collect_schema().names():
            index += "_"
        wanted = pl.Series(positions).cast(pl.get_index_type()).implode()
        batches = (
            scan.with_row_index(index)
            .filter(pl.col(index).is_in(wanted))
            .collect_batches(chunk_size=table.rows_per_batch)
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
