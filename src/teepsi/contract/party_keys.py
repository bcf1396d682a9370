"""Party keys: the long-term keys a job spec lists, and signatures made with them.

A party proves it is the organisation the spec names by signing its join transcript
with the private key whose public half is in the spec. Accepted keys:

* Ed25519 (what ``teepsi keygen`` makes), written in a spec as ``ed25519:`` followed by
  the base64 of its DER SubjectPublicKeyInfo;
* ECDSA on P-256 or P-384 (keys an organisation may already hold in an HSM or PKI),
  written as a PEM ``PUBLIC KEY`` block. EC signatures always use SHA-256, whatever the
  curve, so a verifier never has to guess the hash.

RSA and other curves are refused. Public keys travel and are compared as canonical
SPKI DER (re-encoded by ``cryptography``), so two spellings of one key are one key.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from teepsi.errors import TeepsiError

__all__ = [
    "ED25519_PREFIX",
    "PartyKeyError",
    "PartyPrivateKey",
    "PartyPublicKey",
    "canonical_public_key_der",
    "generate_private_key",
    "load_private_key",
    "parse_public_key",
    "private_key_pem",
    "public_key_der",
    "public_key_text",
    "sign",
    "verify",
]

PartyPrivateKey: TypeAlias = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PartyPublicKey: TypeAlias = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

ED25519_PREFIX = "ed25519:"

# curve name (as cryptography reports it) -> the name people know it by
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}

# A PEM key file is a few hundred bytes; refusing big files keeps a typo'd path
# (a data file, say) from being read whole.
_MAX_KEY_FILE_BYTES = 64 * 1024

_EC_SIGNATURE = ec.ECDSA(hashes.SHA256())


class PartyKeyError(TeepsiError, ValueError):
    """A key is unreadable, malformed or of a refused type; the message is one line."""


def _check_curve(curve: ec.EllipticCurve) -> None:
    if curve.name not in _CURVES:
        raise PartyKeyError(f"EC curve {curve.name} is not accepted: use P-256 or P-384")


def _checked_public(key: object) -> PartyPublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        _check_curve(key.curve)
        return key
    raise PartyKeyError("not an Ed25519 or EC public key")


def _spki(key: PartyPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_der(der: bytes) -> PartyPublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise PartyKeyError("not a DER SubjectPublicKeyInfo public key") from None
    return _checked_public(key)


def canonical_public_key_der(der: bytes) -> bytes:
    """``der`` re-encoded canonically (e.g. an EC point uncompressed); checks the type."""
    return _spki(_load_der(der))


def generate_private_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def private_key_pem(key: PartyPrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: protect the file with its permissions."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(path: str | Path) -> PartyPrivateKey:
    """An Ed25519 or EC (P-256/P-384) private key from a PKCS#8 or SEC1 PEM file."""
    where = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise PartyKeyError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise PartyKeyError(f"{where}: too large for a key file (over 64 KiB)")
    if b"-----BEGIN PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise PartyKeyError(f"{where}: holds a public key; a private key is needed here")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying "encrypted, and no password given"
        raise PartyKeyError(
            f"{where}: the key is encrypted; teepsi needs an unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PartyKeyError(f"{where}: not a PEM private key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        try:
            _check_curve(key.curve)
        except PartyKeyError as exc:
            raise PartyKeyError(f"{where}: {exc}") from None
        return key
    kind = type(key).__name__.removeprefix("_").removesuffix("PrivateKey") or "this"
    raise PartyKeyError(f"{where}: {kind} keys are not accepted: use Ed25519 or EC P-256/P-384")


def public_key_der(key: PartyPrivateKey | PartyPublicKey) -> bytes:
    """The SubjectPublicKeyInfo DER of a private key's public half, or of a public key."""
    public: object = key
    if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        public = key.public_key()
    return _spki(_checked_public(public))


def public_key_text(public_der: bytes) -> str:
    """How a spec writes the key: ``ed25519:<base64 SPKI>``, or PEM for EC keys."""
    key = _load_der(public_der)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ED25519_PREFIX + base64.b64encode(_spki(key)).decode("ascii")
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii")


def parse_public_key(text: str) -> bytes:
    """The inverse of :func:`public_key_text`: canonical SPKI DER of an accepted key."""
    text = text.strip()
    if text.startswith(ED25519_PREFIX):
        try:
            der = base64.b64decode(text[len(ED25519_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise PartyKeyError("ed25519: key is not valid base64") from None
        key = _load_der(der)
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise PartyKeyError("ed25519: form holds a key of another type; use PEM for EC")
        return _spki(key)
    if text.startswith("-----BEGIN"):
        # Exactly one PUBLIC KEY block: no certificates (whose key would be trusted
        # without anyone looking at the certificate) and no text smuggled around it.
        if (
            not text.startswith("-----BEGIN PUBLIC KEY-----")
            or not text.endswith("-----END PUBLIC KEY-----")
            or text.count("-----BEGIN") != 1
        ):
            raise PartyKeyError("expected exactly one PEM PUBLIC KEY block")
        try:
            loaded = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnsupportedAlgorithm):
            raise PartyKeyError("not a valid PEM public key") from None
        return _spki(_checked_public(loaded))
    raise PartyKeyError('expected "ed25519:<base64>" or a PEM PUBLIC KEY block')


def sign(key: PartyPrivateKey, message: bytes) -> bytes:
    """Ed25519, or ECDSA with SHA-256 (DER-encoded signature) for EC keys."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        _check_curve(key.curve)
        return key.sign(message, _EC_SIGNATURE)
    raise PartyKeyError("not an Ed25519 or EC private key")


def verify(public_der: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` over ``message`` verifies under the key ``public_der``.

    Any malformed signature is simply False. A ``public_der`` that is not an accepted
    key raises :class:`PartyKeyError`: spec keys are validated when the spec is read, so
    that is a caller's bug rather than a forged signature.
    """
    key = _load_der(public_der)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, _EC_SIGNATURE)
    except (InvalidSignature, ValueError):
        return False
    return True
