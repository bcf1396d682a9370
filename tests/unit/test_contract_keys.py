"""Party keys: files, the spec's text forms, signatures; refused key types."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from teepsi.contract.party_keys import (
    PartyKeyError,
    PartyPrivateKey,
    canonical_public_key_der,
    generate_private_key,
    load_private_key,
    parse_public_key,
    private_key_pem,
    public_key_der,
    public_key_text,
    sign,
    verify,
)


def _pem_private(
    key: PrivateKeyTypes, fmt: serialization.PrivateFormat, password: bytes | None = None
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def _pem_public(key: PublicKeyTypes) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def test_generate_write_load_round_trip(tmp_path: Path) -> None:
    key = generate_private_key()
    pem = private_key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    path = tmp_path / "bank-a.key"
    path.write_bytes(pem)
    loaded = load_private_key(path)
    assert isinstance(loaded, ed25519.Ed25519PrivateKey)
    assert public_key_der(loaded) == public_key_der(key)
    assert len(public_key_der(key)) == 44  # Ed25519 SPKI


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_ec_keys_load_from_pkcs8_and_sec1(
    tmp_path: Path, curve: ec.EllipticCurve, fmt: serialization.PrivateFormat
) -> None:
    key = ec.generate_private_key(curve)
    path = tmp_path / "org.key"
    # openssl ecparam -genkey writes an EC PARAMETERS block first
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    path.write_bytes(
        (params if fmt is serialization.PrivateFormat.TraditionalOpenSSL else b"")
        + _pem_private(key, fmt)
    )
    loaded = load_private_key(path)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert public_key_der(loaded) == public_key_der(key)


def test_private_key_refusals(tmp_path: Path) -> None:
    def refused(name: str, data: bytes | None) -> str:
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(PartyKeyError) as info:
            load_private_key(path)
        message = str(info.value)
        assert "\n" not in message
        return message

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p521 = ec.generate_private_key(ec.SECP521R1())
    ed = generate_private_key()
    assert refused("bank-a.key", b"hello\n") == f"{tmp_path}/bank-a.key: not a PEM private key"
    assert refused("missing.key", None).startswith(f"{tmp_path}/missing.key: cannot read: ")
    assert refused("rsa.key", _pem_private(rsa_key, serialization.PrivateFormat.PKCS8)) == (
        f"{tmp_path}/rsa.key: RSA keys are not accepted: use Ed25519 or EC P-256/P-384"
    )
    assert refused("p521.key", _pem_private(p521, serialization.PrivateFormat.PKCS8)) == (
        f"{tmp_path}/p521.key: EC curve secp521r1 is not accepted: use P-256 or P-384"
    )
    assert (
        refused("enc.key", _pem_private(ed, serialization.PrivateFormat.PKCS8, password=b"secret"))
        == f"{tmp_path}/enc.key: the key is encrypted; teepsi needs an unencrypted PEM key"
    )
    assert refused("pub.key", _pem_public(ed.public_key()).encode()) == (
        f"{tmp_path}/pub.key: holds a public key; a private key is needed here"
    )
    assert refused("big.key", b"x" * 70_000).endswith("too large for a key file (over 64 KiB)")
    (tmp_path / "dir").mkdir()
    assert refused("dir", None).startswith(f"{tmp_path}/dir: cannot read: ")


def test_public_key_text_round_trips() -> None:
    ed = generate_private_key()
    ed_der = public_key_der(ed)
    ed_text = public_key_text(ed_der)
    assert ed_text == "ed25519:" + base64.b64encode(ed_der).decode()
    assert parse_public_key(ed_text) == ed_der
    assert parse_public_key(f"  {ed_text}\n") == ed_der
    # the PEM spelling of the same Ed25519 key is the same key
    assert parse_public_key(_pem_public(ed.public_key())) == ed_der

    for curve in (ec.SECP256R1(), ec.SECP384R1()):
        key = ec.generate_private_key(curve)
        der = public_key_der(key.public_key())
        text = public_key_text(der)
        assert text.startswith("-----BEGIN PUBLIC KEY-----")
        assert parse_public_key(text) == der


def test_compressed_ec_point_is_canonicalised() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    uncompressed_der = public_key_der(key)
    # SPKI (id-ecPublicKey, P-256) around the 33-byte compressed point
    prefix = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
    compressed = prefix + point
    assert compressed != uncompressed_der
    assert canonical_public_key_der(compressed) == uncompressed_der
    pem = (
        "-----BEGIN PUBLIC KEY-----\n"
        + base64.b64encode(compressed).decode()
        + "\n-----END PUBLIC KEY-----"
    )
    assert parse_public_key(pem) == uncompressed_der


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'expected "ed25519:<base64>" or a PEM PUBLIC KEY block'),
        ("MCowBQYDK2VwAyEA", 'expected "ed25519:<base64>" or a PEM PUBLIC KEY block'),
        ("ed25519:not base64!", "ed25519: key is not valid base64"),
        (
            "ed25519:" + base64.b64encode(b"\x30\x03\x02\x01\x01").decode(),
            "not a DER SubjectPublicKeyInfo public key",
        ),
        (
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
            "not a valid PEM public key",
        ),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
            "expected exactly one PEM PUBLIC KEY block",
        ),
    ],
)
def test_parse_public_key_refusals(text: str, message: str) -> None:
    with pytest.raises(PartyKeyError, match="^" + re.escape(message) + "$"):
        parse_public_key(text)


def test_parse_public_key_refuses_rsa_other_curves_and_mislabelled_keys() -> None:
    rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with pytest.raises(PartyKeyError, match=r"^not an Ed25519 or EC public key$"):
        parse_public_key(_pem_public(rsa_public))
    rsa_der = rsa_public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(PartyKeyError, match=r"^not an Ed25519 or EC public key$"):
        parse_public_key("ed25519:" + base64.b64encode(rsa_der).decode())
    with pytest.raises(PartyKeyError, match=r"^not an Ed25519 or EC public key$"):
        public_key_text(rsa_der)
    p521 = ec.generate_private_key(ec.SECP521R1()).public_key()
    with pytest.raises(PartyKeyError, match="secp521r1 is not accepted"):
        parse_public_key(_pem_public(p521))
    ec_der = public_key_der(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(PartyKeyError, match="holds a key of another type"):
        parse_public_key("ed25519:" + base64.b64encode(ec_der).decode())
    two = _pem_public(generate_private_key().public_key()) * 2
    with pytest.raises(PartyKeyError, match="exactly one PEM PUBLIC KEY block"):
        parse_public_key(two)


@pytest.mark.parametrize(
    "make",
    [
        generate_private_key,
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
)
def test_sign_and_verify(make: Callable[[], PartyPrivateKey]) -> None:
    key = make()
    other = make()
    der = public_key_der(key)
    signature = sign(key, b"join transcript")
    assert verify(der, signature, b"join transcript")
    assert not verify(der, signature, b"join transcript!")
    assert not verify(public_key_der(other), signature, b"join transcript")
    assert not verify(der, b"", b"join transcript")
    assert not verify(der, b"\x00" * 64, b"join transcript")
    assert not verify(der, signature[:-1] + bytes([signature[-1] ^ 1]), b"join transcript")


def test_ec_signatures_use_sha256_whatever_the_curve() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    signature = sign(key, b"m")
    key.public_key().verify(signature, b"m", ec.ECDSA(hashes.SHA256()))


def test_verify_refuses_unusable_public_keys() -> None:
    with pytest.raises(PartyKeyError):
        verify(b"garbage", b"sig", b"m")
    rsa_der = public_key_der_rsa()
    with pytest.raises(PartyKeyError):
        verify(rsa_der, b"sig", b"m")


def public_key_der_rsa() -> bytes:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
