"""The committed simulated PKI: root, PCK CA, TCB signer and PCK, keys included.

INSECURE-SIMULATED: the private keys ship with teepsi in ``data/sim_pki.json``
(generated once by ``scripts/generate_sim_pki.py``); anyone can sign with them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def _data_file(name: str) -> bytes:
    return resources.files("teepsi.attestation").joinpath("data").joinpath(name).read_bytes()


#: The simulated root CA certificate (DER). Trusting it means trusting forgeries.
SIM_ROOT_CA_DER: bytes = _data_file("sim_root_ca.der")
#: SHA-256 of :data:`SIM_ROOT_CA_DER`, lowercase hex.
SIM_ROOT_CA_SHA256: str = hashlib.sha256(SIM_ROOT_CA_DER).hexdigest()


@dataclass(frozen=True)
class SimPki:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    pck_ca: x509.Certificate
    pck_ca_key: ec.EllipticCurvePrivateKey
    tcb_signing: x509.Certificate
    tcb_signing_key: ec.EllipticCurvePrivateKey
    pck: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    fmspc: str
    pce_id: str
    tcb_components: tuple[int, ...]
    pce_svn: int
    qe_mr_signer: bytes
    qe_isv_prod_id: int
    qe_isv_svn: int
    qe_attribute_flags: int
    qe_xfrm: int
    qe_misc_select: int

    @property
    def cpu_svn(self) -> bytes:
        return bytes(self.tcb_components)

    @property
    def pck_chain_pem(self) -> bytes:
        # Intel's QE NUL-terminates the chain; dcap-qvl copes with either.
        return b"".join(pem(c).encode() for c in (self.pck, self.pck_ca, self.root)) + b"\0"


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("simulated PKI keys must be EC keys")
    return key


@cache
def load_pki() -> SimPki:
    doc: dict[str, Any] = json.loads(_data_file("sim_pki.json"))
    certs = doc["certificates"]

    def cert(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(certs[name]["cert_pem"].encode())

    def key(name: str) -> ec.EllipticCurvePrivateKey:
        return _load_key(certs[name]["key_pem"])

    root = cert("root")
    if root.public_bytes(serialization.Encoding.DER) != SIM_ROOT_CA_DER:
        raise RuntimeError("sim_pki.json and sim_root_ca.der come from different runs")
    platform = doc["platform"]
    qe = doc["quoting_enclave"]
    return SimPki(
        root=root,
        root_key=key("root"),
        pck_ca=cert("pck_ca"),
        pck_ca_key=key("pck_ca"),
        tcb_signing=cert("tcb_signing"),
        tcb_signing_key=key("tcb_signing"),
        pck=cert("pck"),
        pck_key=key("pck"),
        fmspc=str(platform["fmspc"]).upper(),
        pce_id=str(platform["pce_id"]).upper(),
        tcb_components=tuple(int(v) for v in platform["sgx_tcb_components"]),
        pce_svn=int(platform["pce_svn"]),
        qe_mr_signer=bytes.fromhex(qe["mr_signer"]),
        qe_isv_prod_id=int(qe["isv_prod_id"]),
        qe_isv_svn=int(qe["isv_svn"]),
        qe_attribute_flags=int(qe["attribute_flags"]),
        qe_xfrm=int(qe["xfrm"]),
        qe_misc_select=int(qe["misc_select"]),
    )


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256/SHA-256 signature as DCAP stores it: r || s, 32 bytes each."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """x || y of the public key (the uncompressed SEC1 point without its 0x04 prefix)."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def make_crl(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    this_update: dt.datetime,
    next_update: dt.datetime,
    revoked_serials: tuple[int, ...] = (),
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
