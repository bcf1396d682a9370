"""Write the seed corpora of the fuzz harnesses into ``fuzz/corpus/<name>/``.

    python fuzz/make_corpus.py            # (re)write every corpus
    python fuzz/make_corpus.py ratls spec # only these

Seeds are small, valid (or nearly valid) inputs that reach deep into each parser, so the
fuzzer starts from the accepting paths instead of having to discover DER, CBOR or the
DCAP quote layout on its own. Keys are derived from fixed strings so that most seeds are
the same on every run; the ones carrying ECDSA signatures or simulated quotes (which use
fresh randomness) change, which does not matter for fuzzing.

Keep the committed corpora small (the whole ``fuzz/corpus`` tree stays under 100 KB):
long runs write what they discover into ``fuzz/work/<name>/`` (see docs/fuzzing.md).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity, sim_td_identity
from teepsi.attestation.policy import policy_for
from teepsi.attestation.ratls import (
    LEGACY_QUOTE_OID,
    SUBJECT,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    claims_for_key,
    create_certificate,
    report_data_for_key,
    tagged_evidence,
)
from teepsi.attestation.sim import SimEvidenceProvider, SimPlatform, SimTdxPlatform
from teepsi.contract.audit import AuditHead, AuditLog, HeadSigner
from teepsi.contract.party_keys import public_key_der, public_key_text
from teepsi.contract.receipt import PartyEntry, Receipt, sign_receipt
from teepsi.contract.spec import JobSpec
from teepsi.engine.records import records_to_bytes
from teepsi.protocol import teepsi_pb2 as pb

#: Validity of the small certificates (Gramine's own fixed one) and the time the simulated
#: server's certificate is made at: fuzz/fuzz_ratls.py judges every seed at a time inside both.
GRAMINE_NOT_BEFORE = datetime(2001, 1, 1, tzinfo=UTC)
GRAMINE_NOT_AFTER = datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
SIM_CERTIFICATE_MADE = datetime(2024, 1, 1, tzinfo=UTC)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
VECTORS = ROOT / "tests" / "vectors"

# A quote-shaped buffer as small as the layout allows: 48-byte header (version 3),
# 384-byte report body, then a zero signature length.
_QUOTE_HEADER = struct.pack("<HHI", 3, 2, 0) + bytes(40)
_REPORT_DATA_OFFSET = 48 + 320


def _small_quote(report_data: bytes) -> bytes:
    body = bytearray(384)
    body[320:384] = report_data
    return _QUOTE_HEADER + bytes(body) + struct.pack("<I", 0)


def _ec_key(label: str, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    secret = int.from_bytes(hashlib.sha512(label.encode()).digest(), "big")
    return ec.derive_private_key(secret % (2**250) + 1, curve)


def _ed_key(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def _certificate(key: ec.EllipticCurvePrivateKey, extensions: list[x509.ExtensionType]) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(GRAMINE_NOT_BEFORE)
        .not_valid_after(GRAMINE_NOT_AFTER)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# --- ratls -----------------------------------------------------------------------------


def ratls() -> dict[str, bytes]:
    sim = create_certificate(
        SimEvidenceProvider(sim_identity(Role.SERVER)), now=SIM_CERTIFICATE_MADE
    )
    p256 = _ec_key("fuzz ratls legacy", ec.SECP256R1())
    legacy = _certificate(
        p256,
        [
            x509.UnrecognizedExtension(
                LEGACY_QUOTE_OID, _small_quote(report_data_for_key(p256.public_key()))
            )
        ],
    )
    p384 = _ec_key("fuzz ratls tcg", ec.SECP384R1())
    claims = claims_for_key(p384.public_key())
    tcg_quote = _small_quote(hashlib.sha256(claims).digest() + bytes(32))
    evidence = tagged_evidence(tcg_quote, claims)
    tcg = _certificate(p384, [x509.UnrecognizedExtension(TCG_DICE_TAGGED_EVIDENCE_OID, evidence)])
    return {
        "sim_server.der": sim.certificate_der,
        "gramine_ratls_interop_2023.pem": (VECTORS / "gramine_ratls_interop_2023.pem").read_bytes(),
        "small_legacy_p256.der": legacy,
        "small_tcg_p384.der": tcg,
        "small_tcg_p384.pem": b"-----BEGIN CERTIFICATE-----\n"
        + base64.encodebytes(tcg)
        + b"-----END CERTIFICATE-----\n",
        # for the harness's second target, _check_claims with this same key
        "claims_p384.cbor": claims,
    }


# --- quote -----------------------------------------------------------------------------


def quote() -> dict[str, bytes]:
    platform = SimPlatform()
    return {
        "sim_data_provider": platform.quote(sim_identity(Role.DATA_PROVIDER), bytes(range(64))),
        "sgx_quote": (VECTORS / "sgx-dcap" / "sgx_quote").read_bytes(),
        "sim_tdx_server": SimTdxPlatform().quote(sim_td_identity(), bytes(range(64))),
        "tdx_quote": (VECTORS / "sgx-dcap" / "tdx_quote").read_bytes(),
        "header_only": _small_quote(bytes(64)),
    }


# --- policy ----------------------------------------------------------------------------


def _json(value: object, *, indent: int | None = 2) -> bytes:
    return json.dumps(value, indent=indent).encode() + b"\n"


def policy() -> dict[str, bytes]:
    sim = policy_for(
        [
            ("teepsi server (simulated)", sim_identity(Role.SERVER)),
            ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
        ]
    ).to_dict()
    seed_style = {  # Intel cczoo/psi's dynamic_config.json, as the seed ships it
        "verify_mr_enclave": "on",
        "verify_mr_signer": "on",
        "verify_isv_prod_id": "on",
        "verify_isv_svn": "on",
        "sgx_mrs": [
            {
                "mr_enclave": "a" * 64,
                "mr_signer": "B" * 64,
                "isv_prod_id": "0",
                "isv_svn": "0",
            }
        ],
    }
    booleans = {
        "_comment": "JSON booleans, integer ISV values, every allowance, notes",
        "verify_mr_enclave": True,
        "verify_mr_signer": False,
        "verify_isv_prod_id": True,
        "verify_isv_svn": False,
        "allow_outdated_tcb": "ON",
        "allow_hw_config_needed": False,
        "allow_sw_hardening_needed": "off",
        "sgx_mrs": [
            {"name": "one", "mr_enclave": "0" * 64, "isv_prod_id": 65535, "comment": "x"},
            {"mr_enclave": "f" * 64, "isv_prod_id": 7, "isv_svn": "00012"},
        ],
    }
    nothing = {
        "verify_mr_enclave": "off",
        "verify_mr_signer": "off",
        "verify_isv_prod_id": "off",
        "verify_isv_svn": "off",
        "sgx_mrs": [],
    }
    return {
        "sim.json": _json(sim),
        "seed_style.json": _json(seed_style),
        "booleans.json": b"\xef\xbb\xbf" + _json(booleans, indent=None),  # with a BOM
        "verify_nothing.json": _json(nothing, indent=None),
        "sim_tdx.json": _json(
            policy_for([], [("teepsi VM (simulated)", sim_td_identity())]).to_dict()
        ),
    }


# --- spec ------------------------------------------------------------------------------


def spec() -> dict[str, bytes]:
    bank_a = public_key_text(public_key_der(_ed_key("fuzz bank-a")))
    bank_b = public_key_text(public_key_der(_ed_key("fuzz bank-b")))
    insurer = public_key_text(public_key_der(_ec_key("fuzz insurer", ec.SECP256R1())))
    full_toml = f"""# every field
job_id = "q4-customer-overlap"
output = "intersection"
min_intersection = 2
max_items_per_party = 10000
normalize = "trim,casefold"
deadline = 2026-12-31T23:00:00Z
recipients = ["bank-a", "insurer"]

[[parties]]
name = "bank-a"
public_key = "{bank_a}"
attest = true

[[parties]]
name = "bank-b"
public_key = "{bank_b}"

[[parties]]
name = "insurer"
public_key = \"\"\"{insurer.strip()}\"\"\"
attest = false
"""
    minimal_toml = f"""job_id = "j"
[[parties]]
name = "a"
public_key = "{bank_a}"
[[parties]]
name = "b"
public_key = "{bank_b}"
"""
    as_json = {
        "version": 1,
        "job_id": "count-job",
        "output": "count",
        "normalize": "nfc,trim",
        "deadline": "2030-01-01T00:00:00Z",
        "_note": "ignored",
        "parties": [
            {"name": "bank-b", "public_key": bank_b},
            {"name": "insurer", "public_key": insurer, "attest": False},
        ],
    }
    canonical = JobSpec.parse(full_toml.encode(), source="seed", fmt="toml").canonical_bytes()
    return {
        "full.toml": full_toml.encode(),
        "minimal.toml": minimal_toml.encode(),
        "count.json": _json(as_json),
        "canonical.json": canonical,
    }


# --- upload ----------------------------------------------------------------------------


def _stream(*chunks: pb.UploadChunk) -> bytes:
    """The upload harness's stream form: each chunk as a u16 length and its protobuf bytes."""
    out = b""
    for chunk in chunks:
        message = chunk.SerializeToString()
        out += struct.pack("<H", len(message)) + message
    return out


def upload() -> dict[str, bytes]:
    import numpy as np

    hi = np.array([1, 2**64 - 1, 0x0123456789ABCDEF], dtype="<u8")
    lo = np.array([3, 0, 0xFEDCBA9876543210], dtype="<u8")
    records = records_to_bytes(hi, lo)
    # Every input goes through every decoder of the harness (see fuzz/fuzz_upload.py), so
    # these seeds mix the forms: one UploadChunk message, a raw payload after a count
    # byte, and a stream of length-prefixed chunks.
    return {
        "chunk_three_records": pb.UploadChunk(
            sequence=0, records=records, record_count=3, last=True
        ).SerializeToString(),
        "chunk_empty_last": pb.UploadChunk(sequence=0, last=True).SerializeToString(),
        "chunk_second": pb.UploadChunk(
            sequence=1, records=records[:16], record_count=1
        ).SerializeToString(),
        "raw_three_records": b"\x40" + records,
        "raw_count_off_by_one": b"\x41" + records,
        "stream_two_chunks": _stream(
            pb.UploadChunk(sequence=0, records=records, record_count=3),
            pb.UploadChunk(sequence=1, records=records[16:], record_count=2, last=True),
        ),
        "stream_out_of_order": _stream(
            pb.UploadChunk(sequence=1, records=records, record_count=3),
            pb.UploadChunk(sequence=0, last=True),
        ),
        "stream_no_last": _stream(pb.UploadChunk(sequence=0, records=records, record_count=3)),
    }


# --- receipt ---------------------------------------------------------------------------


def receipt() -> dict[str, bytes]:
    key = _ec_key("fuzz receipt server", ec.SECP384R1())
    parties = (
        PartyEntry("bank-a", 3, hashlib.sha256(b"a").digest()),
        PartyEntry("bank-b", 0, hashlib.sha256(b"b").digest()),
    )
    certificate_sha256 = hashlib.sha256(b"certificate").digest()
    released = Receipt(
        spec_sha256=hashlib.sha256(b"spec").digest(),
        job_id="q4",
        parties=parties,
        output="intersection",
        released=True,
        result_size=2,
        result_sha256=hashlib.sha256(b"result").digest(),
        issued_at=1767225600,
        certificate_sha256=certificate_sha256,
        audit_head=AuditHead(entries=7, hash=hashlib.sha256(b"head").hexdigest()),
    )
    held = Receipt(
        spec_sha256=b"",
        job_id="quick-job",
        parties=parties,
        output="count",
        released=False,
        result_size=None,
        result_sha256=None,
        issued_at=0,
        certificate_sha256=certificate_sha256,
    )
    return {
        "released.json": sign_receipt(released, key).to_json().encode() + b"\n",
        "held_back.json": sign_receipt(held, key).to_json().encode(),
    }


# --- audit -----------------------------------------------------------------------------


def audit() -> dict[str, bytes]:
    import tempfile

    key = _ec_key("fuzz audit server", ec.SECP384R1())
    signer = HeadSigner(_certificate(key, []), key)
    seeds: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, with_signer in (("signed.jsonl", True), ("unsigned.jsonl", False)):
            path = Path(tmp) / name
            with AuditLog(
                path, clock=lambda: 1767225600.5, signer=signer if with_signer else None
            ) as log:
                log.append("created", job_id="q4", parties=2, spec_sha256="ab" * 32, output="count")
                log.append("joined", job_id="q4", party="bank-a", attested=True)
                log.append("uploaded", job_id="q4", party="bank-a", records=3, set_sha256="cd" * 32)
                log.append(
                    "released", job_id="q4", output="count", threshold_met=True, result_sha256=None
                )
                log.sign_head()
                log.append("delivered", job_id="q4")
            seeds[name] = path.read_bytes()
    return seeds


MAKERS: dict[str, Callable[[], dict[str, bytes]]] = {
    "ratls": ratls,
    "quote": quote,
    "policy": policy,
    "spec": spec,
    "upload": upload,
    "receipt": receipt,
    "audit": audit,
}


def write(name: str, corpus_root: Path = CORPUS) -> list[Path]:
    """Replace ``corpus_root/name`` with freshly made seeds; returns the files written."""
    directory = corpus_root / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    written = []
    for filename, data in MAKERS[name]().items():
        path = directory / filename
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(MAKERS))
    parser.add_argument("--out", type=Path, default=CORPUS, help="corpus root (fuzz/corpus)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(MAKERS))
    if unknown:
        parser.error(f"unknown corpus {unknown[0]!r}: choose from {', '.join(MAKERS)}")
    total = 0
    for name in args.names or list(MAKERS):
        for path in write(name, args.out):
            total += path.stat().st_size
            print(path)
    print(f"{total} bytes of seeds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
