"""Small helpers shared by the contract modules; deliberately free of heavy imports."""

from __future__ import annotations

import json
import re

from teepsi.jsontext import MAX_INT_DIGITS, one_line, show, strict_json_loads

__all__ = [
    "IDENTIFIER_PATTERN",
    "MAX_COUNT",
    "MAX_INT_DIGITS",
    "canonical_json",
    "is_identifier",
    "is_int",
    "one_line",
    "show",
    "strict_json_loads",
]

#: Job ids and party names: 1-128 letters, digits, '.', '_', '@' or '-', not starting
#: with a sign (so a name never reads as a command-line option). Same rule as the server's
#: ``check_identifier``; use ``fullmatch``.
IDENTIFIER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")

#: Upper bound of every count in specs and receipts: fits a signed 64-bit integer, so
#: other languages can read the documents without big-number support.
MAX_COUNT = 2**63 - 1


def is_identifier(value: object) -> bool:
    return isinstance(value, str) and IDENTIFIER_PATTERN.fullmatch(value) is not None


def is_int(value: object) -> bool:
    """A JSON/TOML integer; ``bool`` is an ``int`` subclass in Python and must not pass."""
    return isinstance(value, int) and not isinstance(value, bool)


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, ASCII only: one byte string per value."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
