"""Putting keys in bytewise order, fast; and copying gathered strings compactly."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import polars as pl

#: Polars stores strings up to this many bytes inline; longer ones point into a buffer.
_INLINE_STRING_BYTES = 12


def compact_strings(frame: pl.DataFrame) -> pl.DataFrame:
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


#: Bytes of a string cell's view (polars keeps its first 12 bytes there, or a pointer).
_STRING_VIEW_BYTES = 16


def held_bytes(frame: pl.DataFrame) -> int:
    """What ``frame`` holds in memory: polars' estimate counts a string column's text,
    not the 16-byte view of each cell (most of a column of short strings)."""
    strings = sum(1 for dtype in frame.schema.values() if dtype in (pl.String, pl.Binary))
    return int(frame.estimated_size()) + strings * _STRING_VIEW_BYTES * len(frame)


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
    return order_by_prefix(key_prefixes(keys), keys.gather)


def key_prefixes(keys: pl.Series) -> pl.Series:
    """Each key's first 16 UTF-8 bytes, zero-padded, as a big-endian 128-bit number."""
    # Padding to 16 characters gives at least 16 bytes (a character is one byte or more);
    # only shorter keys are padded (a copy of each key otherwise: a third of the time).
    key = pl.col("k")
    padded = key.str.pad_end(16, "\x00").cast(pl.Binary).bin.head(16)
    head = pl.when(key.str.len_bytes() >= 16).then(key.cast(pl.Binary).bin.head(16))
    return (
        keys.to_frame("k")
        .select(b=head.otherwise(padded))
        .select(p=_prefix_word(0) * (1 << 64) + _prefix_word(8))["p"]
    )


def order_by_prefix(
    prefix: pl.Series, keys_at: Callable[[npt.NDArray[np.int64]], pl.Series]
) -> npt.NDArray[np.int64]:
    """The stable bytewise order of keys whose :func:`key_prefixes` are ``prefix``;
    ``keys_at`` gives the whole keys at some positions (only those whose prefix is shared)."""
    count = len(prefix)
    if count < 2:
        return np.arange(count, dtype=np.int64)
    order = prefix.arg_sort().to_numpy().astype(np.int64)
    ranked = prefix.gather(order)
    del prefix  # the caller's last reference, when it passed a fresh series: one copy held
    # A key is tied if its sorted neighbour on either side has its prefix.
    same_as_previous = (ranked == ranked.shift(1)).fill_null(False)
    tied = same_as_previous | same_as_previous.shift(-1).fill_null(False)
    del same_as_previous
    if tied.any():
        at = np.flatnonzero(tied.to_numpy())
        rows = order[at]
        # Runs of one prefix are contiguous, and stay so sorted by (prefix, key, position).
        ties = pl.DataFrame({"p": ranked.gather(at), "k": keys_at(rows), "i": rows})
        order[at] = ties.sort(["p", "k", "i"])["i"].to_numpy()
    return order
