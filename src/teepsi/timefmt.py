"""ISO 8601 UTC timestamps, written one way everywhere (receipts, policies, logs, errors)."""

from __future__ import annotations

import datetime as dt

#: The single layout teepsi writes: seconds precision, a literal Z, e.g. 2026-04-03T11:15:17Z.
ISO_UTC_LAYOUT = "%Y-%m-%dT%H:%M:%SZ"


def iso_utc(when: int | float | dt.datetime) -> str:
    """UNIX seconds (or an aware datetime) as ISO 8601 UTC, e.g. ``2026-04-03T11:15:17Z``."""
    if isinstance(when, dt.datetime):
        moment = when.astimezone(dt.UTC) if when.tzinfo else when.replace(tzinfo=dt.UTC)
    else:
        moment = dt.datetime.fromtimestamp(when, dt.UTC)
    return moment.strftime(ISO_UTC_LAYOUT)
