"""Key records: the keyed digests that travel instead of the keys, and the normalised keys
they are digests of.

Every party turns each row's key into a 128-bit record: two XXH3-64 digests of the
normalised key under two per-job seeds chosen by the server. The server intersects
records, never keys. XXH3 is not a cryptographic hash, and that is fine here: a party
that crafts a colliding key gains nothing it could not get by including the key itself,
and for honest data two distinct keys collide with probability about n^2 / 2^129.
The digests are XXH3 as specified (checked against the reference implementation in the
tests), so parties on different builds agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import polars as pl
import polars_hash as plh

from teepsi.contract.normalization import TRIM_CHARS, Normalization

#: Names the record scheme; parties of one job must agree on it.
KEY_SCHEME = "xxh3-64x2-v1"
RECORD_BYTES = 16
RECORD_DTYPE = np.dtype("<u8")

U64Array = npt.NDArray[np.uint64]


def key_scheme_id(normalization: Normalization, arity: int) -> str:
    """What parties of one job must share: record scheme, normalisation, key arity."""
    return f"{KEY_SCHEME};normalize={normalization.canonical()};columns={arity}"


def normalized_expr(normalization: Normalization, expr: pl.Expr) -> pl.Expr:
    """``expr`` (a string column) canonicalised as ``normalization`` says."""
    if normalization.nfc:
        expr = expr.str.normalize("NFC")
    if normalization.casefold:
        expr = expr.str.to_lowercase()
    if normalization.trim:
        expr = expr.str.strip_chars(TRIM_CHARS)
    return expr


def normalized_keys(
    frame: pl.DataFrame, columns: Sequence[str], normalization: Normalization
) -> pl.Series:
    """Each row's normalised key, as one string; null when any key part is missing or
    the key is empty (an empty key never matches).

    Composite keys are length-prefixed ("3:abc5:hello") so that ("ab", "c") and
    ("a", "bc") stay distinct.
    """
    parts = [normalized_expr(normalization, pl.col(c).cast(pl.String)) for c in columns]
    if len(parts) == 1:
        key = parts[0]
    else:
        pieces: list[pl.Expr] = []
        for part in parts:
            pieces += [part.str.len_bytes().cast(pl.String), pl.lit(":"), part]
        key = pl.concat_str(pieces)
    # Two steps: one expression would compute the normalised key twice.
    keys = frame.select(key.alias("key"))
    return keys.select(pl.when(pl.col("key").str.len_bytes() > 0).then(pl.col("key")))["key"]


def stripped_item_keys(items: pl.Series, normalization: Normalization) -> pl.Series:
    """Normalised keys of text items, which are stripped and non-empty already: what
    :func:`normalized_keys` gives them, without its passes that change nothing here.

    The trim finds nothing to strip and no key is empty: NFC and lower-casing never turn
    a character into ASCII whitespace nor remove one (checked over every code point in
    the tests). Without NFC or case folding the items are the keys.
    """
    if not (normalization.nfc or normalization.casefold):
        return items.alias("key")
    expr = normalized_expr(replace(normalization, trim=False), pl.col("key"))
    return items.to_frame("key").select(expr)["key"]


def hash_keys(keys: pl.Series, seeds: tuple[int, int]) -> tuple[U64Array, U64Array]:
    """(hi, lo) digests of non-null keys, in row order."""
    frame = keys.to_frame("k").select(
        hi=plh.col("k").nchash.xxh3_64(seed=seeds[0]),
        lo=plh.col("k").nchash.xxh3_64(seed=seeds[1]),
    )
    hi = frame["hi"].to_numpy().astype(RECORD_DTYPE, copy=False)
    lo = frame["lo"].to_numpy().astype(RECORD_DTYPE, copy=False)
    return hi, lo


def records_to_bytes(hi: U64Array, lo: U64Array) -> bytes:
    """Interleave (hi, lo) as 16-byte little-endian records."""
    out = np.empty((len(hi), 2), dtype=RECORD_DTYPE)
    out[:, 0] = hi
    out[:, 1] = lo
    return out.tobytes()


def records_from_bytes(payload: bytes) -> tuple[U64Array, U64Array]:
    """Split 16-byte records into (hi, lo) arrays (copies, so the payload can go)."""
    if len(payload) % RECORD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes is not a whole number of records")
    pairs = np.frombuffer(payload, dtype=RECORD_DTYPE).reshape(-1, 2)
    return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


def seeds_from_bytes(material: bytes) -> tuple[int, int]:
    if len(material) != 16:
        raise ValueError("key seed material must be 16 bytes")
    return int.from_bytes(material[:8], "little"), int.from_bytes(material[8:], "little")
