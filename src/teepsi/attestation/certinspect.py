"""Inspecting an RA-TLS certificate: what it carries, read without trusting it.

The certificate is loaded with ``cryptography``; one written by Gramine built against
mbedTLS before 3.5 (an explicit NULL in the ECDSA AlgorithmIdentifier, which
``cryptography`` refuses) is re-encoded without that NULL first, through the one DER
reader. Only the two signature AlgorithmIdentifiers change; the self-signature is
checked over the original TBS bytes. Nothing here decides trust: that is
:class:`teepsi.attestation.peer.PeerVerifier`'s job.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from teepsi.attestation import cbor
from teepsi.attestation import der as der_reader
from teepsi.attestation.ratls import (
    LEGACY_QUOTE_OID,
    LEGACY_QUOTE_OID_GRAMINE,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    TEE_QUOTE_CBOR_TAG,
)
from teepsi.errors import TeepsiError
from teepsi.timefmt import iso_utc


class CertificateInspectionError(TeepsiError, ValueError):
    """The input is not a certificate that can be shown; the message is one line."""


EXTENSION_NAMES = {
    TCG_DICE_TAGGED_EVIDENCE_OID.dotted_string: "TCG DICE tagged evidence (RA-TLS)",
    LEGACY_QUOTE_OID_GRAMINE.dotted_string: "SGX quote, Gramine legacy RA-TLS (OID as Gramine "
    "writes it)",
    LEGACY_QUOTE_OID.dotted_string: "SGX quote, legacy RA-TLS",
    "2.5.29.19": "basic constraints",
    "2.5.29.14": "subject key identifier",
    "2.5.29.35": "authority key identifier",
    "2.5.29.15": "key usage",
    "2.5.29.37": "extended key usage",
    "2.5.29.17": "subject alternative name",
}

SIGNATURE_NAMES = {
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.3.101.112": "Ed25519",
}

_ECDSA_OID_PREFIX = bytes.fromhex("06082a8648ce3d0403")  # ecdsa-with-SHA256/384/512


def _drop_ecdsa_null(der: bytes, start: int, end: int) -> bytes:
    """An AlgorithmIdentifier without the NULL parameters mbedTLS < 3.5 wrote for ECDSA."""
    element = der[start:end]
    tag, content, stop = der_reader.read_tlv(der, start, len(der))
    inner = der[content:stop]
    if tag == 0x30 and inner.startswith(_ECDSA_OID_PREFIX) and inner.endswith(b"\x05\x00"):
        return der_reader.encode(0x30, inner[:-2])
    return element


def split_certificate(der: bytes) -> tuple[bytes, bytes, bytes]:
    """(TBSCertificate, signatureAlgorithm, signature BIT STRING content) as encoded."""
    tag, start, end = der_reader.read_tlv(der, 0, len(der))
    if tag != 0x30 or end != len(der):
        raise CertificateInspectionError("not a DER X.509 certificate")
    parts = der_reader.children(der, start, end)
    if [p[0] for p in parts] != [0x30, 0x30, 0x03]:
        raise CertificateInspectionError("not a DER X.509 certificate")
    (_, tbs_at, _, tbs_end), (_, alg_at, _, alg_end), (_, _, sig_start, sig_end) = parts
    return der[tbs_at:tbs_end], der[alg_at:alg_end], der[sig_start:sig_end]


def load_certificate(der: bytes) -> tuple[x509.Certificate, bool]:
    """:func:`_load_certificate`, with DER errors as CertificateInspectionError."""
    try:
        return _load_certificate(der)
    except der_reader.DerError as exc:
        raise CertificateInspectionError(f"not a DER certificate ({exc})") from None


def _load_certificate(der: bytes) -> tuple[x509.Certificate, bool]:
    """Parse with ``cryptography``; re-encode Gramine/mbedTLS < 3.5 certificates if needed.

    Returns the certificate and whether it had to be re-encoded. Only the two
    signature AlgorithmIdentifiers change; everything shown comes from the original.
    """
    try:
        return x509.load_der_x509_certificate(der), False
    except ValueError:
        pass
    tbs, _, _ = split_certificate(der)
    _, tbs_start, tbs_end = der_reader.read_tlv(tbs, 0, len(tbs))
    fields = der_reader.children(tbs, tbs_start, tbs_end)
    index = 2 if fields and fields[0][0] == 0xA0 else 1  # [version] serial signature …
    if len(fields) <= index:
        raise CertificateInspectionError("not a DER X.509 certificate")
    rebuilt = b"".join(
        _drop_ecdsa_null(tbs, at, stop) if i == index else tbs[at:stop]
        for i, (_, at, _, stop) in enumerate(fields)
    )
    _, cert_start, cert_end = der_reader.read_tlv(der, 0, len(der))
    outer = der_reader.children(der, cert_start, cert_end)
    fixed = der_reader.encode(
        0x30,
        der_reader.encode(0x30, rebuilt)
        + _drop_ecdsa_null(der, outer[1][1], outer[1][3])
        + der[outer[2][1] : outer[2][3]],
    )
    try:
        return x509.load_der_x509_certificate(fixed), True
    except ValueError as exc:
        raise CertificateInspectionError(f"not a usable X.509 certificate: {exc}") from None


def certificate_bytes(data: bytes) -> bytes:
    """DER or PEM input as DER; CertificateInspectionError when it is neither."""
    try:
        return der_reader.certificate_der(data)
    except der_reader.DerError as exc:
        raise CertificateInspectionError(str(exc)) from None


def key_type(cert: x509.Certificate) -> str:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown (cannot be parsed)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} ({key.curve.key_size} bits)"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def self_signature(cert: x509.Certificate, der: bytes) -> str:
    """Check the signature over the original TBS bytes with the certificate's own key."""
    tbs, _, signature = split_certificate(der)
    try:
        key = cert.public_key()
        algorithm = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return "not checked (unsupported key or algorithm)"
    if not isinstance(key, ec.EllipticCurvePublicKey) or algorithm is None:
        return "not checked (not an ECDSA certificate)"
    if not signature or signature[0] != 0:
        return "invalid"
    try:
        key.verify(signature[1:], tbs, ec.ECDSA(algorithm))
    except InvalidSignature:
        return "invalid"
    return "valid"


def quote_from_extensions(cert: x509.Certificate) -> tuple[bytes | None, str | None]:
    """The quote an RA-TLS verifier would look at, without checking the binding."""
    values = {ext.oid.dotted_string: ext.value for ext in cert.extensions}

    def raw(oid: x509.ObjectIdentifier) -> bytes | None:
        value = values.get(oid.dotted_string)
        return value.value if isinstance(value, x509.UnrecognizedExtension) else None

    tcg = raw(TCG_DICE_TAGGED_EVIDENCE_OID)
    if tcg is not None:
        try:
            decoded = cbor.loads(tcg, "TCG DICE evidence")
        except cbor.CborError:
            return None, "tcg-dice"
        if (
            isinstance(decoded, cbor.CBORTag)
            and decoded.tag == TEE_QUOTE_CBOR_TAG
            and isinstance(decoded.value, list | tuple)
            and decoded.value
            and isinstance(decoded.value[0], bytes)
        ):
            return bytes(decoded.value[0]), "tcg-dice"
        return None, "tcg-dice"
    for oid in (LEGACY_QUOTE_OID_GRAMINE, LEGACY_QUOTE_OID):
        quote = raw(oid)
        if quote is not None:
            return quote, "legacy"
    return None, None


def describe_certificate(cert: x509.Certificate, der: bytes, *, reencoded: bool) -> dict[str, Any]:
    """Subject, issuer, validity, key, self-signature and extensions, as JSON fields.

    Raises ValueError when the extensions cannot be parsed.
    """
    extensions = list(cert.extensions)
    out: dict[str, Any] = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial_number": format(cert.serial_number, "x"),
        "not_before": iso_utc(cert.not_valid_before_utc),
        "not_after": iso_utc(cert.not_valid_after_utc),
        "key_type": key_type(cert),
        "signature_algorithm": SIGNATURE_NAMES.get(
            cert.signature_algorithm_oid.dotted_string, cert.signature_algorithm_oid.dotted_string
        ),
        "self_signature": self_signature(cert, der),
        "certificate_sha256": hashlib.sha256(der).hexdigest(),
        "extensions": [
            {
                "oid": ext.oid.dotted_string,
                "name": EXTENSION_NAMES.get(ext.oid.dotted_string, "unknown"),
                "critical": ext.critical,
            }
            for ext in extensions
        ],
    }
    if reencoded:
        out["note"] = (
            "signature AlgorithmIdentifier carries explicit NULL parameters (Gramine built "
            "with mbedTLS < 3.5); accepted, as Gramine's verifier accepts it"
        )
    return out
