"""Byte sizes as users write them ("256MiB", "1GiB", "512M", "1000000")."""

from __future__ import annotations

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


def parse_size(text: str) -> int:
    """Bytes from a size with an optional unit; ``ValueError`` (one line) if it is not one."""
    stripped = text.strip()
    number = stripped.rstrip("BbIiKkMmGg")
    unit = stripped[len(number) :].lower()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size like 256MiB or 1GiB") from None
    if unit not in _UNITS or not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a size like 256MiB or 1GiB")
    return int(value * _UNITS[unit])
