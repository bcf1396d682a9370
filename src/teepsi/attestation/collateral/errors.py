"""The errors of collateral handling, and the one-line form their messages take."""

from __future__ import annotations

from teepsi.errors import TeepsiError


class CollateralError(TeepsiError):
    """Collateral could not be fetched, read or accepted; the message is one line."""


class CollateralRollbackError(CollateralError):
    """Collateral is older than collateral already seen: a possible rollback."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())
