"""The evidence tools: ``verify-quote``, ``inspect-cert``, ``fetch-collateral``."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.ratls import SUBJECT, create_certificate
from teepsi.attestation.sim import SimEvidenceProvider, SimPlatform, SimPlatformConfig
from teepsi.cli.evidence import register

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
DCAP = VECTORS / "sgx-dcap"
GRAMINE_CERT = VECTORS / "gramine_ratls_interop_2023.pem"
PINNED = "1750330631"
SGX_MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
GRAMINE_MR_ENCLAVE = "0866e7ca11b9f4efe4bf39b2607f4e1299f111920d96d95719080f01b62b7585"
RATLS_OIDS = {"0.6.9.42.840.113741.1337.6", "2.23.133.5.4.9"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Run one evidence command in-process: (exit code, parsed stdout JSON or None, stderr)."""
    parser = argparse.ArgumentParser(prog="teepsi")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def vq(capsys: pytest.CaptureFixture[str], name: str, *extra: str) -> tuple[int, Any, str]:
    return run(
        capsys,
        "verify-quote",
        str(DCAP / name),
        "--collateral",
        str(DCAP / f"{name}_collateral.json"),
        *extra,
    )


# --- verify-quote on real Intel quotes ------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "code"),
    [
        ((), 1),
        (("--allow-hw-config",), 1),
        (("--allow-sw-hardening",), 1),
        (("--allow-outdated",), 1),
        (("--allow-hw-config", "--allow-sw-hardening"), 0),
        (("--allow-hw-config", "--allow-sw-hardening", "--allow-outdated"), 0),
    ],
)
def test_sgx_vector_needs_both_flags(
    capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], code: int
) -> None:
    got, out, err = vq(capsys, "sgx_quote", "--at", PINNED, *flags)
    assert got == code
    assert out["status"] == "ConfigurationAndSWHardeningNeeded"
    assert out["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert out["tee_type"] == "SGX"
    assert out["mr_enclave"] == SGX_MR_ENCLAVE
    assert out["mr_signer"] == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    assert (out["isv_prod_id"], out["isv_svn"]) == (0, 0)
    assert out["attributes"] == "0500000000000000e700000000000000"
    assert out["verified"] is True and out["simulated"] is False
    assert out["accepted"] is (code == 0)
    if code:
        assert "--allow-hw-config and --allow-sw-hardening" in out["reason"]
    else:
        assert "reason" not in out
    assert err == ""


def test_tdx_vector_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vq(capsys, "tdx_quote", "--at", PINNED)
    assert code == 0
    assert out["status"] == "UpToDate" and out["tee_type"] == "TDX"
    assert out["verified"] and out["accepted"]
    assert out["mr_enclave"] is None and len(out["mr_td"]) == 96


def test_tdx_outdated_vector_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vq(capsys, "tdx_quote_outdated", "--at", "1771500000", "--allow-outdated")
    assert code == 1
    assert out["verified"] is False and out["accepted"] is False and out["status"] is None
    assert "No matching TCB level" in out["reason"]


@pytest.mark.parametrize("name", ["sgx_quote", "tdx_quote", "tdx_quote_outdated"])
def test_vectors_rejected_now_naming_the_expired_item(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    flags = ("--allow-hw-config", "--allow-sw-hardening", "--allow-outdated")
    code, out, _ = vq(capsys, name, *flags)
    assert code == 1 and out["verified"] is False
    reason = out["reason"]
    assert "\n" not in reason
    assert "CrlExpired" in reason
    assert "root CA CRL (Intel SGX Root CA) expired 2026-04-03" in reason


def test_expired_tcb_info_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vq(capsys, "sgx_quote", "--at", "1760000000")
    assert code == 1
    assert "TCBInfo expired" in out["reason"]
    assert "TCB info (SGX, FMSPC 00A067110000) expired 2025-07-19T10:56:11Z" in out["reason"]


def test_hex_quote_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    hex_quote = tmp_path / "quote.hex"
    hex_quote.write_text((DCAP / "sgx_quote").read_bytes().hex() + "\n")
    code, out, _ = run(
        capsys,
        "verify-quote",
        str(hex_quote),
        "--collateral",
        str(DCAP / "sgx_quote_collateral.json"),
        "--at",
        PINNED,
        "--allow-hw-config",
        "--allow-sw-hardening",
    )
    assert code == 0 and out["mr_enclave"] == SGX_MR_ENCLAVE


# --- verify-quote on simulated quotes it has never seen -------------------------------


def _sim_files(tmp_path: Path, **config: Any) -> tuple[Path, Path]:
    platform = SimPlatform(SimPlatformConfig(**config))
    quote = tmp_path / "quote.bin"
    quote.write_bytes(platform.quote(sim_identity(Role.DATA_PROVIDER), bytes(range(64))))
    collateral = tmp_path / "collateral.json"
    collateral.write_text(platform.collateral_json())
    return quote, collateral


def test_simulated_quote(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    quote, collateral = _sim_files(tmp_path)
    code, out, _ = run(capsys, "verify-quote", str(quote), "--collateral", str(collateral))
    assert code == 1 and "SIMULATED" in out["reason"] and out["simulated"] is True
    code, out, _ = run(
        capsys, "verify-quote", str(quote), "--collateral", str(collateral), "--allow-simulated"
    )
    assert code == 0 and out["status"] == "UpToDate" and out["simulated"] is True
    assert out["isv_prod_id"] == int(Role.DATA_PROVIDER)
    assert out["mr_enclave"] == sim_identity(Role.DATA_PROVIDER).mr_enclave.hex()
    assert out["report_data"] == bytes(range(64)).hex()


def test_simulated_outdated_needs_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    quote, collateral = _sim_files(tmp_path, tcb_status="OutOfDate", advisory_ids=("SIM-SA-1",))
    base = ("verify-quote", str(quote), "--collateral", str(collateral), "--allow-simulated")
    code, out, _ = run(capsys, *base)
    assert code == 1 and out["status"] == "OutOfDate" and "--allow-outdated" in out["reason"]
    code, out, _ = run(capsys, *base, "--allow-outdated")
    assert code == 0 and out["advisory_ids"] == ["SIM-SA-1"]


def test_revoked_pck_rejected(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    quote, collateral = _sim_files(tmp_path, revoke_pck=True)
    code, out, _ = run(
        capsys, "verify-quote", str(quote), "--collateral", str(collateral), "--allow-simulated"
    )
    assert code == 1 and out["verified"] is False and out["reason"]


# --- verify-quote: bad input ------------------------------------------------------------


@pytest.mark.parametrize(
    ("quote", "collateral", "expected"),
    [
        ("missing", "sgx_quote_collateral.json", "cannot read"),
        ("garbage", "sgx_quote_collateral.json", "not a DCAP quote"),
        ("cert", "sgx_quote_collateral.json", "use `teepsi inspect-cert`"),
        ("sgx_quote", "missing.json", "cannot read"),
        ("sgx_quote", "notjson", "invalid JSON"),
    ],
)
def test_verify_quote_unreadable_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, quote: str, collateral: str, expected: str
) -> None:
    (tmp_path / "garbage").write_bytes(b"\x07" * 700)
    (tmp_path / "notjson").write_text("{nope")
    (tmp_path / "cert").write_bytes(GRAMINE_CERT.read_bytes())

    def where(name: str) -> Path:
        return DCAP / name if (DCAP / name).exists() else tmp_path / name

    code, out, err = run(
        capsys, "verify-quote", str(where(quote)), "--collateral", str(where(collateral))
    )
    assert code == 2 and out is None
    assert err.startswith("teepsi verify-quote: error: ") and expected in err
    assert err.count("\n") == 1


def test_verify_quote_bad_at(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        vq(capsys, "sgx_quote", "--at", "yesterday")
    assert exc.value.code == 2


# --- inspect-cert -----------------------------------------------------------------------


def test_inspect_gramine_certificate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "inspect-cert", str(GRAMINE_CERT))
    assert code == 0
    assert out["subject"] == "C=US,O=GramineDevelopers,CN=RATLS"
    assert out["key_type"].startswith("EC secp384r1")
    assert out["not_before"] == "2001-01-01T00:00:00Z"
    assert {ext["oid"] for ext in out["extensions"]} >= RATLS_OIDS
    assert out["key_binding"]["holds"] is True
    assert out["key_binding"]["evidence"] == "tcg-dice"
    assert out["self_signature"] == "valid"
    quote = out["quote"]
    assert quote["mr_enclave"] == GRAMINE_MR_ENCLAVE
    assert quote["debug"] is True and "DEBUG" in quote["attribute_flags"]
    assert quote["simulated"] is False and len(quote["report_data"]) == 128
    # The same certificate in DER gives the same answer.
    # (cryptography refuses this certificate, so the PEM is unwrapped by hand.)
    pem = GRAMINE_CERT.read_bytes()
    body = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END", pem, re.DOTALL)
    assert body is not None
    der_path = tmp_path / "cert.der"
    der_path.write_bytes(base64.b64decode(b"".join(body.group(1).split())))
    code2, out2, _ = run(capsys, "inspect-cert", str(der_path))
    assert code2 == 0 and out2["certificate_sha256"] == out["certificate_sha256"]


def test_inspect_simulated_certificate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ratls = create_certificate(SimEvidenceProvider(sim_identity(Role.SERVER)))
    path = tmp_path / "server.pem"
    path.write_bytes(ratls.certificate_pem)
    code, out, _ = run(capsys, "inspect-cert", str(path))
    assert code == 0 and out["key_binding"]["holds"] is True
    assert out["quote"]["simulated"] is True
    assert out["quote"]["isv_prod_id"] == int(Role.SERVER)
    assert "note" not in out  # cryptography parses our own certificates directly


def test_inspect_certificate_whose_quote_binds_another_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    genuine = create_certificate(SimEvidenceProvider(sim_identity(Role.SERVER)))
    parsed = x509.load_der_x509_certificate(genuine.certificate_der)
    other_key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(other_key.public_key())
        .serial_number(1)
        .not_valid_before(parsed.not_valid_before_utc)
        .not_valid_after(parsed.not_valid_after_utc)
    )
    for ext in parsed.extensions:
        if ext.oid.dotted_string in RATLS_OIDS:
            builder = builder.add_extension(ext.value, critical=False)
    forged = builder.sign(other_key, hashes.SHA256())
    path = tmp_path / "forged.pem"
    path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    code, out, _ = run(capsys, "inspect-cert", str(path))
    assert code == 1
    assert out["key_binding"]["holds"] is False
    assert "pubkey-hash does not match" in out["key_binding"]["reason"]
    assert out["quote"]["mr_enclave"] == sim_identity(Role.SERVER).mr_enclave.hex()


def test_inspect_certificate_without_evidence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2034, 1, 1, tzinfo=dt.UTC))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "plain.der"
    path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    code, out, _ = run(capsys, "inspect-cert", str(path))
    assert code == 1 and out["quote"] is None
    assert "no RA-TLS evidence extension" in out["key_binding"]["reason"]


@pytest.mark.parametrize("content", [None, b"hello", b"\x30\x03\x02\x01\x01"])
def test_inspect_unreadable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "input"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(capsys, "inspect-cert", str(path))
    assert code == 2 and out is None
    assert err.startswith("teepsi inspect-cert: error: ") and err.count("\n") == 1


# --- fetch-collateral -------------------------------------------------------------------


# --- through `python -m teepsi` -----------------------------------------------------------
