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


#: Keys turned into prefix numbers per step (bounds the padded copies held at once).
_PREFIX_STEP = 1 << 20


def _number_order(numbers: pl.Series) -> npt.NDArray[np.int64]:
    """A permutation that sorts ``numbers`` (ties in any order), a value range at a time.

    Polars' argsort of 128-bit numbers holds about 60 bytes per number while it runs
    (0.3 GB for 5M keys, the matching's peak). Split by splitters sampled from the
    numbers into ranges of about ``_PREFIX_STEP`` each (equal numbers share one), then
    each range sorted alone, it holds that for a range only.
    """
    count = len(numbers)
    ranges = -(-count // _PREFIX_STEP)
    if ranges < 2:
        return numbers.arg_sort().to_numpy().astype(np.int64)
    sample = numbers.gather(np.linspace(0, count - 1, 64 * ranges).astype(np.int64)).sort()
    splitters = sample.gather(np.arange(1, ranges) * 64).unique(maintain_order=True)
    range_of = splitters.search_sorted(numbers, side="right").to_numpy().astype(np.uint16)
    by_range = np.argsort(range_of, kind="stable")  # a radix sort for 16-bit values
    ends = np.cumsum(np.bincount(range_of, minlength=len(splitters) + 1))
    del range_of
    order = np.empty(count, dtype=np.int64)
    start = 0
    for end in ends.tolist():
        rows = by_range[start:end]
        order[start:end] = rows[numbers.gather(rows).arg_sort().to_numpy()]
        start = end
    return order


def _same_as_next(numbers: pl.Series) -> npt.NDArray[np.bool_]:
    """For each number but the last: is the next one equal? (Two views, no shifted copy.)"""
    same: npt.NDArray[np.bool_] = (
        numbers.slice(0, len(numbers) - 1) == numbers.slice(1)
    ).to_numpy()
    return same


def key_order(keys: pl.Series) -> npt.NDArray[np.int64]:
    """The permutation that sorts ``keys`` (no nulls) bytewise, stable.

    Each key's first 16 UTF-8 bytes, zero-padded, become one 128-bit number, and those
    are sorted: an integer sort, several times cheaper than polars' string sort. Only keys
    whose number another key shares (a common 16-byte prefix, or a shorter key padded
    with zeros) are then put in order by their whole bytes and position, with polars.
    """
    return order_by_prefix(key_prefixes(keys), keys.gather)


def distinct_key_order(keys: pl.Series) -> npt.NDArray[np.int64]:
    """The first position of each distinct key (no nulls), in the keys' bytewise order:
    :func:`key_order` without the repeats. Only keys that share a 128-bit prefix number
    can be equal, so only those are compared whole."""
    return order_by_prefix(key_prefixes(keys), keys.gather, distinct=True)


def key_prefixes(keys: pl.Series) -> pl.Series:
    """Each key's first 16 UTF-8 bytes, zero-padded, as a big-endian 128-bit number (one
    chunk: polars sorts one a third faster than many)."""
    # A slice at a time: the padded copies of every key at once would be the peak.
    return pl.concat(
        [_prefixes(keys.slice(at, _PREFIX_STEP)) for at in range(0, len(keys), _PREFIX_STEP)]
        or [pl.Series("p", [], dtype=pl.UInt128)],
        rechunk=True,
    )


def _prefixes(keys: pl.Series) -> pl.Series:
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
    prefix: pl.Series,
    keys_at: Callable[[npt.NDArray[np.int64]], pl.Series],
    *,
    distinct: bool = False,
) -> npt.NDArray[np.int64]:
    """The stable bytewise order of keys whose :func:`key_prefixes` are ``prefix``;
    ``keys_at`` gives the whole keys at some positions (only those whose prefix another
    key shares are asked for). With ``distinct``, a repeated key's first position only."""
    count = len(prefix)
    if count < 2:
        return np.arange(count, dtype=np.int64)
    order = _number_order(prefix)
    # Neighbours in order compared a step at a time (the steps overlap by one key): the
    # numbers in order, all at once, would be another copy of them at the peak.
    same = np.concatenate(
        [
            _same_as_next(prefix.gather(order[at : at + _PREFIX_STEP + 1]))
            for at in range(0, count - 1, _PREFIX_STEP)
        ]
    )
    if not same.any():
        return order
    tied = np.zeros(count, dtype=np.bool_)
    tied[1:] |= same
    tied[:-1] |= same
    at = np.flatnonzero(tied)
    rows = order[at]
    # Runs of one prefix are contiguous, and stay so sorted by (prefix, key, position).
    ties = pl.DataFrame({"p": prefix.gather(rows), "k": keys_at(rows), "i": rows}).sort(
        ["p", "k", "i"]
    )
    order[at] = ties["i"].to_numpy()
    if distinct:
        # Equal keys have equal prefixes: within the ties, a repeat follows its first.
        repeat = (ties["k"] == ties["k"].shift(1)).fill_null(False).to_numpy()
        if repeat.any():
            order = np.delete(order, at[repeat])
    return order
