"""``teepsi verify-receipt`` and ``inspect-cert``: the one verification path, offline.

A receipt is only as good as the attestation of the certificate that signed it, so the
certificate goes through the live client's path (quote signatures, QE report, PCK chain
to a root, binding, role, policy) as of the receipt's issue time.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.peer import PeerRejected, PeerVerifier
from teepsi.attestation.policy import MeasurementEntry, Policy, TcbAllowances, policy_for
from teepsi.attestation.quote import parse_quote
from teepsi.attestation.ratls import (
    LEGACY_QUOTE_OID_GRAMINE,
    MAX_LIFETIME,
    SUBJECT,
    RaTlsCertificate,
    create_certificate,
)
from teepsi.attestation.sim import SimEvidenceProvider, SimPlatform, SimPlatformConfig
from teepsi.cli import main
from teepsi.contract.receipt import ReceiptError, SignedReceipt
from tests.support.forgery import forged_certificate, forged_quote, receipt_for

VECTORS = Path(__file__).parent.parent / "vectors"
SGX_QUOTE = VECTORS / "sgx-dcap" / "sgx_quote"
SGX_COLLATERAL = VECTORS / "sgx-dcap" / "sgx_quote_collateral.json"
SGX_PINNED = 1750330631  # ORIGIN.md: ConfigurationAndSWHardeningNeeded at this time
GRAMINE_CERT = VECTORS / "gramine_ratls_interop_2023.pem"
DAY = 24 * 3600


def _sim_policy() -> Policy:
    return policy_for(
        [
            ("teepsi server (simulated)", sim_identity(Role.SERVER)),
            ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
        ]
    )


def _server_entry(policy: Policy) -> MeasurementEntry:
    return next(e for e in policy.entries if e.isv_prod_id == Role.SERVER)


def _save(
    folder: Path, certificate: RaTlsCertificate | bytes, signed: SignedReceipt, collateral: str
) -> Path:
    """Lay the files out as the client saves them: RECEIPT, .cert.pem, .collateral.json."""
    receipt = folder / "job.receipt.json"
    receipt.write_text(signed.to_json() + "\n")
    pem = certificate.certificate_pem if isinstance(certificate, RaTlsCertificate) else certificate
    Path(f"{receipt}.cert.pem").write_bytes(pem)
    Path(f"{receipt}.collateral.json").write_text(collateral)
    return receipt


def _policy_file(folder: Path, policy: Policy) -> Path:
    path = folder / "dynamic_config.json"
    path.write_text(json.dumps(policy.to_dict()))
    return path


def _verify(
    capsys: pytest.CaptureFixture[str], receipt: str, *args: str
) -> tuple[int, dict[str, object]]:
    # --cert explicitly (it defaults to RECEIPT.cert.pem); the collateral by its default.
    code = main(["verify-receipt", receipt, "--cert", f"{receipt}.cert.pem", *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


# --- the forger ------------------------------------------------------------------------


def test_forged_receipt_is_refused_in_every_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zeroed signatures, no PCK chain, a measurement copied from the public policy."""
    policy = _sim_policy()
    certificate = forged_certificate(_server_entry(policy))
    # The forger hands over the best collateral there is: genuine, current, simulated.
    receipt = _save(
        tmp_path, certificate, receipt_for(certificate), SimPlatform().collateral_json()
    )
    config = str(_policy_file(tmp_path, policy))
    for extra in (
        [],
        ["--config", config],
        ["--allow-simulated"],
        ["--config", config, "--allow-simulated"],
    ):
        code, out = _verify(capsys, str(receipt), *extra)
        assert code == 1, (extra, out)
        assert out["valid"] is False
        assert "quote verification failed" in str(out["reason"]), out


def test_forged_quote_is_refused_by_the_live_path_too() -> None:
    """The same forgery, as a live client would meet it: refused before any policy."""
    certificate = forged_certificate(_server_entry(_sim_policy()))
    verifier = PeerVerifier(_sim_policy(), allow_simulated=True)
    with pytest.raises(PeerRejected, match="quote verification failed"):
        verifier.verify_certificate(certificate.certificate_der, SimPlatform().collateral_json())


def test_inspect_cert_says_the_forged_quote_did_not_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certificate = forged_certificate(_server_entry(_sim_policy()))
    cert = tmp_path / "forged.pem"
    cert.write_bytes(certificate.certificate_pem)
    collateral = tmp_path / "collateral.json"
    collateral.write_text(SimPlatform().collateral_json())
    assert main(["inspect-cert", str(cert)]) == 0  # structure only: the binding holds
    out = json.loads(capsys.readouterr().out)
    assert out["key_binding"]["holds"] is True
    assert out["quote_verification"]["verified"] is False
    assert "no --collateral given" in out["quote_verification"]["reason"]
    code = main(["inspect-cert", str(cert), "--collateral", str(collateral), "--allow-simulated"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert out["quote_verification"]["verified"] is False
    assert out["quote_verification"]["root"] is None
    assert "quote verification failed" in out["quote_verification"]["reason"]


# --- genuine simulated receipts ----------------------------------------------------------


def _sim_server(
    platform: SimPlatform | None = None, *, made_at: int | None = None
) -> tuple[RaTlsCertificate, str]:
    provider = SimEvidenceProvider(sim_identity(Role.SERVER), platform)
    if made_at is None:
        certificate = create_certificate(provider)
    else:  # a server started then, its certificate valid for the longest lifetime
        certificate = create_certificate(
            provider, now=datetime.fromtimestamp(made_at, UTC), lifetime=MAX_LIFETIME
        )
    collateral = provider.collateral_json(certificate.quote)
    assert collateral is not None
    return certificate, collateral


def test_genuine_simulated_receipt_verifies_only_with_allow_simulated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certificate, collateral = _sim_server()
    signed = receipt_for(certificate)
    receipt = _save(tmp_path, certificate, signed, collateral)
    config = str(_policy_file(tmp_path, _sim_policy()))
    for extra in ([], ["--config", config]):
        code, out = _verify(capsys, str(receipt), *extra)
        assert code == 1 and out["valid"] is False
        assert "SIMULATED" in str(out["reason"]) and "--allow-simulated" in str(out["reason"])
    code, out = _verify(capsys, str(receipt), "--config", config, "--allow-simulated")
    assert code == 0, out
    assert out["valid"] is True and out["quote_verified"] is True
    assert out["root"] == "SIMULATED root"
    assert out["tcb_status"] == "UpToDate"
    assert out["verified_at"] == signed.receipt.issued_at
    assert out["policy"] == config and "note" not in out
    assert out["signer"]["simulated"] is True  # type: ignore[index]
    code, out = _verify(capsys, str(receipt), "--allow-simulated")
    assert code == 0 and out["policy"] is None
    assert "no policy was applied" in str(out["note"])


def test_receipt_names_the_tee_that_signed_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The receipt's signed "tee" must be its certificate's quote type: an SGX enclave's
    key cannot vouch for a receipt that claims a TDX signer, nor the reverse."""
    certificate, collateral = _sim_server()
    genuine = _save(tmp_path, certificate, receipt_for(certificate), collateral)
    code, out = _verify(capsys, str(genuine), "--allow-simulated")
    assert code == 0 and out["receipt"]["tee"] == "SGX"  # type: ignore[index]
    assert out["signer"]["tee"] == "SGX"  # type: ignore[index]
    claimed = _save(tmp_path, certificate, receipt_for(certificate, tee="TDX"), collateral)
    code, out = _verify(capsys, str(claimed), "--allow-simulated")
    reason = str(out["reason"])
    assert code == 1 and "says an TDX TEE signed it; its certificate holds SGX evidence" in reason
    text = json.loads(receipt_for(certificate).to_json())
    text["receipt"]["tee"] = "SEV"
    with pytest.raises(ReceiptError, match="tee"):
        SignedReceipt.from_json(json.dumps(text))


def test_receipt_is_verified_as_of_its_issue_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Collateral valid for 30 days from t0: a receipt dated in that window verifies."""
    t0 = int(time.time()) - 100 * DAY
    certificate, collateral = _sim_server(
        SimPlatform(SimPlatformConfig(collateral_issued_at=t0)), made_at=t0
    )
    inside = _save(tmp_path, certificate, receipt_for(certificate, issued_at=t0 + DAY), collateral)
    code, out = _verify(capsys, str(inside), "--allow-simulated")
    assert code == 0, out
    assert out["verified_at"] == t0 + DAY
    for outside in (t0 - DAY, t0 + 31 * DAY):  # not yet issued / expired at that time
        receipt = _save(
            tmp_path, certificate, receipt_for(certificate, issued_at=outside), collateral
        )
        code, out = _verify(capsys, str(receipt), "--allow-simulated")
        assert code == 1 and out["valid"] is False, outside
    # --at overrides the issue time: the same receipt, judged as of a time the collateral
    # covers, or of a time it does not.
    code, out = _verify(capsys, str(receipt), "--allow-simulated", "--at", str(t0 + DAY))
    assert code == 0 and out["verified_at"] == t0 + DAY
    code, out = _verify(capsys, str(inside), "--allow-simulated", "--at", str(t0 + 31 * DAY))
    assert code == 1 and "expired" in str(out["reason"]).lower(), out


def test_receipt_signed_by_a_data_provider_enclave_is_refused_without_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Role is part of the path: a genuine data-provider enclave is not a server."""
    provider = SimEvidenceProvider(sim_identity(Role.DATA_PROVIDER))
    certificate = create_certificate(provider)
    collateral = provider.collateral_json(certificate.quote) or ""
    receipt = _save(tmp_path, certificate, receipt_for(certificate), collateral)
    code, out = _verify(capsys, str(receipt), "--allow-simulated")
    assert code == 1
    assert "not the server role" in str(out["reason"])


def test_receipt_collateral_is_required_and_can_be_passed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certificate, collateral = _sim_server()
    receipt = _save(tmp_path, certificate, receipt_for(certificate), collateral)
    moved = tmp_path / "elsewhere.json"
    Path(f"{receipt}.collateral.json").rename(moved)
    assert main(["verify-receipt", str(receipt), "--allow-simulated"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--collateral" in err and "collateral.json" in err
    code, out = _verify(capsys, str(receipt), "--allow-simulated", "--collateral", str(moved))
    assert code == 0, out


def test_policy_collateral_rules_apply_to_receipts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certificate, collateral = _sim_server()
    receipt = _save(tmp_path, certificate, receipt_for(certificate), collateral)
    data = _sim_policy().to_dict()
    data["min_tcb_evaluation_data_number"] = 18  # the simulated collateral carries 17
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps(data))
    code, out = _verify(capsys, str(receipt), "--config", str(strict), "--allow-simulated")
    assert code == 1
    assert "TCB evaluation data number 17, below the policy's" in str(out["reason"])


# --- real Intel evidence ---------------------------------------------------------------


def _vector_policy(*, allow: bool) -> Policy:
    body = parse_quote(SGX_QUOTE.read_bytes()).report_body
    entry = MeasurementEntry(body.mr_enclave, body.mr_signer, body.isv_prod_id, body.isv_svn)
    tcb = TcbAllowances(hw_config_needed=allow, sw_hardening_needed=allow)
    return Policy(True, True, True, True, (entry,), tcb=tcb)


def test_real_dcap_vector_verifies_through_the_one_path_at_its_pinned_time() -> None:
    """Intel-signed evidence, Intel's root, the verdict ORIGIN.md pins."""
    quote = SGX_QUOTE.read_bytes()
    collateral = SGX_COLLATERAL.read_text()
    report_data = parse_quote(quote).report_body.report_data
    peer = PeerVerifier(_vector_policy(allow=True)).verify_bound_quote(
        quote, collateral, report_data, what="vector", role=None, at=SGX_PINNED, record=False
    )
    assert peer.verified.root == "Intel SGX Root CA" and not peer.verified.simulated
    assert peer.verified.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert peer.verified.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    with pytest.raises(PeerRejected, match="ConfigurationAndSWHardeningNeeded is not allowed"):
        PeerVerifier(_vector_policy(allow=False)).verify_bound_quote(
            quote, collateral, report_data, what="vector", role=None, at=SGX_PINNED
        )
    with pytest.raises(PeerRejected, match="not the server role"):
        PeerVerifier(_vector_policy(allow=True)).verify_bound_quote(
            quote, collateral, report_data, what="vector", role=Role.SERVER, at=SGX_PINNED
        )
    with pytest.raises(PeerRejected, match="CrlExpired"):  # verified today: its CRLs expired
        PeerVerifier(_vector_policy(allow=True)).verify_bound_quote(
            quote, collateral, report_data, what="vector", role=None
        )


def _certificate_carrying(quote: bytes) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A Gramine-layout certificate (legacy extension) holding someone else's quote."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2001, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 12, 31, tzinfo=UTC))
        .add_extension(x509.UnrecognizedExtension(LEGACY_QUOTE_OID_GRAMINE, quote), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key


def test_real_dcap_vector_in_a_test_certificate_cannot_bind_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Genuine quote, wrong key: the path refuses it at the binding, before dcap-qvl."""
    pem, _ = _certificate_carrying(SGX_QUOTE.read_bytes())
    cert = tmp_path / "vector.pem"
    cert.write_bytes(pem)
    code = main(
        ["inspect-cert", str(cert), "--collateral", str(SGX_COLLATERAL), "--at", str(SGX_PINNED)]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert out["key_binding"]["holds"] is False
    assert out["quote_verification"]["verified"] is False
    assert "does not bind the key" in out["quote_verification"]["reason"]


def test_real_gramine_certificate_binds_but_the_wrong_collateral_does_not_verify_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real Gramine RA-TLS certificate: binding holds; its quote is judged by dcap-qvl."""
    args = ["inspect-cert", str(GRAMINE_CERT), "--collateral", str(SGX_COLLATERAL)]
    code = main([*args, "--at", str(SGX_PINNED)])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert out["key_binding"]["holds"] is True
    verification = out["quote_verification"]
    assert verification["verified"] is False and verification["root"] is None
    # Another platform's collateral: its PCK CRL cannot speak for this PCK certificate.
    assert "UnknownRevocationStatus" in verification["reason"]


def test_inspect_cert_reports_a_verified_simulated_quote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certificate, collateral = _sim_server()
    cert = tmp_path / "sim.pem"
    cert.write_bytes(certificate.certificate_pem)
    path = tmp_path / "collateral.json"
    path.write_text(collateral)
    assert main(["inspect-cert", str(cert), "--collateral", str(path)]) == 1
    refused = json.loads(capsys.readouterr().out)["quote_verification"]
    assert refused["verified"] is False and "--allow-simulated" in refused["reason"]
    assert main(["inspect-cert", str(cert), "--collateral", str(path), "--allow-simulated"]) == 0
    verification = json.loads(capsys.readouterr().out)["quote_verification"]
    assert verification["verified"] is True
    assert verification["root"] == "SIMULATED root"
    assert verification["tcb_status"] == "UpToDate" and verification["role"] == "server"


def test_forged_quote_layout_is_what_the_forger_claims() -> None:
    """The helper builds what the attack needs: the policy's measurement, zero signatures."""
    entry = _server_entry(_sim_policy())
    parsed = parse_quote(forged_quote(entry, bytes(64)))
    assert parsed.report_body.mr_enclave == entry.mr_enclave
    assert parsed.report_body.isv_prod_id == Role.SERVER


# --- the client's side ------------------------------------------------------------------


def test_client_without_a_policy_is_refused_before_connecting() -> None:
    """None must never reach the verifier as "no policy" on the live path."""
    from teepsi.client.party import PartyConfig, PsiClient, PsiClientError

    config = PartyConfig(
        host="127.0.0.1:1",
        policy=None,  # type: ignore[arg-type]
        name="a",
        party_count=1,
        attestation="sim",
    )
    with pytest.raises(PsiClientError, match="a policy for the server is required"):
        PsiClient(config)


@pytest.mark.parametrize("at", [-1, 2**63, 2**64 + 5])
def test_impossible_verification_time_is_a_one_line_refusal(at: int) -> None:
    """dcap-qvl takes an unsigned 64-bit time: anything else is refused, not an OverflowError."""
    certificate, collateral = _sim_server()
    verifier = PeerVerifier(None, allow_simulated=True)
    with pytest.raises(PeerRejected, match="is not a valid UNIX time"):
        verifier.verify_certificate(certificate.certificate_der, collateral, at=at, record=False)
