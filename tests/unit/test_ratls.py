"""RA-TLS certificates: creation, extraction, and compatibility with Gramine's format.

Two independent references keep :mod:`teepsi.attestation.ratls` honest:

* ``vectors/gramine_ratls_interop_2023.pem``: a real certificate made by Gramine (origin
  noted in the file), read with a DER splitter written here, not the module's.
* ``_gramine_certificate``: a byte-level rebuild of what Gramine's ra_tls_attest.c asks
  mbedTLS to write (same fields, encodings, extension order, CBOR bytes as libcbor
  emits them), using neither ``cryptography``'s certificate builder nor cbor2. It is
  checked to reproduce the real certificate's TBSCertificate exactly, and then to
  match what ``create_certificate`` produces.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from teepsi.attestation.evidence import EnclaveIdentity, EvidenceProvider
from teepsi.attestation.ratls import (
    LEGACY_QUOTE_OID,
    LEGACY_QUOTE_OID_GRAMINE,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    RaTlsError,
    create_certificate,
    extract_evidence,
    report_data_for_key,
)
from teepsi.contract.outputs import OutputKind

VECTOR = Path(__file__).parent.parent / "vectors" / "gramine_ratls_interop_2023.pem"
#: The time certificates are judged at, unless a test is about validity: inside the
#: validity of the Gramine vector (2001 to 2030) and of certificates made during the test.
NOW = datetime.now(UTC)

# OID bytes exactly as Gramine's ra_tls_common.h spells them. The legacy one keeps its
# own tag and length (06 09) inside, which is why it parses as 0.6.9.42.840....
GRAMINE_LEGACY_OID_CONTENT = bytes.fromhex("06092a864886f84d8a3906")
PROPER_LEGACY_OID_CONTENT = bytes.fromhex("2a864886f84d8a3906")
TCG_OID_CONTENT = bytes.fromhex("678105050409")
ECDSA_SHA256_OID = bytes.fromhex("2a8648ce3d040302")
SHA256_RSA_OID = bytes.fromhex("2a864886f70d01010b")

QUOTE_SIZE = 1000
REPORT_DATA_OFFSET = 368


class FakeProvider(EvidenceProvider):
    """A quote-shaped buffer: version 3 at offset 0, report_data at 368, nothing signed."""

    name = "fake"
    simulated = True

    def __init__(self, version: int = 3, size: int = QUOTE_SIZE) -> None:
        self.version = version
        self.size = size
        self.requests: list[bytes] = []

    def quote(self, report_data: bytes) -> bytes:
        self.requests.append(report_data)
        buf = bytearray(self.size)
        struct.pack_into("<H", buf, 0, self.version)
        buf[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64] = report_data
        return bytes(buf)


# --- independent DER / CBOR, the way mbedTLS and libcbor write them --------------------


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | info]) + value.to_bytes(size, "big")
    raise AssertionError("too big")


def _cbor_bstr(data: bytes) -> bytes:
    return _cbor_head(2, len(data)) + data


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def gramine_claims(public_key: PublicKeyTypes, *, alg: int = 1) -> bytes:
    """{"pubkey-hash": bstr([alg, bstr(hash of SPKI)])} as libcbor serializes it."""
    digest = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}[alg](_spki(public_key))
    entry = _cbor_head(4, 2) + _cbor_head(0, alg) + _cbor_bstr(digest.digest())
    key = b"pubkey-hash"
    return _cbor_head(5, 1) + _cbor_head(3, len(key)) + key + _cbor_bstr(entry)


def gramine_evidence(quote: bytes, claims: bytes) -> bytes:
    """CBOR tag 60000 [bstr quote, bstr claims]."""
    return _cbor_head(6, 60000) + _cbor_head(4, 2) + _cbor_bstr(quote) + _cbor_bstr(claims)


def _extension(oid_content: bytes, value: bytes, *, critical: bool = False) -> bytes:
    flag = _tlv(0x01, b"\xff") if critical else b""  # mbedTLS omits FALSE
    return _seq(_tlv(0x06, oid_content), flag, _tlv(0x04, value))


def _gramine_name() -> bytes:
    def rdn(oid: bytes, tag: int, text: str) -> bytes:
        return _tlv(0x31, _seq(_tlv(0x06, oid), _tlv(tag, text.encode())))

    return _seq(
        rdn(bytes.fromhex("550403"), 0x0C, "RATLS"),  # UTF8String
        rdn(bytes.fromhex("55040a"), 0x0C, "GramineDevelopers"),
        rdn(bytes.fromhex("550406"), 0x13, "US"),  # PrintableString
    )


def _standard_extensions(public_key: PublicKeyTypes) -> list[bytes]:
    """basicConstraints CA:FALSE, SKI and AKI as Gramine's generate_x509() sets them."""
    # RFC 5280 method 1, as mbedTLS does: SHA-1 of the subjectPublicKey bits.
    _algorithm, bits = _der_children(_content(_spki(public_key)))
    key_id = hashlib.sha1(_content(bits)[1:]).digest()
    return [
        _extension(bytes.fromhex("551d13"), _seq()),
        _extension(bytes.fromhex("551d0e"), _tlv(0x04, key_id)),
        _extension(bytes.fromhex("551d23"), _seq(_tlv(0x80, key_id))),
    ]


def gramine_tbs(
    public_key: PublicKeyTypes,
    evidence_extensions: list[bytes],
    *,
    null_params: bool = False,
    sig_oid: bytes = ECDSA_SHA256_OID,
    standard_extensions: bool = True,
    validity: tuple[bytes, bytes] = (b"010101000000Z", b"301231235959Z"),  # Gramine's own
) -> bytes:
    # mbedTLS before 3.5 wrote NULL parameters into the ECDSA AlgorithmIdentifier.
    sig_alg = _seq(_tlv(0x06, sig_oid), b"\x05\x00" if null_params else b"")
    extensions = _standard_extensions(public_key) if standard_extensions else []
    extensions += evidence_extensions
    return _seq(
        _tlv(0xA0, _tlv(0x02, b"\x02")),  # v3
        _tlv(0x02, b"\x01"),  # serial 1
        sig_alg,
        _gramine_name(),
        _seq(_tlv(0x17, validity[0]), _tlv(0x17, validity[1])),
        _gramine_name(),
        _spki(public_key),
        _tlv(0xA3, _seq(*extensions)),
    )


def _gramine_certificate(key: PrivateKeyTypes, evidence_extensions: list[bytes]) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        tbs = gramine_tbs(key.public_key(), evidence_extensions, sig_oid=SHA256_RSA_OID)
        signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
        sig_alg = _seq(_tlv(0x06, SHA256_RSA_OID), b"\x05\x00")
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        tbs = gramine_tbs(key.public_key(), evidence_extensions)
        signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        sig_alg = _seq(_tlv(0x06, ECDSA_SHA256_OID))
    return _seq(tbs, sig_alg, _tlv(0x03, b"\x00" + signature))


def legacy_ext(quote: bytes, oid_content: bytes = GRAMINE_LEGACY_OID_CONTENT) -> bytes:
    return _extension(oid_content, quote)


def tcg_ext(evidence: bytes, *, critical: bool = False) -> bytes:
    return _extension(TCG_OID_CONTENT, evidence, critical=critical)


def gramine_style(
    key: ec.EllipticCurvePrivateKey, *, legacy: bool = True, tcg: bool = True
) -> bytes:
    """A certificate as current Gramine (tcg=True) or Gramine before v1.8 (tcg=False) makes."""
    provider = FakeProvider()
    extensions = []
    if legacy:
        extensions.append(legacy_ext(provider.quote(report_data_for_key(key.public_key()))))
    if tcg:
        claims = gramine_claims(key.public_key())
        quote = provider.quote(hashlib.sha256(claims).digest() + bytes(32))
        extensions.append(tcg_ext(gramine_evidence(quote, claims)))
    return _gramine_certificate(key, extensions)


def _header_and_length(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos + 1]
    if first < 0x80:
        return 2, first
    count = first & 0x7F
    return 2 + count, int.from_bytes(data[pos + 2 : pos + 2 + count], "big")


def _der_children(data: bytes) -> list[bytes]:
    """Split DER content into its TLVs (whole TLVs)."""
    out = []
    pos = 0
    while pos < len(data):
        header, length = _header_and_length(data, pos)
        out.append(data[pos : pos + header + length])
        pos += header + length
    return out


def _content(tlv: bytes) -> bytes:
    header, length = _header_and_length(tlv, 0)
    assert header + length == len(tlv)
    return tlv[header:]


def _split_certificate(der: bytes) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(TBSCertificate TLV, signature, {OID content: extension value}) of a certificate."""
    tbs, _sig_alg, sig = _der_children(_content(der))
    fields = _der_children(_content(tbs))
    extensions = {}
    for ext in _der_children(_content(_content(fields[-1]))):
        parts = _der_children(_content(ext))
        extensions[_content(parts[0])] = _content(parts[-1])
    return tbs, _content(sig)[1:], extensions


def _vector_key() -> ec.EllipticCurvePublicKey:
    tbs, _, _ = _split_certificate(_vector_der())
    key = serialization.load_der_public_key(_der_children(_content(tbs))[6])
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _vector_der() -> bytes:
    text = VECTOR.read_text()
    body = text.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
    return base64.b64decode("".join(body.split()))


# --- the real Gramine certificate ------------------------------------------------------


def test_vector_is_intact_and_self_signed() -> None:
    tbs, signature, _ = _split_certificate(_vector_der())
    _vector_key().verify(signature, tbs, ec.ECDSA(hashes.SHA256()))


def test_vector_layout_matches_gramine_source_facts() -> None:
    tbs, _, extensions = _split_certificate(_vector_der())
    assert list(extensions)[3:] == [GRAMINE_LEGACY_OID_CONTENT, TCG_OID_CONTENT]
    key = _vector_key()
    assert isinstance(key.curve, ec.SECP384R1)
    legacy_quote = extensions[GRAMINE_LEGACY_OID_CONTENT]
    evidence = extensions[TCG_OID_CONTENT]
    # Two separate quotes: the legacy one binds the key, the TCG one binds the claims.
    legacy_rd = legacy_quote[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64]
    assert legacy_rd == report_data_for_key(key)
    # tag 60000 (3 bytes), array(2) (1 byte), bstr head (3 bytes), then the quote
    claims = gramine_claims(key)
    tcg_quote = evidence[7 : 7 + len(legacy_quote)]
    assert evidence == gramine_evidence(tcg_quote, claims)
    assert tcg_quote != legacy_quote
    tcg_rd = tcg_quote[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64]
    assert tcg_rd == hashlib.sha256(claims).digest() + bytes(32)
    assert tbs.startswith(b"\x30")


def test_independent_builder_reproduces_the_real_certificate_byte_for_byte() -> None:
    tbs, _, extensions = _split_certificate(_vector_der())
    rebuilt = gramine_tbs(
        _vector_key(),
        [
            legacy_ext(extensions[GRAMINE_LEGACY_OID_CONTENT]),
            tcg_ext(extensions[TCG_OID_CONTENT]),
        ],
        null_params=True,
    )
    assert rebuilt == tbs


def test_extracts_the_real_gramine_certificate() -> None:
    evidence = extract_evidence(VECTOR.read_bytes(), at=NOW)
    assert evidence.source == "tcg-dice"
    assert evidence.public_key_sha256 == hashlib.sha256(_spki(_vector_key())).digest()
    assert evidence.certificate_sha256 == hashlib.sha256(_vector_der()).digest()
    assert len(evidence.quote) == 4734
    assert extract_evidence(_vector_der(), at=NOW) == evidence


def test_extracts_the_real_gramine_legacy_quote() -> None:
    # The same real quotes in a legacy-only certificate (Gramine before v1.8). The
    # original signature no longer matches, which the extractor does not look at: the
    # TLS stack checks it against the key the handshake proved.
    _tbs, signature, extensions = _split_certificate(_vector_der())
    legacy_quote = extensions[GRAMINE_LEGACY_OID_CONTENT]
    legacy_tbs = gramine_tbs(_vector_key(), [legacy_ext(legacy_quote)], null_params=True)
    certificate = _seq(
        legacy_tbs, _seq(_tlv(0x06, ECDSA_SHA256_OID), b"\x05\x00"), _tlv(0x03, b"\0" + signature)
    )
    evidence = extract_evidence(certificate, at=NOW)
    assert evidence.source == "legacy"
    assert evidence.quote == legacy_quote


# --- create_certificate ----------------------------------------------------------------


def test_round_trip() -> None:
    provider = FakeProvider()
    cert = create_certificate(provider)
    evidence = extract_evidence(cert.certificate_der, at=NOW)
    spki = _spki(cert.private_key.public_key())
    assert evidence.source == "tcg-dice"
    assert evidence.quote == cert.quote
    assert evidence.public_key_sha256 == hashlib.sha256(spki).digest()
    assert evidence.certificate_sha256 == hashlib.sha256(cert.certificate_der).digest()
    # Two quotes, as Gramine asks for: legacy binds the key, TCG binds the claims.
    claims = gramine_claims(cert.private_key.public_key())
    assert provider.requests == [
        report_data_for_key(cert.private_key.public_key()),
        hashlib.sha256(claims).digest() + bytes(32),
    ]


def test_pem_and_der_both_accepted() -> None:
    cert = create_certificate(FakeProvider())
    assert extract_evidence(cert.certificate_pem, at=NOW) == extract_evidence(
        cert.certificate_der, at=NOW
    )
    assert cert.certificate_pem.startswith(b"-----BEGIN CERTIFICATE-----")


def test_certificate_matches_gramine_byte_for_byte() -> None:
    # Gramine's layout; the validity is teepsi's (an hour back, 30 days ahead).
    cert = create_certificate(FakeProvider(), now=datetime(2024, 1, 1, 1, 0, 0, tzinfo=UTC))
    key = cert.private_key.public_key()
    provider = FakeProvider()
    claims = gramine_claims(key)
    expected_tbs = gramine_tbs(
        key,
        [
            legacy_ext(provider.quote(report_data_for_key(key))),
            tcg_ext(
                gramine_evidence(
                    provider.quote(hashlib.sha256(claims).digest() + bytes(32)), claims
                )
            ),
        ],
        validity=(b"240101000000Z", b"240131010000Z"),
    )
    parsed = x509.load_der_x509_certificate(cert.certificate_der)
    assert parsed.tbs_certificate_bytes == expected_tbs


def test_certificate_fields() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cert = create_certificate(FakeProvider())
    after = datetime.now(UTC)
    parsed = x509.load_der_x509_certificate(cert.certificate_der)
    expected_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )
    assert parsed.subject == expected_name
    assert parsed.issuer == expected_name
    assert parsed.serial_number == 1
    # An hour back for verifiers' clocks, DEFAULT_LIFETIME (30 days) ahead.
    skew = timedelta(hours=1)
    assert before - skew <= parsed.not_valid_before_utc <= after - skew
    assert parsed.not_valid_after_utc - parsed.not_valid_before_utc == timedelta(days=30, hours=1)
    assert (cert.not_before, cert.not_after) == (
        parsed.not_valid_before_utc,
        parsed.not_valid_after_utc,
    )
    assert isinstance(parsed.signature_hash_algorithm, hashes.SHA256)
    assert isinstance(cert.private_key.curve, ec.SECP384R1)
    assert not any(ext.critical for ext in parsed.extensions)
    assert parsed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    oids = [ext.oid for ext in parsed.extensions]
    assert oids[-2:] == [LEGACY_QUOTE_OID_GRAMINE, TCG_DICE_TAGGED_EVIDENCE_OID]
    assert _tlv(0x06, GRAMINE_LEGACY_OID_CONTENT) in cert.certificate_der
    parsed.verify_directly_issued_by(parsed)


def test_validity_is_its_making_time_less_the_clock_skew_plus_the_lifetime() -> None:
    made = datetime(2024, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    cert = create_certificate(FakeProvider(), now=made, lifetime=timedelta(days=2))
    parsed = x509.load_der_x509_certificate(cert.certificate_der)
    assert parsed.not_valid_before_utc == datetime(2024, 1, 1, 11, 0, 0, tzinfo=UTC)
    assert parsed.not_valid_after_utc == datetime(2024, 1, 3, 12, 0, 0, tzinfo=UTC)
    evidence = extract_evidence(cert.certificate_der, at=made)
    assert (evidence.not_before, evidence.not_after) == (cert.not_before, cert.not_after)


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(seconds=-1), timedelta(days=91)])
def test_lifetime_out_of_bounds_is_refused(lifetime: timedelta) -> None:
    with pytest.raises(RaTlsError, match=r"lifetime .* out of range"):
        create_certificate(FakeProvider(), lifetime=lifetime)


def test_certificate_is_judged_at_the_time_given() -> None:
    """Before its start (less the skew allowance) and after its end, a certificate is refused."""
    made = datetime(2024, 6, 1, tzinfo=UTC)
    cert = create_certificate(FakeProvider(), now=made, lifetime=timedelta(days=1)).certificate_der
    for fine in (made - timedelta(hours=1), made, made + timedelta(days=1)):
        assert extract_evidence(cert, at=fine).source == "tcg-dice"
    with pytest.raises(
        RaTlsError, match=r"expired at 2024-06-02T00:00:00Z \(judged at 2024-06-02T00:00:01Z\)"
    ):
        extract_evidence(cert, at=made + timedelta(days=1, seconds=1))
    with pytest.raises(RaTlsError, match=r"not valid before 2024-05-31T23:00:00Z"):
        extract_evidence(cert, at=made - timedelta(hours=1, seconds=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        extract_evidence(cert, at=made.replace(tzinfo=None))
    # The real Gramine certificate carries Gramine's own fixed validity.
    with pytest.raises(RaTlsError, match="expired at 2030-12-31T23:59:59Z"):
        extract_evidence(VECTOR.read_bytes(), at=datetime(2031, 1, 1, tzinfo=UTC))


def test_peer_verifier_refuses_an_expired_server_certificate() -> None:
    from teepsi.attestation.evidence import Role
    from teepsi.attestation.measure import sim_identity
    from teepsi.attestation.peer import PeerRejected, PeerVerifier
    from teepsi.attestation.policy import policy_for
    from teepsi.attestation.sim import SimEvidenceProvider

    identity = sim_identity(Role.SERVER)
    made = datetime.now(UTC)
    cert = create_certificate(SimEvidenceProvider(identity), now=made, lifetime=timedelta(days=1))
    provider = SimEvidenceProvider(identity)
    collateral = provider.collateral_json(cert.quote)
    verifier = PeerVerifier(policy_for([("server", identity)]), allow_simulated=True)
    at = int(made.timestamp())
    peer, _ = verifier.verify_certificate(cert.certificate_der, collateral, at=at)
    assert peer.verified.simulated
    with pytest.raises(PeerRejected, match="server certificate: certificate expired at"):
        verifier.verify_certificate(
            cert.certificate_der, collateral, at=at + 24 * 3600 + 60, record=False
        )


def test_verify_receipt_needs_the_certificate_valid_at_the_issue_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    from teepsi.attestation.evidence import Role
    from teepsi.attestation.measure import sim_identity
    from teepsi.attestation.sim import SimEvidenceProvider, SimPlatform, SimPlatformConfig
    from teepsi.cli import main
    from teepsi.contract.receipt import PartyEntry, Receipt, sign_receipt

    made = datetime.now(UTC) - timedelta(days=3)
    # Collateral valid over the whole window, so only the certificate's validity decides.
    platform = SimPlatform(SimPlatformConfig(collateral_issued_at=int(made.timestamp()) - 3600))
    provider = SimEvidenceProvider(sim_identity(Role.SERVER), platform)
    cert = create_certificate(provider, now=made, lifetime=timedelta(days=1))
    (tmp_path / "cert.pem").write_bytes(cert.certificate_pem)
    collateral = provider.collateral_json(cert.quote)
    assert collateral is not None
    (tmp_path / "receipt.json.collateral.json").write_text(collateral)
    ends = cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")

    def verdict(issued: datetime) -> tuple[int, dict[str, object]]:
        receipt = Receipt(
            spec_sha256=hashlib.sha256(b"spec").digest(),
            job_id="q4",
            parties=(PartyEntry("bank-a", 3, hashlib.sha256(b"a").digest()),),
            output=OutputKind.INTERSECTION,
            released=True,
            result_size=2,
            result_sha256=hashlib.sha256(b"result").digest(),
            issued_at=int(issued.timestamp()),
            certificate_sha256=hashlib.sha256(cert.certificate_der).digest(),
        )
        path = tmp_path / "receipt.json"
        path.write_text(sign_receipt(receipt, cert.private_key).to_json())
        cert_file = str(tmp_path / "cert.pem")
        code = main(["verify-receipt", str(path), "--cert", cert_file, "--allow-simulated"])
        out = json.loads(capsys.readouterr().out)
        assert isinstance(out, dict)
        return code, out

    code, out = verdict(made + timedelta(hours=2))
    assert code == 0 and out["valid"] is True, out
    code, out = verdict(made + timedelta(days=2))
    assert code == 1 and out["valid"] is False
    assert f"certificate expired at {ends}" in str(out["reason"])


def test_provider_ignoring_report_data_is_caught() -> None:
    class Stale(FakeProvider):
        def quote(self, report_data: bytes) -> bytes:
            return super().quote(bytes(64))

    with pytest.raises(RaTlsError, match="without the requested report_data"):
        create_certificate(Stale())


def test_sim_provider_round_trip() -> None:
    sim = pytest.importorskip("teepsi.attestation.sim")
    identity = EnclaveIdentity(
        mr_enclave=b"\x11" * 32, mr_signer=b"\x22" * 32, isv_prod_id=1, isv_svn=1
    )
    cert = create_certificate(sim.SimEvidenceProvider(identity))
    evidence = extract_evidence(cert.certificate_der, at=NOW)
    assert evidence.source == "tcg-dice"
    assert evidence.quote == cert.quote


# --- accepted variants -----------------------------------------------------------------


def test_legacy_only_certificate_accepted() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    evidence = extract_evidence(gramine_style(key, tcg=False), at=NOW)
    assert evidence.source == "legacy"
    assert evidence.quote[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64] == report_data_for_key(
        key.public_key()
    )


def test_properly_encoded_legacy_oid_accepted() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    quote = FakeProvider().quote(report_data_for_key(key.public_key()))
    der = _gramine_certificate(key, [legacy_ext(quote, PROPER_LEGACY_OID_CONTENT)])
    assert x509.load_der_x509_certificate(der).extensions[-1].oid == LEGACY_QUOTE_OID
    assert extract_evidence(der, at=NOW).source == "legacy"


def test_p256_key_accepted() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert extract_evidence(gramine_style(key), at=NOW).source == "tcg-dice"
    assert extract_evidence(gramine_style(key, tcg=False), at=NOW).source == "legacy"


@pytest.mark.parametrize("alg", [7, 8])
def test_other_pubkey_hash_algorithms_accepted(alg: int) -> None:
    # Gramine writes SHA-256 but its verifier also accepts SHA-384 and SHA-512 entries.
    key = ec.generate_private_key(ec.SECP384R1())
    claims = gramine_claims(key.public_key(), alg=alg)
    quote = FakeProvider().quote(hashlib.sha256(claims).digest() + bytes(32))
    der = _gramine_certificate(key, [tcg_ext(gramine_evidence(quote, claims))])
    assert (
        extract_evidence(der, at=NOW).public_key_sha256
        == hashlib.sha256(_spki(key.public_key())).digest()
    )


def test_unknown_claims_ignored() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pubkey_claims = gramine_claims(key.public_key())
    claims = _cbor_head(5, 2) + pubkey_claims[1:] + _cbor_head(3, 5) + b"nonce" + _cbor_bstr(b"n")
    quote = FakeProvider().quote(hashlib.sha256(claims).digest() + bytes(32))
    der = _gramine_certificate(key, [tcg_ext(gramine_evidence(quote, claims))])
    assert extract_evidence(der, at=NOW).source == "tcg-dice"


def test_report_data_for_key() -> None:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    data = report_data_for_key(key)
    assert data == hashlib.sha256(_spki(key)).digest() + bytes(32)


# --- refused ---------------------------------------------------------------------------


def _refused(der: bytes, match: str) -> None:
    with pytest.raises(RaTlsError, match=match) as info:
        extract_evidence(der, at=NOW)
    assert "\n" not in str(info.value)


def test_tcg_evidence_copied_to_another_key_refused() -> None:
    victim = create_certificate(FakeProvider())
    _, _, extensions = _split_certificate(victim.certificate_der)
    attacker = ec.generate_private_key(ec.SECP384R1())
    stolen_tcg = _gramine_certificate(attacker, [tcg_ext(extensions[TCG_OID_CONTENT])])
    _refused(stolen_tcg, "pubkey-hash does not match the certificate's public key")


def test_legacy_quote_copied_to_another_key_refused() -> None:
    victim = create_certificate(FakeProvider())
    _, _, extensions = _split_certificate(victim.certificate_der)
    attacker = ec.generate_private_key(ec.SECP384R1())
    stolen = _gramine_certificate(attacker, [legacy_ext(extensions[GRAMINE_LEGACY_OID_CONTENT])])
    _refused(stolen, "quote report_data does not bind the certificate's public key")


def test_flipped_report_data_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    provider = FakeProvider()
    legacy_quote = bytearray(provider.quote(report_data_for_key(key.public_key())))
    legacy_quote[REPORT_DATA_OFFSET] ^= 1
    _refused(
        _gramine_certificate(key, [legacy_ext(bytes(legacy_quote))]),
        "quote report_data does not bind",
    )
    claims = gramine_claims(key.public_key())
    tcg_quote = bytearray(provider.quote(hashlib.sha256(claims).digest() + bytes(32)))
    tcg_quote[REPORT_DATA_OFFSET + 31] ^= 0x80
    _refused(
        _gramine_certificate(key, [tcg_ext(gramine_evidence(bytes(tcg_quote), claims))]),
        "does not match the hash of its claims",
    )


def test_claims_swapped_under_the_quote_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    other = ec.generate_private_key(ec.SECP384R1())
    quote = FakeProvider().quote(
        hashlib.sha256(gramine_claims(other.public_key())).digest() + bytes(32)
    )
    evidence = gramine_evidence(quote, gramine_claims(key.public_key()))
    _refused(
        _gramine_certificate(key, [tcg_ext(evidence)]), "does not match the hash of its claims"
    )


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda ev: b"\xff" + ev[1:], "indefinite-length or reserved"),
        (lambda ev: _cbor_head(6, 60001) + ev[3:], "not CBOR tag 60000"),
        (lambda ev: ev[:3] + _cbor_head(4, 3) + ev[4:], r"not a CBOR array \[quote, claims\]"),
        (lambda ev: ev[:-5], "truncated"),
        (lambda ev: ev + b"\x00", "trailing bytes"),
        (lambda ev: b"garbage", "not CBOR tag 60000"),
    ],
)
def test_corrupted_tcg_extension_refused_even_with_good_legacy(
    mangle: Callable[[bytes], bytes], match: str
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    provider = FakeProvider()
    legacy = legacy_ext(provider.quote(report_data_for_key(key.public_key())))
    claims = gramine_claims(key.public_key())
    evidence = gramine_evidence(provider.quote(hashlib.sha256(claims).digest() + bytes(32)), claims)
    assert (
        extract_evidence(_gramine_certificate(key, [legacy, tcg_ext(evidence)]), at=NOW).source
        == "tcg-dice"
    )
    _refused(_gramine_certificate(key, [legacy, tcg_ext(mangle(evidence))]), match)


def _with_claims(key: ec.EllipticCurvePrivateKey, claims: bytes) -> bytes:
    quote = FakeProvider().quote(hashlib.sha256(claims).digest() + bytes(32))
    return _gramine_certificate(key, [tcg_ext(gramine_evidence(quote, claims))])


def test_bad_claims_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    good = gramine_claims(key.public_key())
    entry = good[len(_cbor_head(5, 1) + _cbor_head(3, 11) + b"pubkey-hash") :]
    nonce = _cbor_head(3, 5) + b"nonce" + _cbor_bstr(b"n")
    _refused(_with_claims(key, _cbor_head(5, 1) + nonce), 'lack the "pubkey-hash" claim')
    _refused(_with_claims(key, _cbor_head(5, 2) + good[1:] + good[1:]), "repeat a key")
    _refused(_with_claims(key, b"\xbf" + good[1:] + b"\xff"), "indefinite-length")
    _refused(_with_claims(key, _cbor_head(4, 0)), "not a non-empty CBOR map")
    _refused(_with_claims(key, _cbor_head(5, 1) + b"\x01" + entry), "not a non-empty text string")
    sha1_entry = _cbor_head(4, 2) + b"\x02" + _cbor_bstr(bytes(32))
    bad_alg = _cbor_head(5, 1) + _cbor_head(3, 11) + b"pubkey-hash" + _cbor_bstr(sha1_entry)
    _refused(_with_claims(key, bad_alg), "unsupported hash algorithm")


def test_no_evidence_extension_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    _refused(_gramine_certificate(key, []), "no RA-TLS evidence extension")


def test_critical_evidence_extension_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    claims = gramine_claims(key.public_key())
    quote = FakeProvider().quote(hashlib.sha256(claims).digest() + bytes(32))
    der = _gramine_certificate(key, [tcg_ext(gramine_evidence(quote, claims), critical=True)])
    _refused(der, "marked critical")


def test_both_legacy_oids_at_once_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    quote = FakeProvider().quote(report_data_for_key(key.public_key()))
    der = _gramine_certificate(
        key, [legacy_ext(quote), legacy_ext(quote, PROPER_LEGACY_OID_CONTENT)]
    )
    _refused(der, "more than one legacy quote extension")


def test_rsa_key_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    quote = FakeProvider().quote(report_data_for_key(key.public_key()))
    der = _gramine_certificate(key, [legacy_ext(quote)])
    x509.load_der_x509_certificate(der)  # a valid certificate, just the wrong key type
    _refused(der, "unsupported public key type RSA")


def test_p521_key_refused() -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    _refused(gramine_style(key, tcg=False), "unsupported curve secp521r1")


def test_short_quote_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    quote = FakeProvider(size=435).quote(report_data_for_key(key.public_key()))
    _refused(_gramine_certificate(key, [legacy_ext(quote)]), "435 bytes, shorter than")


def test_wrong_quote_version_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    quote = FakeProvider(version=4).quote(report_data_for_key(key.public_key()))
    _refused(_gramine_certificate(key, [legacy_ext(quote)]), "quote version is 4")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x30\x03\x02\x01",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
    ],
)
def test_garbage_refused(data: bytes) -> None:
    with pytest.raises(RaTlsError):
        extract_evidence(data, at=NOW)


def test_mutated_certificates_fail_cleanly() -> None:
    # Whatever the damage, the extractor either accepts or raises RaTlsError: never a
    # stray exception from the DER or CBOR parsing underneath.
    rng = random.Random(20240601)
    bases = [create_certificate(FakeProvider()).certificate_der, _vector_der()]
    for _ in range(600):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.6:
                data[pos] = rng.randrange(256)
            elif choice < 0.8:
                del data[pos]
            else:
                data.insert(pos, rng.randrange(256))
        with contextlib.suppress(RaTlsError):
            extract_evidence(bytes(data), at=NOW)


def test_no_job_outlives_the_server_certificate() -> None:
    """The server stops when its certificate ends, so it admits no job that would end later."""
    from teepsi.server.errors import ErrorKind, ServiceError
    from teepsi.server.jobs import JobRegistry
    from teepsi.server.limits import Limits
    from tests.support.registry import live_jobs

    now = 1_800_000_000.0
    registry = JobRegistry(
        Limits(job_timeout_seconds=600), clock=lambda: now, certificate_not_after=now + 300
    )
    try:
        with pytest.raises(ServiceError) as refused:
            registry.join("late", "a", 2)
        assert refused.value.kind is ErrorKind.UNAVAILABLE
        assert "certificate ends 2027-01-15T08:05:00Z, before this job could finish" in str(
            refused.value
        )
        assert live_jobs(registry) == 0
    finally:
        registry.close()
    roomy = JobRegistry(
        Limits(job_timeout_seconds=600), clock=lambda: now, certificate_not_after=now + 601
    )
    try:
        assert roomy.join("early", "a", 2).deadline == now + 600
    finally:
        roomy.close()
