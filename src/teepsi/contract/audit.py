"""The audit log: an append-only, hash-chained JSON-lines file of job events.

Each line is one canonical JSON object (sorted keys, no whitespace, ASCII)::

    {"event":"joined","hash":"<hex>","job_id":"q4","party":"bank-a","prev":"<hex>","seq":2,
     "time":1767222000.125}

``seq`` counts from 1 and equals the line number; ``prev`` is the previous line's
``hash`` (64 zeros on line 1); ``hash`` is SHA-256 over the 32 bytes of ``prev``
followed by the canonical JSON of the entry without ``hash``. Event fields are scalars
only (text, integers, booleans, null), so nobody logs a set or a key by accident:
counts and hex digests, never items.

:func:`verify_audit_log` detects, naming the line: an edited line (its hash no longer
matches, or it is no longer canonical), a deleted, inserted or moved line (``seq`` out of
order, ``prev`` not the previous hash), and anything that is not a well-formed entry.
What a hash chain cannot detect on its own is lines cut from the *end*, or the whole
file rewritten by someone who recomputes every hash: compare the head with one recorded
elsewhere (``expect_head``) to catch those.

One :class:`AuditLog` per file: appends from threads are serialised, but two writers
(two processes, or two objects on one path) would fork the chain. A crash in the middle
of a write leaves a broken last line, and the log then refuses to open until an operator
looks at it: failing closed is the point of an audit log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from teepsi.contract._common import canonical_json, is_int, show
from teepsi.privatefile import open_private_append

__all__ = ["GENESIS_HASH", "AuditError", "AuditLog", "AuditSummary", "verify_audit_log"]

#: ``prev`` of the first entry.
GENESIS_HASH = "0" * 64

_EVENT_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_FIELD_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_RESERVED = frozenset({"seq", "time", "event", "prev", "hash"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Field text is for ids, names, reasons and hex digests; a long value is more likely an
# item list logged by mistake than a legitimate field.
MAX_TEXT_CHARS = 1024
_MAX_LINE_BYTES = 64 * 1024

FieldValue = str | int | bool | None


class AuditError(ValueError):
    """The log is broken, altered or unreadable; the message is one line."""


@dataclass(frozen=True)
class AuditSummary:
    entries: int
    head: str  # hash of the last entry, GENESIS_HASH for an empty log


def _entry_hash(prev: str, body: dict[str, object]) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + canonical_json(body)).hexdigest()


def _check_field(name: str, value: object) -> None:
    if not _FIELD_PATTERN.fullmatch(name) or name in _RESERVED:
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


class AuditLog:
    """Appends hash-chained entries to a JSON-lines file; thread-safe."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        created = not self._path.exists()
        if created:
            summary = AuditSummary(entries=0, head=GENESIS_HASH)
        else:
            # Continuing a chain we have not checked would vouch for whatever is there.
            summary = verify_audit_log(self._path)
        self._seq = summary.entries
        self._head = summary.head
        try:
            # Created 0600: the log is public by design, but who may read it is the
            # operator's choice, not the umask's.
            self._file = open_private_append(self._path)
        except OSError as exc:
            raise AuditError(f"{path}: cannot open for append: {exc.strerror or exc}") from None
        if created:
            self._sync_directory()

    def _sync_directory(self) -> None:
        # A new file's directory entry must survive a crash as well as its lines.
        try:
            fd = os.open(self._path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems cannot sync directories; the lines are synced anyway
        finally:
            os.close(fd)

    @property
    def head(self) -> str:
        """Hash of the last entry (GENESIS_HASH when empty)."""
        with self._lock:
            return self._head

    @property
    def entries(self) -> int:
        with self._lock:
            return self._seq

    @property
    def path(self) -> Path:
        return self._path

    def append(self, event: str, **fields: FieldValue) -> str:
        """Write one entry, flushed and fsynced before returning; returns its hash."""
        if not isinstance(event, str) or not _EVENT_PATTERN.fullmatch(event):
            raise ValueError(f"audit event name {show(event)} is invalid")
        for name, value in fields.items():
            _check_field(name, value)
        with self._lock:
            if self._file.closed:
                raise AuditError(f"{self._path}: audit log is closed")
            body: dict[str, object] = dict(fields)
            # milliseconds are plenty, and keep lines short
            body.update(seq=self._seq + 1, time=round(self._clock(), 3), event=event)
            body["prev"] = self._head
            digest = _entry_hash(self._head, body)
            line = canonical_json({**body, "hash": digest}) + b"\n"
            try:
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                raise AuditError(f"{self._path}: cannot write: {exc.strerror or exc}") from None
            self._seq += 1
            self._head = digest
            return digest

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def verify_audit_log(path: str | Path, *, expect_head: str | None = None) -> AuditSummary:
    """Check every line and the chain; with ``expect_head``, also that nothing was cut off."""
    where = str(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise AuditError(f"{where}: cannot read: {exc.strerror or exc}") from None
    seq = 0
    head = GENESIS_HASH
    with handle:
        for number, line in enumerate(handle, start=1):
            head = _check_line(line, number, head, where)
            seq = number
    if expect_head is not None and expect_head != head:
        raise AuditError(
            f"{where}: head after line {seq} is {head[:16]}..., expected {expect_head[:16]}... "
            "(lines removed from the end, or another log)"
        )
    return AuditSummary(entries=seq, head=head)


def _check_line(line: bytes, number: int, prev: str, where: str) -> str:
    """Check line ``number`` against the previous hash; return its own hash."""

    def fail(problem: str) -> NoReturn:
        raise AuditError(f"{where}: line {number}: {problem}")

    if not line.endswith(b"\n"):
        fail("incomplete line (no newline at the end: an interrupted write, or a cut)")
    if len(line) > _MAX_LINE_BYTES:
        fail("line too long")
    try:
        entry = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        fail("not a JSON entry")
    if not isinstance(entry, dict):
        fail("not a JSON object")
    for key in ("seq", "time", "event", "prev", "hash"):
        if key not in entry:
            fail(f"missing {key}")
    # Exactly the bytes the writer would produce: catches edits that keep the hash
    # fields intact (re-spacing, duplicate keys, key order, escapes).
    try:
        canonical = canonical_json(entry) + b"\n"
    except ValueError:
        fail("not a JSON entry")
    if canonical != line:
        fail("not in canonical form (edited)")
    claimed = entry.pop("hash")
    if not isinstance(claimed, str) or not _HEX64.fullmatch(claimed):
        fail("hash is not 64 lower-case hex characters")
    entry_prev = entry["prev"]
    if not isinstance(entry_prev, str) or not _HEX64.fullmatch(entry_prev):
        fail("prev is not 64 lower-case hex characters")
    if _entry_hash(entry_prev, entry) != claimed:
        fail("hash does not match the entry (edited)")
    seq = entry["seq"]
    if not is_int(seq):
        fail("seq is not an integer")
    if seq != number:
        fail(f"seq is {seq}, expected {number} (a line was removed, inserted or moved)")
    if entry_prev != prev:
        what = "the previous line's hash" if number > 1 else "the genesis value"
        fail(f"prev is not {what} (a line was removed, inserted or moved)")
    for key, value in entry.items():
        if key == "time":
            if not isinstance(value, int | float) or isinstance(value, bool):
                fail("time is not a number")
        elif isinstance(value, dict | list):
            fail(f"field {key} is not a scalar")
    return claimed
