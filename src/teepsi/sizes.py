"""Byte sizes as users write them ("256MiB", "1GiB", "512M", "1000000")."""

from __future__ import annotations

from teepsi.errors import TeepsiError

__all__ = ["SizeError", "parse_size"]

_UNITS = {
    "": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


class SizeError(TeepsiError, ValueError):
    """Text that is not a byte size; the message is one line quoting it."""


def parse_size(text: str) -> int:
    """Bytes from a size with an optional unit; ``SizeError`` (one line) if it is not one."""
    stripped = text.strip()
    number = stripped.rstrip("BbIiKkMmGg")
    unit = stripped[len(number) :].lower()
    try:
        value = float(number)
    except ValueError:
        raise SizeError(f"{text!r} is not a size like 256MiB or 1GiB") from None
    if unit not in _UNITS or not value > 0 or value == float("inf"):
        raise SizeError(f"{text!r} is not a size like 256MiB or 1GiB")
    return int(value * _UNITS[unit])
