"""The set intersection at the heart of PSI."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def intersect(sets: Sequence[set[bytes]]) -> list[bytes]:
    """Items present in every set, sorted bytewise. Sets are already de-duplicated."""
    if not sets:
        return []
    ordered = sorted(sets, key=len)
    common = set(ordered[0])
    for other in ordered[1:]:
        common.intersection_update(other)
        if not common:
            break
    return sorted(common)


def result_digest(items: Sequence[bytes]) -> bytes:
    """SHA-256 over the newline-terminated, sorted result: what every party can compare."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item + b"\n")
    return digest.digest()
