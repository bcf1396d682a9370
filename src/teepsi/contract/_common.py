"""Small helpers shared by the contract modules; deliberately free of heavy imports."""

from __future__ import annotations

import json
from typing import TypeGuard

from teepsi.jsontext import MAX_INT_DIGITS, one_line, show, strict_json_loads

__all__ = [
    "MAX_COUNT",
    "MAX_INT_DIGITS",
    "canonical_json",
    "is_int",
    "one_line",
    "show",
    "strict_json_loads",
]

#: Upper bound of every count in specs and receipts: fits a signed 64-bit integer, so
#: other languages can read the documents without big-number support.
MAX_COUNT = 2**63 - 1


def is_int(value: object) -> TypeGuard[int]:
    """A JSON/TOML integer; ``bool`` is an ``int`` subclass in Python and must not pass."""
    return isinstance(value, int) and not isinstance(value, bool)


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, ASCII only: one byte string per value."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
