"""Signed receipts: round trip, verification, and failure after any change."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.ratls import RaTlsCertificate, create_certificate
from teepsi.attestation.sim import SimEvidenceProvider
from teepsi.contract._common import canonical_json
from teepsi.contract.audit import AuditHead
from teepsi.contract.party_keys import generate_private_key
from teepsi.contract.receipt import (
    RECEIPT_DOMAIN,
    PartyEntry,
    Receipt,
    ReceiptError,
    SignedReceipt,
    check_own_entry,
    sign_receipt,
    verify_receipt,
)

P384_ORDER = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
    "581A0DB248B0A77AECEC196ACCC52973",
    16,
)


@pytest.fixture(scope="module")
def server() -> RaTlsCertificate:
    return create_certificate(SimEvidenceProvider(sim_identity(Role.SERVER)))


@pytest.fixture(scope="module")
def other_server() -> RaTlsCertificate:
    return create_certificate(SimEvidenceProvider(sim_identity(Role.SERVER)))


def make_receipt(certificate_der: bytes, **changes: object) -> Receipt:
    fields: dict[str, object] = {
        "spec_sha256": hashlib.sha256(b"spec").digest(),
        "job_id": "q4",
        "parties": (
            PartyEntry("bank-a", 3, hashlib.sha256(b"a").digest()),
            PartyEntry("bank-b", 5, hashlib.sha256(b"b").digest()),
        ),
        "output": "intersection",
        "released": True,
        "result_size": 2,
        "result_sha256": hashlib.sha256(b"result").digest(),
        "issued_at": 1_767_222_000,
        "certificate_sha256": hashlib.sha256(certificate_der).digest(),
    }
    fields.update(changes)
    return Receipt(**fields)  # type: ignore[arg-type]


def test_round_trip_and_verification(server: RaTlsCertificate) -> None:
    assert server.private_key.curve.name == "secp384r1"
    receipt = make_receipt(server.certificate_der)
    signed = sign_receipt(receipt, server.private_key)
    text = signed.to_json()
    assert SignedReceipt.from_json(text) == signed
    assert SignedReceipt.from_json(text.encode()) == signed
    assert SignedReceipt.from_json(text + "\n") == signed  # as written to a file
    verify_receipt(signed, server.certificate_der)
    verify_receipt(signed, server.certificate_pem)
    verify_receipt(SignedReceipt.from_json(text), server.certificate_pem)

    document = json.loads(text)
    assert set(document) == {"receipt", "signature"}
    assert document["receipt"]["parties"][1] == {
        "items": 5,
        "name": "bank-b",
        "set_sha256": hashlib.sha256(b"b").hexdigest(),
    }
    assert receipt.signed_payload().startswith(RECEIPT_DOMAIN)
    assert (
        receipt.signed_payload()[len(RECEIPT_DOMAIN) :]
        == json.dumps(document["receipt"], sort_keys=True, separators=(",", ":")).encode()
    )
    # ECDSA-SHA384 under the certificate's key, plainly
    server.private_key.public_key().verify(
        signed.signature, receipt.signed_payload(), ec.ECDSA(hashes.SHA384())
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"released": False, "result_size": None, "result_sha256": None},
        {"output": "count", "result_sha256": None},
        {"output": "count", "released": False, "result_size": None, "result_sha256": None},
        {"spec_sha256": b""},  # a quick job without spec
        {"result_size": 0},
    ],
)
def test_receipt_variants_round_trip(server: RaTlsCertificate, changes: dict[str, object]) -> None:
    signed = sign_receipt(make_receipt(server.certificate_der, **changes), server.private_key)
    again = SignedReceipt.from_json(signed.to_json())
    assert again == signed
    verify_receipt(again, server.certificate_pem)


def _mutations(text: bytes) -> list[bytes]:
    out: list[bytes] = []
    for position in range(len(text)):
        for flip in (0x01, 0x20):
            out.append(text[:position] + bytes([text[position] ^ flip]) + text[position + 1 :])
    return out


def _rejected(data: bytes, certificate: bytes) -> bool:
    try:
        verify_receipt(SignedReceipt.from_json(data), certificate)
    except ReceiptError:
        return True
    return False


@pytest.mark.parametrize("changes", [{}, {"output": "count", "result_sha256": None}])
def test_every_single_byte_change_is_detected(
    server: RaTlsCertificate, changes: dict[str, object]
) -> None:
    original = sign_receipt(make_receipt(server.certificate_der, **changes), server.private_key)
    text = original.to_json().encode()
    assert not _rejected(text, server.certificate_der)
    mutations = _mutations(text)
    assert len(mutations) == 2 * len(text)
    accepted = [m for m in mutations if not _rejected(m, server.certificate_der)]
    assert accepted == []
    # insertions and deletions too, at sampled positions
    rng = random.Random(5)
    for position in rng.sample(range(len(text)), 200):
        assert _rejected(text[:position] + text[position + 1 :], server.certificate_der)
        assert _rejected(text[:position] + b" " + text[position:], server.certificate_der)


def test_wrong_certificate(server: RaTlsCertificate, other_server: RaTlsCertificate) -> None:
    signed = sign_receipt(make_receipt(server.certificate_der), server.private_key)
    with pytest.raises(ReceiptError, match=r"^receipt was issued under another certificate"):
        verify_receipt(signed, other_server.certificate_der)
    # a receipt naming the other certificate but signed with this key
    forged = sign_receipt(make_receipt(other_server.certificate_der), server.private_key)
    with pytest.raises(
        ReceiptError, match=r"^receipt signature does not verify under this certificate$"
    ):
        verify_receipt(forged, other_server.certificate_pem)
    # a valid signature over different content
    swapped = SignedReceipt(
        receipt=make_receipt(server.certificate_der, result_size=3), signature=signed.signature
    )
    with pytest.raises(
        ReceiptError, match=r"^receipt signature does not verify under this certificate$"
    ):
        verify_receipt(swapped, server.certificate_der)


def test_high_s_twin_signature_is_refused(server: RaTlsCertificate) -> None:
    signed = sign_receipt(make_receipt(server.certificate_der), server.private_key)
    r, s = decode_dss_signature(signed.signature)
    assert s <= P384_ORDER // 2
    twin = encode_dss_signature(r, P384_ORDER - s)
    # mathematically valid too, which is why it must be refused explicitly
    server.private_key.public_key().verify(
        twin, signed.receipt.signed_payload(), ec.ECDSA(hashes.SHA384())
    )
    with pytest.raises(ReceiptError, match=r"^receipt signature is not a canonical low-S"):
        verify_receipt(dataclasses.replace(signed, signature=twin), server.certificate_der)
    with pytest.raises(ReceiptError, match=r"^receipt signature is not a DER ECDSA signature$"):
        verify_receipt(dataclasses.replace(signed, signature=b"\x01\x02"), server.certificate_der)


def test_certificate_input_errors(server: RaTlsCertificate) -> None:
    signed = sign_receipt(make_receipt(server.certificate_der), server.private_key)
    with pytest.raises(ReceiptError, match=r"^certificate: PEM input has no CERTIFICATE block$"):
        verify_receipt(signed, b"not a certificate")
    with pytest.raises(ReceiptError, match=r"^certificate: "):
        verify_receipt(signed, b"\x30\x03\x02\x01\x01")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
    now = datetime.now(UTC)
    rsa_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(rsa_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    signed = sign_receipt(make_receipt(rsa_cert), server.private_key)
    with pytest.raises(ReceiptError, match=r"^certificate: public key is not an EC key"):
        verify_receipt(signed, rsa_cert)
    with pytest.raises(ReceiptError, match=r"^receipts are signed with the server's EC"):
        sign_receipt(make_receipt(rsa_cert), generate_private_key())  # type: ignore[arg-type]


def test_check_own_entry(server: RaTlsCertificate) -> None:
    signed = sign_receipt(make_receipt(server.certificate_der), server.private_key)
    digest_a = hashlib.sha256(b"a").digest()
    check_own_entry(signed, name="bank-a", items=3, set_sha256=digest_a)
    with pytest.raises(
        ReceiptError, match=r"^receipt records 3 items for bank-a, but this party uploaded 4$"
    ):
        check_own_entry(signed, name="bank-a", items=4, set_sha256=digest_a)
    with pytest.raises(
        ReceiptError, match=r"^receipt's set digest for bank-a does not match this party's set"
    ):
        check_own_entry(signed, name="bank-a", items=3, set_sha256=hashlib.sha256(b"x").digest())
    with pytest.raises(ReceiptError, match=r'^receipt has no entry for party "bank-c"$'):
        check_own_entry(signed, name="bank-c", items=3, set_sha256=digest_a)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"released": False}, "released: a result held back has no size and no digest"),
        ({"result_size": None}, "result_size: a released result has a size"),
        ({"result_sha256": None}, "result_sha256: a released intersection has a digest"),
        ({"output": "count"}, "result_sha256: a count job's receipt carries no result digest"),
        ({"output": "sum"}, 'output: must be "intersection" or "count", got "sum"'),
        ({"spec_sha256": b"x"}, "spec_sha256: must be a SHA-256 digest (32 bytes) or empty"),
        ({"certificate_sha256": b""}, "certificate_sha256: must be a SHA-256 digest (32 bytes)"),
        ({"job_id": "a b"}, 'job_id: "a b" is not a valid job id'),
        ({"parties": ()}, "parties: must list every party of the job"),
        ({"issued_at": -1}, f"issued_at: must be an integer from 0 to {2**63 - 1}, got -1"),
        ({"result_size": True}, f"result_size: must be an integer from 0 to {2**63 - 1}, got true"),
        (
            {"parties": (PartyEntry("a", 1, bytes(32)), PartyEntry("a", 2, bytes(32)))},
            "parties: names a party twice",
        ),
    ],
)
def test_receipt_invariants(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ReceiptError) as info:
        make_receipt(b"cert", **changes)
    assert str(info.value) == message


def test_party_entry_invariants() -> None:
    with pytest.raises(ReceiptError, match=r"^bank-a: items: must be an integer"):
        PartyEntry("bank-a", -1, bytes(32))
    with pytest.raises(ReceiptError, match=r"^bank-a: set_sha256: must be a SHA-256 digest"):
        PartyEntry("bank-a", 1, bytes(31))


def test_from_json_is_strict(server: RaTlsCertificate) -> None:
    signed = sign_receipt(make_receipt(server.certificate_der), server.private_key)
    document = json.loads(signed.to_json())

    def refused(value: object, *, raw: str | None = None) -> str:
        text = raw if raw is not None else json.dumps(value, sort_keys=True, separators=(",", ":"))
        with pytest.raises(ReceiptError) as info:
            SignedReceipt.from_json(text)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert refused(None, raw="{").startswith("receipt: invalid JSON at line 1")
    assert refused(None, raw=json.dumps(document, indent=2, sort_keys=True)) == (
        "receipt: not in canonical form (altered or re-formatted)"
    )
    assert refused([]) == "receipt document: expected a JSON object"
    assert refused({**document, "extra": 1}) == 'receipt document: unknown key "extra"'
    assert refused({"receipt": document["receipt"]}) == "receipt document: missing signature"
    body = dict(document["receipt"])
    body.pop("issued_at")
    assert refused({**document, "receipt": body}) == "receipt: missing issued_at"
    upper = {**document["receipt"], "job_id": "q4", "spec_sha256": body["spec_sha256"].upper()}
    assert refused({**document, "receipt": upper}).startswith(
        "receipt.spec_sha256: expected 64 lower-case hex characters or empty"
    )
    assert refused({**document, "signature": document["signature"].upper()}) == (
        "signature: expected lower-case hex"
    )
    as_float = {**document["receipt"], "issued_at": 1.5}
    assert refused({**document, "receipt": as_float}) == (
        "receipt.issued_at: expected an integer, got 1.5"
    )
    bad_entry = json.loads(json.dumps(document))
    bad_entry["receipt"]["parties"][0]["items"] = -3
    assert refused(bad_entry).startswith("receipt.parties[0]: bank-a: items: must be an integer")
    held_back = json.loads(json.dumps(document))
    held_back["receipt"]["released"] = False
    assert refused(held_back) == ("receipt.released: a result held back has no size and no digest")
    assert refused(None, raw='{"a":1,"a":2}') == "receipt: a: duplicate key"
    with pytest.raises(ReceiptError, match=r"^receipt: not ASCII JSON \(byte 0\)$"):
        SignedReceipt.from_json("é".encode())
    with pytest.raises(ReceiptError, match=r"^receipt: larger than"):
        SignedReceipt.from_json(b" " * (1024 * 1024 + 1))


def test_audit_head_is_signed_and_parsed_strictly(server: RaTlsCertificate) -> None:
    """The receipt's audit head: covered by the signature, one spelling, nothing extra."""
    head = AuditHead(entries=9, hash=hashlib.sha256(b"line 9").hexdigest())
    signed = sign_receipt(make_receipt(server.certificate_der, audit_head=head), server.private_key)
    assert SignedReceipt.from_json(signed.to_json()) == signed
    document = json.loads(signed.to_json())
    assert document["receipt"]["audit_head"] == {"entries": 9, "hash": head.hash}
    # Another head under the same signature: parses, but does not verify.
    moved = json.loads(signed.to_json())
    moved["receipt"]["audit_head"]["entries"] = 8
    with pytest.raises(ReceiptError, match=r"^receipt signature does not verify"):
        verify_receipt(SignedReceipt.from_json(canonical_json(moved)), server.certificate_der)

    def refused(audit_head: object) -> str:
        changed = {**document, "receipt": {**document["receipt"], "audit_head": audit_head}}
        with pytest.raises(ReceiptError) as info:
            SignedReceipt.from_json(canonical_json(changed))
        return str(info.value)

    assert refused([]) == "receipt.audit_head: expected a JSON object"
    assert refused({"entries": 9}) == "receipt.audit_head: missing hash"
    assert refused({"entries": 9, "hash": head.hash, "x": 1}) == (
        'receipt.audit_head: unknown key "x"'
    )
    assert refused({"entries": -1, "hash": head.hash}).startswith(
        "receipt.audit_head: entries: expected a count, got -1"
    )
    assert refused({"entries": 2**63, "hash": head.hash}).startswith(
        "receipt.audit_head: entries: expected a count"
    )
    assert refused({"entries": True, "hash": head.hash}).startswith("receipt.audit_head: ")
    assert refused({"entries": 9, "hash": head.hash.upper()}).startswith(
        "receipt.audit_head: hash: expected 64 lower-case hex characters"
    )
    body = dict(document["receipt"])
    body.pop("audit_head")  # a receipt from before the field: refused, not defaulted
    with pytest.raises(ReceiptError, match=r"^receipt: missing audit_head$"):
        SignedReceipt.from_json(canonical_json({**document, "receipt": body}))
