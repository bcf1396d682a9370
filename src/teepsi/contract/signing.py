"""ECDSA signatures of the server's attested key, one way for every signed document.

Receipts and signed audit-log heads are signed with the server's RA-TLS key (P-384, or
P-256), ECDSA with SHA-384, each over a domain label followed by canonical JSON, so a
signature made for one kind of document never passes for another. Signatures are
canonical DER with a low S: ECDSA is otherwise malleable ((r, n - s) verifies too), and a
document has exactly one valid encoding.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

# ratls parses certificates with its own DER walker (cryptography refuses some
# Gramine-made ones); reuse it so "the certificate's SHA-256" means the same thing
# in receipts and audit logs as in attestation.
from teepsi.attestation.ratls import RaTlsError, _certificate_der, _parse_certificate
from teepsi.errors import TeepsiError

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "SignatureError",
    "certificate_public_key",
    "sign_document",
    "verify_document",
]

MAX_SIGNATURE_BYTES = 256
_SIGNATURE_HASH = hashes.SHA384()

# Group orders, for the low-S rule.
_CURVE_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


class SignatureError(TeepsiError, ValueError):
    """A key, certificate or signature is unusable or does not verify; one line."""


def _curve_order(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> int:
    order = _CURVE_ORDERS.get(key.curve.name)
    if order is None:
        raise SignatureError(f"server key curve {key.curve.name} is not P-256 or P-384")
    return order


def sign_document(
    private_key: ec.EllipticCurvePrivateKey, payload: bytes, *, what: str = "documents"
) -> bytes:
    """ECDSA-SHA384 over ``payload`` (domain label included), normalised to low S."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise SignatureError(f"{what} are signed with the server's EC RA-TLS key")
    order = _curve_order(private_key)
    r, s = decode_dss_signature(private_key.sign(payload, ec.ECDSA(_SIGNATURE_HASH)))
    if s > order // 2:
        s = order - s
    return encode_dss_signature(r, s)


def certificate_public_key(certificate: bytes) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """(SHA-256 of the certificate DER, its EC public key), for PEM or DER input."""
    if not isinstance(certificate, bytes | bytearray):
        raise SignatureError("certificate must be PEM or DER bytes")
    try:
        der = _certificate_der(bytes(certificate))
        spki = _parse_certificate(der).spki_der
    except RaTlsError as exc:
        raise SignatureError(f"certificate: {exc}") from None
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError("certificate: public key cannot be parsed") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError("certificate: public key is not an EC key; no teepsi server's")
    return hashlib.sha256(der).digest(), key


def verify_document(
    key: ec.EllipticCurvePublicKey, signature: bytes, payload: bytes, *, what: str
) -> None:
    """Check a canonical low-S signature over ``payload``; ``what`` names it in errors."""
    order = _curve_order(key)
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        raise SignatureError(f"{what} is not a DER ECDSA signature") from None
    canonical = encode_dss_signature(r, s) == signature
    if not canonical or not (0 < r < order and 0 < s <= order // 2):
        raise SignatureError(f"{what} is not a canonical low-S ECDSA signature")
    try:
        key.verify(signature, payload, ec.ECDSA(_SIGNATURE_HASH))
    except InvalidSignature:
        raise SignatureError(f"{what} does not verify under this certificate") from None
