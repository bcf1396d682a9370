"""The audit log's chain: what one entry is, and how each hashes the one before it.

Each line is one canonical JSON object (sorted keys, no whitespace, ASCII)::

    {"event":"joined","hash":"<hex>","job_id":"q4","party":"bank-a","prev":"<hex>","seq":2,
     "time":1767222000.125}

``seq`` counts from 1 and equals the line number; ``prev`` is the previous line's
``hash`` (:data:`GENESIS_HASH` on line 1); ``hash`` is SHA-256 over the 32 bytes of
``prev`` followed by the canonical JSON of the entry without ``hash``. Event fields are
scalars only (text, integers, booleans, null), so nobody logs a set or a key by accident.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from teepsi.contract._common import MAX_COUNT, canonical_json, is_int, show
from teepsi.contract.identifiers import AUDIT_FIELD_PATTERN
from teepsi.errors import TeepsiError

__all__ = [
    "CERTIFICATE_EVENT",
    "GENESIS_HASH",
    "HEAD_EVENT",
    "HEX64",
    "MAX_TEXT_CHARS",
    "RESERVED_FIELDS",
    "AuditError",
    "AuditHead",
    "FieldValue",
    "check_field",
    "entry_hash",
]

#: ``prev`` of the first entry.
GENESIS_HASH = "0" * 64

#: The fields of every entry, written by the log itself.
RESERVED_FIELDS = frozenset({"seq", "time", "event", "prev", "hash"})
HEX64 = re.compile(r"[0-9a-f]{64}")

#: The entry recording the certificate whose key signs the heads after it (once per start).
CERTIFICATE_EVENT = "server_certificate"
#: The entry carrying the server's signature over the head of the line before it.
HEAD_EVENT = "signed_head"
# Field text is for ids, names, reasons and hex digests; a long value is more likely an
# item list logged by mistake than a legitimate field.
MAX_TEXT_CHARS = 1024

FieldValue = str | int | bool | None


class AuditError(TeepsiError, ValueError):
    """The log is broken, altered or unreadable; the message is one line."""


@dataclass(frozen=True)
class AuditHead:
    """A position in the chain: the first ``entries`` lines, ending in ``hash``."""

    entries: int
    hash: str

    def __post_init__(self) -> None:
        if not is_int(self.entries) or not 0 <= self.entries <= MAX_COUNT:
            raise ValueError(f"entries: expected a count, got {show(self.entries)}")
        if not isinstance(self.hash, str) or not HEX64.fullmatch(self.hash):
            raise ValueError(f"hash: expected 64 lower-case hex characters, got {show(self.hash)}")

    def to_dict(self) -> dict[str, object]:
        return {"entries": self.entries, "hash": self.hash}

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> AuditHead:
        entries, digest = raw["entries"], raw["hash"]
        if not is_int(entries) or not isinstance(digest, str):
            raise ValueError("entries must be an integer and hash text")
        assert isinstance(entries, int)
        return cls(entries=entries, hash=digest)


def entry_hash(prev: str, body: dict[str, object]) -> str:
    """The ``hash`` of an entry: SHA-256 of ``prev``'s 32 bytes, then the body's JSON."""
    return hashlib.sha256(bytes.fromhex(prev) + canonical_json(body)).hexdigest()


def check_field(name: str, value: object) -> None:
    if not AUDIT_FIELD_PATTERN.fullmatch(name) or name in RESERVED_FIELDS:
        raise ValueError(f"audit field name {name!r} is invalid or reserved")
    # bool before int: both are fine, but floats, bytes, lists and dicts are not
    if value is None or isinstance(value, bool) or is_int(value):
        return
    if isinstance(value, str):
        if len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"audit field {name}: text over {MAX_TEXT_CHARS} characters")
        return
    raise TypeError(
        f"audit field {name}: {type(value).__name__} is not allowed; use text, an integer, "
        "a bool or None (hex for digests, counts for sets)"
    )
