"""Keys: normalisation, and the keyed digests that travel instead of the keys.

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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl
import polars_hash as plh

#: Names the record scheme; parties of one job must agree on it.
KEY_SCHEME = "xxh3-64x2-v1"
RECORD_BYTES = 16
RECORD_DTYPE = np.dtype("<u8")

U64Array = npt.NDArray[np.uint64]

#: Characters the ``trim`` option strips from both ends (ASCII whitespace).
TRIM_CHARS = " \t\r\n\x0b\x0c"

_OPTIONS = ("trim", "casefold", "nfc")


class NormalizationError(ValueError):
    """An unknown normalisation option."""


@dataclass(frozen=True)
class Normalization:
    """How a key is canonicalised before hashing; every party of a job must agree.

    * ``trim``: strip ASCII whitespace at both ends;
    * ``casefold``: Unicode lower-casing (polars' ``to_lowercase``, the mapping of Python's
      ``str.lower()``), not ``str.casefold()``: "ß" stays "ß", so "Straße" != "STRASSE";
    * ``nfc``: Unicode normalisation form C, so composed and decomposed accents match.
    """

    trim: bool = True
    casefold: bool = False
    nfc: bool = False

    @classmethod
    def parse(cls, spec: str) -> Normalization:
        """From "trim,casefold,nfc" (any subset, or "none")."""
        words = {w.strip() for w in spec.split(",") if w.strip()}
        if words == {"none"}:
            return cls(trim=False)
        unknown = words - set(_OPTIONS)
        if unknown:
            raise NormalizationError(
                f"unknown normalisation {', '.join(sorted(unknown))!s}: "
                f"use a comma-separated subset of {', '.join(_OPTIONS)}, or none"
            )
        return cls(trim="trim" in words, casefold="casefold" in words, nfc="nfc" in words)

    def canonical_text(self) -> str:
        """Canonical text form, also what the job compares."""
        on = [name for name in _OPTIONS if getattr(self, name)]
        return ",".join(on) if on else "none"

    def apply(self, expr: pl.Expr) -> pl.Expr:
        if self.nfc:
            expr = expr.str.normalize("NFC")
        if self.casefold:
            expr = expr.str.to_lowercase()
        if self.trim:
            expr = expr.str.strip_chars(TRIM_CHARS)
        return expr


def key_scheme_id(normalization: Normalization, arity: int) -> str:
    """What parties of one job must share: record scheme, normalisation, key arity."""
    return f"{KEY_SCHEME};normalize={normalization.canonical_text()};columns={arity}"


def normalized_keys(
    frame: pl.DataFrame, columns: Sequence[str], normalization: Normalization
) -> pl.Series:
    """Each row's normalised key, as one string; null when any key part is missing or
    the key is empty (an empty key never matches).

    Composite keys are length-prefixed ("3:abc5:hello") so that ("ab", "c") and
    ("a", "bc") stay distinct.
    """
    parts = [normalization.apply(pl.col(c).cast(pl.String)) for c in columns]
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
