"""A text party's matching items when they do not fit its budget: in key order, a range
of keys at a time, from two scans of the input.

The first scan samples the matching items' key prefixes and splits them into ranges of
about a budget's share each. The second sends each matching item to its range (held in
memory up to a share of the budget, sealed to the encrypted spill area beyond it). Each
range is then put in order alone and handed out, so memory is bounded by a range, not by
the number of matching items. Splitters come from the matching items themselves, not
from the whole input: which items match is the other parties' choice, and a sample of
every item would let them crowd one range.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import polars as pl

from teepsi.engine.input_file import changed_error
from teepsi.engine.key_order import compact_strings, distinct_key_order, held_bytes, key_prefixes
from teepsi.engine.reading import text_items
from teepsi.engine.records import stripped_item_keys
from teepsi.engine.row_pieces import HeldPieces
from teepsi.engine.table_spec import TEXT_COLUMN

if TYPE_CHECKING:
    from teepsi.engine.tables import Table

#: A range of items, put in order at once, holds about this share of the budget (the
#: ordering takes a few times that on top).
RANGE_BUDGET_SHARE = 8
#: Sampled key prefixes per range: the ranges come out within a few percent of even.
_SAMPLES_PER_RANGE = 64


def matching_items(table: Table, wanted: npt.NDArray[np.bool_]) -> Iterator[pl.Series]:
    """Text input: the items of the rows ``wanted`` (one flag a row), normalised, read
    again a block at a time and copied compactly. Fails with one line if the input is not
    the one that was read."""
    table.check_unchanged()
    position = 0
    for items in text_items(table.spec, table.budget.limit_bytes, table.input_path):
        if position + len(items) > len(wanted):
            raise changed_error(table.spec.path)
        matched = items.filter(pl.Series(wanted[position : position + len(items)]))
        position += len(items)
        # A copy of the matching items only: the filter's views keep the whole block.
        keys = stripped_item_keys(
            compact_strings(matched.to_frame()).to_series(), table.spec.normalization
        )
        yield keys.alias(TEXT_COLUMN)
    if position != len(wanted):
        raise changed_error(table.spec.path)


def item_bytes(table: Table, count: int) -> int:
    """What ``count`` of the input's items would hold in memory: the file's bytes per
    line, and polars' 16-byte view of each."""
    size = table.input.size if table.input is not None else 0
    return count * (size // max(1, table.rows_read) + 16)


def distinct_in_key_order(keys: pl.Series) -> pl.DataFrame:
    """Text output: the distinct keys, sorted bytewise, as column "item".

    Not copied compactly (:func:`compact_strings`): writing the lines reads them in order
    once anyway, and a compact copy first cost more than it saved the writing (1.4 s for
    0.6 s at 5M e-mails). The keys are the matching items only, so nothing else is kept.
    """
    return keys.gather(distinct_key_order(keys)).alias(TEXT_COLUMN).to_frame()


class ItemRanges:
    """The distinct matching items of a text input, in key order, a range at a time."""

    def __init__(self, table: Table, wanted: npt.NDArray[np.bool_]) -> None:
        self._table = table
        #: One flag a row read: the first row of a key in the result.
        self._wanted = wanted
        self._count = int(np.count_nonzero(wanted))

    def __len__(self) -> int:
        return self._count

    def pieces(self) -> Iterator[pl.DataFrame]:
        """The items as column "item", a range at a time, in key order (at least one
        piece)."""
        share = max(1, self._table.budget.limit_bytes // RANGE_BUDGET_SHARE)
        ranges = max(1, -(-item_bytes(self._table, self._count) // share))
        splitters = self._splitters(ranges)
        store = HeldPieces(len(splitters) + 1, self._table)
        try:
            for keys in matching_items(self._table, self._wanted):
                if not len(keys):
                    continue
                # Equal prefixes fall in one range: a key's whole bytes decide within it.
                at = splitters.search_sorted(key_prefixes(keys), side="right").to_numpy()
                frame = keys.to_frame()
                size = held_bytes(frame)
                if at.min() == at.max():
                    store.add(int(at[0]), frame, size)
                    continue
                order = np.argsort(at, kind="stable")
                bounds = np.searchsorted(at[order], np.arange(len(splitters) + 2))
                for piece in range(len(splitters) + 1):
                    rows = order[bounds[piece] : bounds[piece + 1]]
                    if len(rows):
                        part = compact_strings(frame[rows])
                        store.add(piece, part, size * len(rows) // len(keys))
            for piece in range(len(splitters) + 1):
                parts = store.take(piece)
                if not parts and piece:
                    continue
                keys = (
                    pl.concat([part[TEXT_COLUMN] for part in parts], rechunk=True)
                    if parts
                    else pl.Series(TEXT_COLUMN, [], dtype=pl.String)
                )
                yield distinct_in_key_order(keys)
        finally:
            store.close()

    def _splitters(self, ranges: int) -> pl.Series:
        """Key prefixes that cut the matching items into about ``ranges`` even ranges,
        from an even sample of them (a scan of the input)."""
        if ranges < 2:
            return pl.Series("p", [], dtype=pl.UInt128)
        stride = max(1, self._count // (ranges * _SAMPLES_PER_RANGE))
        sample: list[pl.Series] = []
        seen = 0
        for keys in matching_items(self._table, self._wanted):
            # Every stride-th matching item, counted across blocks.
            first = (-seen) % stride
            sample.append(key_prefixes(keys.gather(np.arange(first, len(keys), stride))))
            seen += len(keys)
        prefixes = pl.concat(sample).sort() if sample else pl.Series("p", [], dtype=pl.UInt128)
        step = max(1, len(prefixes) // ranges)
        return prefixes.gather(np.arange(step, len(prefixes), step)).unique(maintain_order=True)
