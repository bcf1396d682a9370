"""What a job gives its recipients: the intersection itself, or only its size.

One enum for the spec, receipts, the server and the client, so no module spells the
kinds as string literals of its own.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["OutputKind"]


class OutputKind(StrEnum):
    """A job's output; the values are how specs and receipts write it."""

    INTERSECTION = "intersection"
    COUNT = "count"
