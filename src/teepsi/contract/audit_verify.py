"""Verifying an audit log: every line, the chain, and every signed head, naming the line.

:func:`verify_audit_log` detects an edited line (its hash no longer matches, or it is no
longer canonical), a deleted, inserted or moved line (``seq`` out of order, ``prev`` not
the previous hash), anything that is not a well-formed entry, and a signed head whose
signature does not verify under a certificate recorded before it. Lines after the newest
signed head are covered only by a head recorded elsewhere: a receipt's ``audit_head``
(``expect_entry``), or ``expect_head``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.contract._common import canonical_json, is_int, show, strict_json_loads
from teepsi.contract.audit_chain import (
    CERTIFICATE_EVENT,
    GENESIS_HASH,
    HEAD_EVENT,
    HEX64,
    RESERVED_FIELDS,
    AuditError,
    AuditHead,
    entry_hash,
)
from teepsi.contract.audit_head import head_payload
from teepsi.contract.identifiers import AUDIT_EVENT_PATTERN, AUDIT_FIELD_PATTERN
from teepsi.contract.signing import (
    MAX_SIGNATURE_BYTES,
    SignatureError,
    certificate_public_key,
    verify_document,
)

__all__ = ["AuditSummary", "SigningCertificate", "verify_audit_log"]

_HEX = re.compile(r"(?:[0-9a-f]{2})+")
# Exactly these fields (besides the chain's own), so a verifier can parse them strictly.
_CERTIFICATE_FIELDS = frozenset(
    {"certificate", "certificate_sha256", "collateral", "unsigned_before"}
)
_HEAD_FIELDS = frozenset({"certificate_sha256", "signature"})
#: Base64 of a certificate DER (a DCAP quote with its PCK chain fits easily).
_MAX_CERTIFICATE_CHARS = 48 * 1024
#: The signer's collateral (dcap-qvl JSON): Intel's is about 15-20 KB.
_MAX_COLLATERAL_CHARS = 64 * 1024
_MAX_LINE_BYTES = 128 * 1024


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
        signing = SigningCertificate(der=der, collateral_json=collateral, recorded_at=int(recorded))
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
    extra = sorted(set(entry) - wanted - RESERVED_FIELDS)
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
    if not isinstance(claimed, str) or not HEX64.fullmatch(claimed):
        fail("hash is not 64 lower-case hex characters")
    entry_prev = entry["prev"]
    if not isinstance(entry_prev, str) or not HEX64.fullmatch(entry_prev):
        fail("prev is not 64 lower-case hex characters")
    if entry_hash(entry_prev, entry) != claimed:
        fail("hash does not match the entry (edited)")
    event = entry["event"]
    if not isinstance(event, str) or not AUDIT_EVENT_PATTERN.fullmatch(event):
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
        elif key not in RESERVED_FIELDS and not AUDIT_FIELD_PATTERN.fullmatch(key):
            fail(f"field name {show(key[:64])} is not one a writer can write")
    chain.check(entry, number, fail)
    return claimed
