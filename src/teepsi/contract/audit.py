"""The audit log: an append-only, hash-chained, signed JSON-lines file of job events.

Each line is one canonical JSON object (sorted keys, no whitespace, ASCII)::

    {"event":"joined","hash":"<hex>","job_id":"q4","party":"bank-a","prev":"<hex>","seq":2,
     "time":1767222000.125}

``seq`` counts from 1 and equals the line number; ``prev`` is the previous line's
``hash`` (64 zeros on line 1); ``hash`` is SHA-256 over the 32 bytes of ``prev``
followed by the canonical JSON of the entry without ``hash``. Event fields are scalars
only (text, integers, booleans, null), so nobody logs a set or a key by accident.
The log is public (the host can read it): it holds nothing a job's receipt does not give
every party of that job, and its digests are the receipt's salted ones.

:func:`verify_audit_log` detects, naming the line: an edited line (its hash no longer
matches, or it is no longer canonical), a deleted, inserted or moved line (``seq`` out of
order, ``prev`` not the previous hash), and anything that is not a well-formed entry.

A hash chain alone cannot stop whoever can write the file from rewriting it and
recomputing every hash, or from cutting lines off the end. So the enclave signs the chain
head with its attested RA-TLS key (:class:`HeadSigner`): each server start records its
certificate once (a ``server_certificate`` entry), and ``signed_head`` entries, written at
every release and within ``sign_interval_seconds`` of any other entry, carry a signature
over (entries, hash) of the line before them. A rewrite of anything a signed head covers
breaks that signature. Lines after the newest signed head are covered only by a head
recorded elsewhere: a receipt's ``audit_head`` (``expect_entry``), or ``expect_head``.

One :class:`AuditLog` per file: appends from threads are serialised, but two writers
(two processes, or two objects on one path) would fork the chain. A crash in the middle
of a write leaves a broken last line, and the log then refuses to open until an operator
looks at it: failing closed is the point of an audit log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.contract._common import MAX_COUNT, canonical_json, is_int, show, strict_json_loads
from teepsi.contract.signing import (
    MAX_SIGNATURE_BYTES,
    SignatureError,
    certificate_public_key,
    sign_document,
    verify_document,
)
from teepsi.privatefile import open_private_append

__all__ = [
    "CERTIFICATE_EVENT",
    "GENESIS_HASH",
    "HEAD_DOMAIN",
    "HEAD_EVENT",
    "AuditError",
    "AuditHead",
    "AuditLog",
    "AuditSummary",
    "HeadSigner",
    "SigningCertificate",
    "head_payload",
    "verify_audit_log",
]

log = logging.getLogger(__name__)

#: ``prev`` of the first entry.
GENESIS_HASH = "0" * 64

_EVENT_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_FIELD_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_RESERVED = frozenset({"seq", "time", "event", "prev", "hash"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2})+")

#: The entry recording the certificate whose key signs the heads after it (once per start).
CERTIFICATE_EVENT = "server_certificate"
#: The entry carrying the server's signature over the head of the line before it.
HEAD_EVENT = "signed_head"
#: Prefix of the signed bytes: a head signature never passes for a receipt's, or the reverse.
HEAD_DOMAIN = b"teepsi-audit-head-v1\n"
# Exactly these fields (besides the chain's own), so a verifier can parse them strictly.
_CERTIFICATE_FIELDS = frozenset(
    {"certificate", "certificate_sha256", "collateral", "unsigned_before"}
)
_HEAD_FIELDS = frozenset({"certificate_sha256", "signature"})
#: Base64 of a certificate DER (a DCAP quote with its PCK chain fits easily).
_MAX_CERTIFICATE_CHARS = 48 * 1024
#: The signer's collateral (dcap-qvl JSON): Intel's is about 15-20 KB.
_MAX_COLLATERAL_CHARS = 64 * 1024
# Field text is for ids, names, reasons and hex digests; a long value is more likely an
# item list logged by mistake than a legitimate field.
MAX_TEXT_CHARS = 1024
_MAX_LINE_BYTES = 128 * 1024

FieldValue = str | int | bool | None


class AuditError(ValueError):
    """The log is broken, altered or unreadable; the message is one line."""


@dataclass(frozen=True)
class AuditHead:
    """A position in the chain: the first ``entries`` lines, ending in ``hash``."""

    entries: int
    hash: str

    def __post_init__(self) -> None:
        if not is_int(self.entries) or not 0 <= self.entries <= MAX_COUNT:
            raise ValueError(f"entries: expected a count, got {show(self.entries)}")
        if not isinstance(self.hash, str) or not _HEX64.fullmatch(self.hash):
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


def head_payload(head: AuditHead, certificate_sha256: bytes) -> bytes:
    """The bytes a signed head signs: domain label, then canonical JSON of the head."""
    return HEAD_DOMAIN + canonical_json(
        {"certificate_sha256": certificate_sha256.hex(), **head.to_dict()}
    )


class HeadSigner:
    """The enclave's attested key and its certificate: signs chain heads.

    ``collateral_json`` is the collateral for the certificate's quote as the server had it
    at start: recorded beside the certificate, so a verifier can check the quote offline
    through the one verification path, as of the time the certificate was recorded.
    """

    def __init__(
        self,
        certificate_der: bytes,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        collateral_json: str = "",
    ) -> None:
        self.certificate_der = bytes(certificate_der)
        self.collateral_json = collateral_json
        self.certificate_sha256, public_key = certificate_public_key(self.certificate_der)
        if public_key.public_numbers() != private_key.public_key().public_numbers():
            raise SignatureError("the signing key is not the certificate's key")
        self._private_key = private_key

    def sign(self, head: AuditHead) -> bytes:
        return sign_document(
            self._private_key, head_payload(head, self.certificate_sha256), what="audit heads"
        )


@dataclass(frozen=True)
class SigningCertificate:
    """A certificate recorded in the log whose key signed heads, with what verifies it."""

    der: bytes
    #: Collateral for its quote as the server had it (empty: the server had none).
    collateral_json: str
    #: When it was recorded (UNIX seconds): the time to judge its evidence at.
    recorded_at: int


@dataclass(frozen=True)
class AuditSummary:
    entries: int
    head: str  # hash of the last entry, GENESIS_HASH for an empty log
    #: Lines up to and including the newest signed head (0: nothing in the log is signed).
    signed_entries: int = 0
    #: Every certificate whose key signed a head in the log, in order of first use.
    signers: tuple[SigningCertificate, ...] = ()
    #: Lines that servers, on starting, found covered by no signed head (``unsigned_before``
    #: summed): a later head covers them, but vouches only that they chained.
    found_unsigned: int = 0

    @property
    def unsigned_tail(self) -> int:
        """Lines after the newest signed head: only a head held elsewhere covers them."""
        return self.entries - self.signed_entries


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
    """Appends hash-chained entries to a JSON-lines file; thread-safe.

    With a ``signer`` (the server's attested key) the log records the signer's certificate
    when opened, signs the head on :meth:`sign_head`, within ``sign_interval_seconds`` of
    any entry, and on :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        signer: HeadSigner | None = None,
        sign_interval_seconds: float = 60.0,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._signer = signer
        self._sign_interval = sign_interval_seconds
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        created = not self._path.exists()
        if created:
            summary = AuditSummary(entries=0, head=GENESIS_HASH)
        else:
            # Continuing a chain we have not checked would vouch for whatever is there.
            summary = verify_audit_log(self._path)
        self._seq = summary.entries
        self._head = summary.head
        self._signed_head = summary.head if summary.unsigned_tail == 0 else ""
        try:
            # Created 0600: the log is public by design, but who may read it is the
            # operator's choice, not the umask's.
            self._file = open_private_append(self._path)
        except OSError as exc:
            raise AuditError(f"{path}: cannot open for append: {exc.strerror or exc}") from None
        if created:
            self._sync_directory()
        if signer is not None:
            # Once per start: the certificate whose key signs the heads from here on, and
            # how much of the chain this enclave found without a signature covering it.
            with self._lock:
                self._write_locked(
                    CERTIFICATE_EVENT,
                    {
                        "certificate": base64.b64encode(signer.certificate_der).decode("ascii"),
                        "certificate_sha256": signer.certificate_sha256.hex(),
                        "collateral": signer.collateral_json,
                        "unsigned_before": summary.unsigned_tail,
                    },
                )
                self._sign_locked()

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

    def position(self) -> AuditHead:
        """Entries and head hash, read together (what a receipt carries)."""
        with self._lock:
            return AuditHead(entries=self._seq, hash=self._head)

    @property
    def path(self) -> Path:
        return self._path

    def append(self, event: str, **fields: FieldValue) -> str:
        """Write one entry, flushed and fsynced before returning; returns its hash."""
        if not isinstance(event, str) or not _EVENT_PATTERN.fullmatch(event):
            raise ValueError(f"audit event name {show(event)} is invalid")
        if event in (CERTIFICATE_EVENT, HEAD_EVENT):
            raise ValueError(f"audit event {event} is written by the log itself")
        for name, value in fields.items():
            _check_field(name, value)
        with self._lock:
            digest = self._write_locked(event, dict(fields))
            if self._signer is not None and self._timer is None:
                # Nothing stays unsigned for long, even with no release to sign it.
                self._timer = threading.Timer(self._sign_interval, self._sign_on_timer)
                self._timer.daemon = True
                self._timer.start()
            return digest

    def _write_locked(self, event: str, fields: dict[str, object]) -> str:
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

    def sign_head(self) -> None:
        """Append a signed head covering every line so far (no-op without a signer)."""
        with self._lock:
            self._sign_locked()

    def _sign_locked(self) -> None:
        if self._signer is None or self._file.closed or self._signed_head == self._head:
            return
        head = AuditHead(entries=self._seq, hash=self._head)
        signature = self._signer.sign(head)
        self._write_locked(
            HEAD_EVENT,
            {
                "certificate_sha256": self._signer.certificate_sha256.hex(),
                "signature": signature.hex(),
            },
        )
        # The signed_head line itself needs no signature: it adds no event.
        self._signed_head = self._head

    def _sign_on_timer(self) -> None:
        with self._lock:
            self._timer = None
            try:
                self._sign_locked()
            except (AuditError, SignatureError) as exc:
                log.error("audit log: cannot sign the head: %s", exc)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._file.closed:
                try:
                    self._sign_locked()
                finally:
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


def verify_audit_log(
    path: str | Path,
    *,
    expect_head: str | None = None,
    expect_entry: AuditHead | None = None,
) -> AuditSummary:
    """Check every line, the chain and every signed head; raise AuditError naming the line.

    ``expect_head``: the hash of the last line (nothing was cut off). ``expect_entry``: a
    head recorded elsewhere (a receipt's): the log reaches it and its line has that hash,
    so nothing up to it was rewritten or cut.
    """
    where = str(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise AuditError(f"{where}: cannot read: {exc.strerror or exc}") from None
    seq = 0
    head = GENESIS_HASH
    chain = _SignedChain(where)
    with handle:
        for number, line in enumerate(handle, start=1):
            head = _check_line(line, number, head, where, chain)
            seq = number
            if expect_entry is not None and number == expect_entry.entries:
                _check_expected_entry(expect_entry, head, where)
    if expect_entry is not None and seq < expect_entry.entries:
        raise AuditError(
            f"{where}: the log ends at line {seq}, before the expected head at line "
            f"{expect_entry.entries} (lines removed from the end, or another log)"
        )
    if expect_entry is not None and expect_entry.entries == 0:
        _check_expected_entry(expect_entry, GENESIS_HASH, where)
    if expect_head is not None and expect_head != head:
        raise AuditError(
            f"{where}: head after line {seq} is {head[:16]}..., expected {expect_head[:16]}... "
            "(lines removed from the end, or another log)"
        )
    return AuditSummary(
        entries=seq,
        head=head,
        signed_entries=chain.signed_entries,
        signers=tuple(chain.signers),
        found_unsigned=chain.found_unsigned,
    )


def _check_expected_entry(expected: AuditHead, found: str, where: str) -> None:
    if found != expected.hash:
        raise AuditError(
            f"{where}: line {expected.entries} has hash {found[:16]}..., expected "
            f"{expected.hash[:16]}... (lines up to it were rewritten, or another log)"
        )


class _SignedChain:
    """Certificates recorded so far and the newest signed head, while verifying."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.keys: dict[str, tuple[int, SigningCertificate, ec.EllipticCurvePublicKey]] = {}
        self.signers: list[SigningCertificate] = []
        self.signed_entries = 0
        self.found_unsigned = 0

    def check(self, entry: dict[str, object], number: int, fail: Callable[[str], NoReturn]) -> None:
        event = entry["event"]
        if event == CERTIFICATE_EVENT:
            self._certificate(entry, number, fail)
        elif event == HEAD_EVENT:
            self._head(entry, number, fail)

    def _certificate(
        self, entry: dict[str, object], number: int, fail: Callable[[str], NoReturn]
    ) -> None:
        _exact_fields(entry, _CERTIFICATE_FIELDS, fail)
        text, named, before = (
            entry["certificate"],
            entry["certificate_sha256"],
            entry["unsigned_before"],
        )
        if not isinstance(text, str) or len(text) > _MAX_CERTIFICATE_CHARS:
            fail("certificate is not base64 text of a certificate")
        try:
            der = base64.b64decode(text, validate=True)
            digest, key = certificate_public_key(der)
        except (binascii.Error, ValueError) as exc:
            fail(f"certificate cannot be read: {exc}")
        if named != digest.hex():
            fail("certificate_sha256 is not the certificate's SHA-256")
        if not (is_int(before) and isinstance(before, int) and 0 <= before < number):
            fail("unsigned_before is not a count of earlier lines")
        collateral, recorded = entry["collateral"], entry["time"]
        if not isinstance(collateral, str) or len(collateral) > _MAX_COLLATERAL_CHARS:
            fail("collateral is not the text of the certificate's collateral")
        if collateral:
            try:
                document = strict_json_loads(collateral, ValueError)
            except ValueError:
                document = None
            if not isinstance(document, dict):
                fail("collateral is not a JSON object (dcap-qvl collateral) or empty")
        if not isinstance(recorded, int | float) or not 0 <= recorded < 2**63:
            fail("time is not a UNIX time")
        signing = SigningCertificate(
            der=der, collateral_json=collateral, recorded_at=int(recorded)
        )
        self.keys.setdefault(digest.hex(), (number, signing, key))
        self.found_unsigned += before

    def _head(self, entry: dict[str, object], number: int, fail: Callable[[str], NoReturn]) -> None:
        _exact_fields(entry, _HEAD_FIELDS, fail)
        named, signature = entry["certificate_sha256"], entry["signature"]
        if not isinstance(named, str) or (recorded := self.keys.get(named)) is None:
            fail("signed head names a certificate not recorded before it (forged)")
        if (
            not isinstance(signature, str)
            or not _HEX.fullmatch(signature)
            or len(signature) > 2 * MAX_SIGNATURE_BYTES
        ):
            fail("signature is not lower-case hex")
        at, signing, key = recorded
        prev = entry["prev"]
        assert isinstance(prev, str)
        head = AuditHead(entries=number - 1, hash=prev)
        try:
            verify_document(
                key,
                bytes.fromhex(signature),
                head_payload(head, bytes.fromhex(named)),
                what="signature",
            )
        except SignatureError as exc:
            fail(
                f"signed head: {exc} recorded at line {at} (lines before it were rewritten, "
                "or the head was forged)"
            )
        if signing not in self.signers:
            self.signers.append(signing)
        # The head line adds no event, and its signature is its own authentication.
        self.signed_entries = number


def _exact_fields(
    entry: dict[str, object], wanted: frozenset[str], fail: Callable[[str], NoReturn]
) -> None:
    extra = sorted(set(entry) - wanted - _RESERVED)
    missing = sorted(wanted - set(entry))
    if missing:
        fail(f"{entry['event']} entry lacks {', '.join(missing)}")
    if extra:
        fail(f"{entry['event']} entry has an unknown field {extra[0]}")


def _check_line(line: bytes, number: int, prev: str, where: str, chain: _SignedChain) -> str:
    """Check line ``number`` against the previous hash; return its own hash."""

    def fail(problem: str) -> NoReturn:
        raise AuditError(f"{where}: line {number}: {problem}")

    if not line.endswith(b"\n"):
        fail("incomplete line (no newline at the end: an interrupted write, or a cut)")
    if len(line) > _MAX_LINE_BYTES:
        fail("line too long")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        fail("not a JSON entry (not ASCII)")
    # The one strict JSON reader: no duplicate keys, no NaN, no integer too long for int()
    # (finding F10: json.loads raised a bare ValueError for one of over 4,300 digits).
    entry = strict_json_loads(
        text, lambda problem: AuditError(f"{where}: line {number}: not a JSON entry ({problem})")
    )
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
    event = entry["event"]
    if not isinstance(event, str) or not _EVENT_PATTERN.fullmatch(event):
        fail("event is not an event name")
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
        elif key not in _RESERVED and not _FIELD_PATTERN.fullmatch(key):
            fail(f"field name {show(key[:64])} is not one a writer can write")
    chain.check(entry, number, fail)
    return claimed
