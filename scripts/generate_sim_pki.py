"""Generate the fixed, deliberately PUBLIC PKI of teepsi's simulated SGX DCAP platform.

Run once (from the repository root) and commit the outputs::

    PYTHONPATH=src python scripts/generate_sim_pki.py

It writes into ``src/teepsi/attestation/data/``:

``sim_root_ca.der``
    The simulated root CA certificate (DER). Verifiers that run with
    ``--allow-simulated`` hand it to ``dcap_qvl.verify_with_root_ca`` in place of
    Intel's SGX Root CA.
``sim_pki.json``
    Every certificate of the simulated PKI (PEM) *with its private key* (PKCS#8 PEM),
    plus the platform's fixed TCB values (FMSPC, PCE-ID, CPUSVN, PCESVN, PPID,
    SGX type) and the simulated Quoting Enclave's identity.

The PKI is shaped like Intel's: a self-signed root CA, a "PCK Processor CA" issuing
the platform's PCK leaf certificate (carrying the Intel SGX extension, OID
1.2.840.113741.1.13.1), and a "TCB Signing" certificate that signs TCB info and QE
identity documents. TCB info, QE identity and both CRLs are not generated here:
:mod:`teepsi.attestation.sim` signs them at runtime with these keys. The simulated
TDX platform uses the same PKI (as a real TDX host has one PCK certificate for both):
its TDX TCB info and TD_QE identity are signed by the same TCB Signing key, and its TD
quoting enclave's report by the same PCK key, so nothing here changes for TDX.

The private keys are committed on purpose. Anyone can mint simulated evidence, so
simulated quotes prove nothing about any hardware; that is why they are only
accepted when a verifier opts in explicitly. Every subject name says
"INSECURE-SIMULATED".

Re-running the script produces a new, incompatible PKI (new keys): every party must
then use the same build of teepsi.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DATA_DIR = Path(__file__).resolve().parent.parent / "src" / "teepsi" / "attestation" / "data"

NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
# Intel's root CA also ends in 2049; later dates would need GeneralizedTime.
NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)

ORG = "teepsi simulation (NOT Intel)"

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"

# The simulated platform's TCB as its PCK certificate states it. The values look like
# a real Ice Lake server's but the FMSPC is one Intel does not use.
FMSPC = "00E0AA000000"
PCE_ID = "0000"
SGX_TCB_COMPONENTS = (7, 7, 3, 3, 255, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
PCE_SVN = 13
SGX_TYPE = 0  # Standard

# The simulated Quoting Enclave. MRSIGNER is not Intel's: it is a hash of a label, so
# a simulated QE can never be mistaken for Intel's.
QE: dict[str, int] = {
    "isv_prod_id": 1,
    "isv_svn": 8,
    "attribute_flags": 0x11,  # INIT | PROVISION_KEY, as Intel's QE
    "xfrm": 0xE7,
    "misc_select": 0,
}


# --- A minimal DER writer: just what the SGX extension needs. ---


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_int_content(value: int) -> bytes:
    if value < 0:
        raise ValueError("only non-negative integers are needed")
    # One extra byte keeps the sign bit clear (DER INTEGER is two's complement).
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _seq(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def _entry(oid: str, value: bytes) -> bytes:
    return _seq(_der_oid(oid), value)


def sgx_extension_value(ppid: bytes) -> bytes:
    """DER of Intel's SGX extension for a Processor-CA PCK certificate."""
    base = SGX_EXTENSION_OID
    # Components .2.1 to .2.16 are the CPUSVN bytes one by one, .2.17 the PCESVN and
    # .2.18 the CPUSVN again as a 16-byte string (the form verifiers read).
    tcb_entries = [
        _entry(f"{base}.2.{i + 1}", _der(0x02, _der_int_content(svn)))
        for i, svn in enumerate(SGX_TCB_COMPONENTS)
    ]
    tcb_entries.append(_entry(f"{base}.2.17", _der(0x02, _der_int_content(PCE_SVN))))
    tcb_entries.append(_entry(f"{base}.2.18", _der(0x04, bytes(SGX_TCB_COMPONENTS))))
    return _seq(
        _entry(f"{base}.1", _der(0x04, ppid)),
        _entry(f"{base}.2", _seq(*tcb_entries)),
        _entry(f"{base}.3", _der(0x04, bytes.fromhex(PCE_ID))),
        _entry(f"{base}.4", _der(0x04, bytes.fromhex(FMSPC))),
        _entry(f"{base}.5", _der(0x0A, _der_int_content(SGX_TYPE))),
    )


# --- Certificates ---


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        ]
    )


def _key_usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=sign,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    subject: x509.Name,
    subject_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    path_length: int | None,
    extra: list[x509.ExtensionType] | None = None,
) -> x509.Certificate:
    is_ca = path_length is not None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()),
            critical=False,
        )
        .add_extension(_key_usage(sign=not is_ca, ca=is_ca), critical=True)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
    )
    for ext in extra or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def main() -> None:
    keys = {
        name: ec.generate_private_key(ec.SECP256R1()) for name in ("root", "pck_ca", "tcb", "pck")
    }
    root_name = _name("teepsi INSECURE-SIMULATED SGX Root CA")
    pck_ca_name = _name("teepsi INSECURE-SIMULATED SGX PCK Processor CA")
    tcb_name = _name("teepsi INSECURE-SIMULATED SGX TCB Signing")
    pck_name = _name("teepsi INSECURE-SIMULATED SGX PCK Certificate")

    ppid = secrets.token_bytes(16)
    root = _issue(root_name, keys["root"], root_name, keys["root"], path_length=1)
    pck_ca = _issue(pck_ca_name, keys["pck_ca"], root_name, keys["root"], path_length=0)
    tcb = _issue(tcb_name, keys["tcb"], root_name, keys["root"], path_length=None)
    sgx_ext = x509.UnrecognizedExtension(
        x509.ObjectIdentifier(SGX_EXTENSION_OID), sgx_extension_value(ppid)
    )
    pck = _issue(
        pck_name, keys["pck"], pck_ca_name, keys["pck_ca"], path_length=None, extra=[sgx_ext]
    )

    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"teepsi INSECURE-SIMULATED Quoting Enclave signer")
    qe: dict[str, int | str] = {**QE, "mr_signer": digest.finalize().hex().upper()}

    certs = {"root": root, "pck_ca": pck_ca, "tcb_signing": tcb, "pck": pck}
    key_of = {"root": "root", "pck_ca": "pck_ca", "tcb_signing": "tcb", "pck": "pck"}
    document = {
        "warning": (
            "INSECURE-SIMULATED: these private keys are public on purpose. Evidence "
            "made with them proves nothing; accept it only with --allow-simulated."
        ),
        "certificates": {
            name: {"cert_pem": _pem(cert), "key_pem": _key_pem(keys[key_of[name]])}
            for name, cert in certs.items()
        },
        "platform": {
            "fmspc": FMSPC,
            "pce_id": PCE_ID,
            "sgx_tcb_components": list(SGX_TCB_COMPONENTS),
            "pce_svn": PCE_SVN,
            "sgx_type": SGX_TYPE,
            "ppid": ppid.hex(),
        },
        "quoting_enclave": qe,
    }
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    (DATA_DIR / "sim_root_ca.der").write_bytes(root.public_bytes(serialization.Encoding.DER))
    (DATA_DIR / "sim_pki.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {DATA_DIR / 'sim_root_ca.der'} and {DATA_DIR / 'sim_pki.json'}")


if __name__ == "__main__":
    main()
