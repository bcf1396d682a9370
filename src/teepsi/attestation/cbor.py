"""The one CBOR reader: cbor2 behind typed wrappers, and strict head and byte-string reads.

cbor2 may come without type information, so its results pass through :func:`dumps` and
:func:`loads` (annotated assignments accept Any either way). :func:`read_head` refuses
indefinite lengths, as Gramine's verifier does.
"""

from __future__ import annotations

import cbor2

from teepsi.errors import TeepsiError

CBORTag = cbor2.CBORTag


class CborError(TeepsiError, ValueError):
    """The bytes are not the CBOR expected; the message is one line."""


def dumps(value: object) -> bytes:
    encoded: bytes = cbor2.dumps(value)
    return encoded


def loads(data: bytes, what: str) -> object:
    try:
        decoded: object = cbor2.loads(data)
        return decoded
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CborError(f"{what} is not valid CBOR ({exc})") from None


def read_head(data: bytes, pos: int, what: str) -> tuple[int, int, int]:
    """Read one CBOR item head: (major type, argument, position after the head).

    Indefinite lengths are refused, as Gramine's verifier refuses them.
    """
    if pos >= len(data):
        raise CborError(f"{what} is truncated")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, pos
    if info > 27:
        raise CborError(f"{what} uses an indefinite-length or reserved CBOR encoding")
    size = 1 << (info - 24)
    if pos + size > len(data):
        raise CborError(f"{what} is truncated")
    return major, int.from_bytes(data[pos : pos + size], "big"), pos + size


def read_bstr(data: bytes, pos: int, what: str) -> tuple[bytes, int]:
    major, length, pos = read_head(data, pos, what)
    if major != 2:
        raise CborError(f"{what} is not a CBOR byte string")
    if pos + length > len(data):
        raise CborError(f"{what} is truncated")
    return data[pos : pos + length], pos + length
