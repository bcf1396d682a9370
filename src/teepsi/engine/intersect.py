"""Intersecting parties' key records: sort-based, vectorised, exact on 128 bits."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import polars as pl

from teepsi.engine.keys import RECORD_DTYPE, U64Array, records_to_bytes

_TWO_64 = 2**64


def as_u128(hi: U64Array, lo: U64Array) -> pl.Series:
    frame = pl.DataFrame({"hi": hi, "lo": lo}, schema={"hi": pl.UInt64, "lo": pl.UInt64})
    return frame.select(k=pl.col("hi").cast(pl.UInt128) * _TWO_64 + pl.col("lo").cast(pl.UInt128))[
        "k"
    ]


def sorted_unique(hi: U64Array, lo: U64Array) -> pl.Series:
    """A party's records as sorted, de-duplicated 128-bit values."""
    keys = as_u128(hi, lo).sort()
    if len(keys) < 2:
        return keys
    return keys.filter((keys != keys.shift(1)).fill_null(True))


def split_u128(keys: pl.Series) -> tuple[U64Array, U64Array]:
    frame = keys.to_frame("k").select(
        hi=(pl.col("k") // _TWO_64).cast(pl.UInt64), lo=(pl.col("k") % _TWO_64).cast(pl.UInt64)
    )
    return (
        frame["hi"].to_numpy().astype(RECORD_DTYPE, copy=False),
        frame["lo"].to_numpy().astype(RECORD_DTYPE, copy=False),
    )


def intersect_records(
    parties: Sequence[tuple[U64Array, U64Array]],
    set_digests: Sequence[hashlib._Hash] | None = None,
) -> tuple[U64Array, U64Array, list[int]]:
    """Records present in every party's set, sorted ascending as 128-bit numbers.

    Returns (hi, lo, distinct record count of each party). With ``set_digests``, each
    party's de-duplicated sorted records are also fed to its hash (the canonical set
    digest a receipt carries). Each party's records are de-duplicated first, so after
    concatenating and sorting, a value is in every set
    exactly when it occurs ``len(parties)`` times in a row.
    """
    uniques = [sorted_unique(hi, lo) for hi, lo in parties]
    distinct = [len(u) for u in uniques]
    if set_digests is not None:
        for unique, digest in zip(uniques, set_digests, strict=True):
            if len(unique):
                digest.update(records_to_bytes(*split_u128(unique)))
    empty = (np.empty(0, RECORD_DTYPE), np.empty(0, RECORD_DTYPE))
    if not uniques or min(distinct) == 0:
        return (*empty, distinct)
    if len(uniques) == 1:
        return (*split_u128(uniques[0]), distinct)
    merged = pl.concat(uniques).sort()
    span = len(uniques) - 1
    common = merged.filter((merged == merged.shift(-span)).fill_null(False))
    if len(common) == 0:
        return (*empty, distinct)
    return (*split_u128(common), distinct)


#: Records hashed per step: bounds the memory a digest of a large result needs.
_DIGEST_STEP = 1 << 20


def _feed(digest: hashlib._Hash, hi: U64Array, lo: U64Array) -> bytes:
    for start in range(0, len(hi), _DIGEST_STEP):
        end = start + _DIGEST_STEP
        digest.update(records_to_bytes(hi[start:end], lo[start:end]))
    return digest.digest()


def records_digest(hi: U64Array, lo: U64Array) -> bytes:
    """SHA-256 over the records' canonical bytes (sorted, 16-byte little-endian)."""
    return _feed(hashlib.sha256(), hi, lo)


def salted_records_digest(salt: bytes, hi: U64Array, lo: U64Array) -> bytes:
    """SHA-256 over salt then the records: a digest only holders of the salt can check."""
    return _feed(hashlib.sha256(salt), hi, lo)
