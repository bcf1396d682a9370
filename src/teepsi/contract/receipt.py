"""Signed receipts: what the server attests a job did, checkable by anyone later.

After a job releases (or holds back) its result, the server signs a receipt with its
RA-TLS key, the P-384 key its attestation binds, using ECDSA with SHA-384. Every party
gets the same receipt and checks its own entry; anyone holding the receipt and the
server's certificate can re-check the signature later. A receipt also carries
``audit_head``, the server's audit log at the release (entries and head hash), so the holder
can check that the log still holds, unchanged, everything up to it
(``teepsi audit verify LOG --receipt R``).

:func:`verify_receipt` proves only that the holder of the certificate's key signed the
receipt. That the key belongs to a genuine teepsi enclave is what the certificate's
attestation proves, and checking it is the caller's part, through the one verification
path (:class:`teepsi.attestation.peer.PeerVerifier`, as ``teepsi verify-receipt`` does):
without it, anyone could mint a certificate and sign a receipt.

Receipts have exactly one encoding. :meth:`SignedReceipt.to_json` writes canonical JSON
(sorted keys, no whitespace, lower-case hex) and :meth:`SignedReceipt.from_json` refuses
any other spelling, and signatures must be canonical DER with a low S (ECDSA signatures
are otherwise malleable: (r, n - s) verifies too). So changing any byte of a receipt
makes it fail to parse or to verify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.contract._common import MAX_COUNT, canonical_json, is_int, show, strict_json_loads
from teepsi.contract.audit_chain import AuditHead
from teepsi.contract.identifiers import is_identifier
from teepsi.contract.outputs import OutputKind
from teepsi.contract.signing import (
    MAX_SIGNATURE_BYTES,
    SignatureError,
    certificate_public_key,
    sign_document,
    verify_document,
)
from teepsi.errors import TeepsiError

__all__ = [
    "RECEIPT_DOMAIN",
    "PartyEntry",
    "Receipt",
    "ReceiptError",
    "SignedReceipt",
    "check_own_entry",
    "sign_receipt",
    "verify_receipt",
]

#: Prefix of the signed bytes, so a receipt signature can never pass for a signature
#: over anything else the server's key signs (TLS handshakes, future documents).
RECEIPT_DOMAIN = b"teepsi-receipt-v1\n"
#: The TEE whose attested key signs a receipt (the quote type of its certificate).
TEES = ("SGX", "TDX")
MAX_RECEIPT_BYTES = 1024 * 1024
_RECEIPT_KEYS = frozenset(
    {
        "spec_sha256",
        "job_id",
        "parties",
        "output",
        "released",
        "result_size",
        "result_sha256",
        "issued_at",
        "certificate_sha256",
        "audit_head",
        "tee",
    }
)
_ENTRY_KEYS = frozenset({"name", "items", "set_sha256"})


class ReceiptError(TeepsiError, ValueError):
    """A receipt is malformed, does not verify, or does not match; one line."""


def _fail(where: str, problem: str) -> NoReturn:
    raise ReceiptError(f"{where}: {problem}")


def _check_digest(value: object, where: str, *, optional: bool = False) -> None:
    if not isinstance(value, bytes):
        _fail(where, "must be bytes")
    if len(value) != 32 and not (optional and not value):
        _fail(where, "must be a SHA-256 digest (32 bytes)" + (" or empty" if optional else ""))


def _output_kind(value: object, where: str) -> OutputKind:
    if isinstance(value, str) and value in set(OutputKind):
        return OutputKind(value)
    kinds = " or ".join(f'"{kind.value}"' for kind in OutputKind)
    _fail(where, f"must be {kinds}, got {show(value)}")


def _check_count(value: object, where: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT):
        _fail(where, f"must be an integer from 0 to {MAX_COUNT}, got {show(value)}")


@dataclass(frozen=True)
class PartyEntry:
    name: str
    items: int  # records uploaded
    set_sha256: bytes  # SHA-256 of the party's de-duplicated canonical set

    def __post_init__(self) -> None:
        if not is_identifier(self.name):
            _fail("name", f"{show(self.name)} is not a valid party name")
        _check_count(self.items, f"{self.name}: items")
        _check_digest(self.set_sha256, f"{self.name}: set_sha256")

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "items": self.items, "set_sha256": self.set_sha256.hex()}


@dataclass(frozen=True)
class Receipt:
    spec_sha256: bytes  # empty for a quick job without spec
    job_id: str
    parties: tuple[PartyEntry, ...]
    output: OutputKind
    released: bool  # False when min_intersection was not met
    result_size: int | None
    result_sha256: bytes | None
    issued_at: int  # UNIX seconds
    certificate_sha256: bytes  # SHA-256 of the signing server's certificate DER
    #: The server's audit log at the release (its entries up to and including this job's
    #: release); None when the server keeps no audit log.
    audit_head: AuditHead | None = None
    #: Which TEE signed: an SGX enclave or a TDX VM (its certificate's quote says the same).
    tee: str = "SGX"

    def __post_init__(self) -> None:
        _check_digest(self.spec_sha256, "spec_sha256", optional=True)
        if not is_identifier(self.job_id):
            _fail("job_id", f"{show(self.job_id)} is not a valid job id")
        object.__setattr__(self, "parties", tuple(self.parties))
        if not self.parties:
            _fail("parties", "must list every party of the job")
        if not all(isinstance(p, PartyEntry) for p in self.parties):
            _fail("parties", "must be PartyEntry values")
        if len({p.name for p in self.parties}) != len(self.parties):
            _fail("parties", "names a party twice")
        object.__setattr__(self, "output", _output_kind(self.output, "output"))
        if not isinstance(self.released, bool):
            _fail("released", "must be a bool")
        if self.released:
            if self.result_size is None:
                _fail("result_size", "a released result has a size")
            _check_count(self.result_size, "result_size")
            if self.output is OutputKind.INTERSECTION:
                if self.result_sha256 is None:
                    _fail("result_sha256", "a released intersection has a digest")
                _check_digest(self.result_sha256, "result_sha256")
            elif self.result_sha256 is not None:
                # A count job reveals only the size; a digest of the items would let a
                # party confirm a guessed intersection.
                _fail("result_sha256", "a count job's receipt carries no result digest")
        elif self.result_size is not None or self.result_sha256 is not None:
            _fail("released", "a result held back has no size and no digest")
        _check_count(self.issued_at, "issued_at")
        _check_digest(self.certificate_sha256, "certificate_sha256")
        if self.audit_head is not None and not isinstance(self.audit_head, AuditHead):
            _fail("audit_head", "must be an AuditHead or None")
        if self.tee not in TEES:
            _fail("tee", f'must be "SGX" or "TDX", got {show(self.tee)}')

    def entry(self, name: str) -> PartyEntry | None:
        return next((p for p in self.parties if p.name == name), None)

    def to_dict(self) -> dict[str, object]:
        return {
            "spec_sha256": self.spec_sha256.hex(),
            "job_id": self.job_id,
            "parties": [p.to_dict() for p in self.parties],
            "output": self.output.value,
            "released": self.released,
            "result_size": self.result_size,
            "result_sha256": None if self.result_sha256 is None else self.result_sha256.hex(),
            "issued_at": self.issued_at,
            "certificate_sha256": self.certificate_sha256.hex(),
            "audit_head": None if self.audit_head is None else self.audit_head.to_dict(),
            "tee": self.tee,
        }

    def signed_payload(self) -> bytes:
        """The bytes the server signs: domain label, then the canonical JSON of the fields."""
        return RECEIPT_DOMAIN + canonical_json(self.to_dict())


@dataclass(frozen=True)
class SignedReceipt:
    receipt: Receipt
    signature: bytes  # ECDSA-SHA384, DER, low S

    def __post_init__(self) -> None:
        if not isinstance(self.receipt, Receipt):
            _fail("receipt", "must be a Receipt")
        if not isinstance(self.signature, bytes) or not 0 < len(self.signature) <= (
            MAX_SIGNATURE_BYTES
        ):
            _fail("signature", f"must be 1 to {MAX_SIGNATURE_BYTES} bytes")

    def to_json(self) -> str:
        """The canonical, self-contained document ``{"receipt": {...}, "signature": hex}``."""
        document = {"receipt": self.receipt.to_dict(), "signature": self.signature.hex()}
        return canonical_json(document).decode("ascii")

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedReceipt:
        """Strict inverse of :meth:`to_json` (one trailing newline is tolerated)."""
        if isinstance(text, bytes | bytearray):
            if len(text) > MAX_RECEIPT_BYTES:
                raise ReceiptError(f"receipt: larger than {MAX_RECEIPT_BYTES} bytes")
            try:
                text = bytes(text).decode("ascii")  # canonical JSON is ASCII
            except UnicodeDecodeError as exc:
                raise ReceiptError(f"receipt: not ASCII JSON (byte {exc.start})") from None
        if len(text) > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"receipt: larger than {MAX_RECEIPT_BYTES} bytes")
        body = text.removesuffix("\n")  # files written with a final newline still load
        raw = strict_json_loads(body, lambda problem: ReceiptError(f"receipt: {problem}"))
        signed = _signed_from_dict(raw)
        if signed.to_json() != body:
            raise ReceiptError("receipt: not in canonical form (altered or re-formatted)")
        return signed


def _hex(value: object, where: str, *, optional_empty: bool = False) -> bytes:
    # lower-case only: one spelling per value (canonical form is checked afterwards too)
    if (
        isinstance(value, str)
        and len(value) % 2 == 0
        and all(c in "0123456789abcdef" for c in value)
    ):
        data = bytes.fromhex(value)
        if len(data) == 32 or (optional_empty and not data):
            return data
    wanted = "64 lower-case hex characters" + (" or empty" if optional_empty else "")
    _fail(where, f"expected {wanted}, got {show(value)}")


def _exact_keys(raw: object, keys: frozenset[str], where: str) -> dict[str, object]:
    if not isinstance(raw, dict):
        _fail(where, "expected a JSON object")
    missing = sorted(keys - raw.keys())
    if missing:
        _fail(where, f"missing {', '.join(missing)}")
    extra = sorted(str(k) for k in raw.keys() - keys)
    if extra:
        _fail(where, f"unknown key {show(extra[0])}")
    return raw


def _signed_from_dict(raw: object) -> SignedReceipt:
    top = _exact_keys(raw, frozenset({"receipt", "signature"}), "receipt document")
    body = _exact_keys(top["receipt"], _RECEIPT_KEYS, "receipt")

    def at(key: str) -> str:
        return f"receipt.{key}"

    raw_parties = body["parties"]
    if not isinstance(raw_parties, list):
        _fail(at("parties"), "expected a list")
    entries: list[PartyEntry] = []
    for index, item in enumerate(raw_parties):
        where = at(f"parties[{index}]")
        entry = _exact_keys(item, _ENTRY_KEYS, where)
        name, items = entry["name"], entry["items"]
        if not isinstance(name, str) or not is_int(items):
            _fail(where, "name must be text and items an integer")
        assert isinstance(items, int)
        set_sha256 = _hex(entry["set_sha256"], f"{where}.set_sha256")
        try:
            entries.append(PartyEntry(name=name, items=items, set_sha256=set_sha256))
        except ReceiptError as exc:
            _fail(where, str(exc))

    job_id, output, released = body["job_id"], body["output"], body["released"]
    result_size, issued_at = body["result_size"], body["issued_at"]
    if not isinstance(job_id, str) or not isinstance(output, str):
        _fail(at("job_id"), "job_id and output must be text")
    if not isinstance(released, bool):
        _fail(at("released"), f"expected true or false, got {show(released)}")
    if result_size is not None and not is_int(result_size):
        _fail(at("result_size"), f"expected an integer or null, got {show(result_size)}")
    if not is_int(issued_at):
        _fail(at("issued_at"), f"expected an integer, got {show(issued_at)}")
    assert isinstance(issued_at, int)
    assert result_size is None or isinstance(result_size, int)
    raw_result = body["result_sha256"]
    result_sha256 = None if raw_result is None else _hex(raw_result, at("result_sha256"))
    signature = top["signature"]
    if (
        not isinstance(signature, str)
        or not signature
        or len(signature) % 2
        or any(c not in "0123456789abcdef" for c in signature)
    ):
        _fail("signature", "expected lower-case hex")
    spec_sha256 = _hex(body["spec_sha256"], at("spec_sha256"), optional_empty=True)
    certificate_sha256 = _hex(body["certificate_sha256"], at("certificate_sha256"))
    audit_head = _audit_head(body["audit_head"], at("audit_head"))
    tee = body["tee"]
    if not isinstance(tee, str):
        _fail(at("tee"), f"expected text, got {show(tee)}")
    try:
        receipt = Receipt(
            spec_sha256=spec_sha256,
            job_id=job_id,
            parties=tuple(entries),
            output=_output_kind(output, "output"),
            released=released,
            result_size=result_size,
            result_sha256=result_sha256,
            issued_at=issued_at,
            certificate_sha256=certificate_sha256,
            audit_head=audit_head,
            tee=tee,
        )
    except ReceiptError as exc:
        raise ReceiptError(f"receipt.{exc}") from None
    return SignedReceipt(receipt=receipt, signature=bytes.fromhex(signature))


def _audit_head(raw: object, where: str) -> AuditHead | None:
    if raw is None:
        return None
    head = _exact_keys(raw, frozenset({"entries", "hash"}), where)
    try:
        return AuditHead.from_dict(head)
    except ValueError as exc:
        _fail(where, str(exc))


def sign_receipt(receipt: Receipt, private_key: ec.EllipticCurvePrivateKey) -> SignedReceipt:
    """Sign with the server's RA-TLS key (ECDSA-SHA384), normalised to low S."""
    try:
        signature = sign_document(private_key, receipt.signed_payload(), what="receipts")
    except SignatureError as exc:
        raise ReceiptError(str(exc)) from None
    return SignedReceipt(receipt=receipt, signature=signature)


def verify_receipt(signed: SignedReceipt, certificate: bytes) -> None:
    """Check the receipt names this certificate and is signed by its key; else ReceiptError.

    Does not check the certificate's attestation: see the module documentation.
    """
    try:
        certificate_sha256, key = certificate_public_key(certificate)
    except SignatureError as exc:
        raise ReceiptError(str(exc)) from None
    receipt = signed.receipt
    if receipt.certificate_sha256 != certificate_sha256:
        named, given = receipt.certificate_sha256.hex()[:16], certificate_sha256.hex()[:16]
        raise ReceiptError(
            f"receipt was issued under another certificate (SHA-256 {named}..., "
            f"this one {given}...)"
        )
    try:
        verify_document(key, signed.signature, receipt.signed_payload(), what="receipt signature")
    except SignatureError as exc:
        raise ReceiptError(str(exc)) from None


def check_own_entry(signed: SignedReceipt, *, name: str, items: int, set_sha256: bytes) -> None:
    """Check that the receipt records this party's upload as the party itself saw it."""
    entry = signed.receipt.entry(name)
    if entry is None:
        raise ReceiptError(f"receipt has no entry for party {show(name)}")
    if entry.items != items:
        raise ReceiptError(
            f"receipt records {entry.items} items for {name}, but this party uploaded {items}"
        )
    if entry.set_sha256 != set_sha256:
        raise ReceiptError(
            f"receipt's set digest for {name} does not match this party's set "
            f"({entry.set_sha256.hex()[:16]}... vs {set_sha256.hex()[:16]}...)"
        )
