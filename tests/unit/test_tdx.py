"""Intel TDX as a second TEE: the simulated TDX platform, tdx_mrs policy, role binding,
refusals through the one verification path, and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.attestation.evidence import (
    DEFAULT_TD_ATTRIBUTES,
    EvidenceProvider,
    Role,
    TdAttributeFlag,
    TdIdentity,
    tdx_report_data,
)
from teepsi.attestation.measure import sim_identity, sim_td_identity
from teepsi.attestation.peer import PeerRejected, PeerVerifier
from teepsi.attestation.policy import (
    Policy,
    PolicyError,
    PolicyViolation,
    TcbAllowances,
    TdxEntry,
    policy_for,
)
from teepsi.attestation.quote import (
    CERT_DATA_TYPE_QE_REPORT,
    TEE_TYPE_TDX,
    TdReportBody,
    parse_quote,
)
from teepsi.attestation.ratls import LEGACY_QUOTE_OID_GRAMINE, SUBJECT, create_certificate
from teepsi.attestation.sim import (
    SIM_MR_SEAM,
    SimEvidenceProvider,
    SimPlatform,
    SimPlatformConfig,
    SimTdxEvidenceProvider,
    SimTdxPlatform,
    TcbStatus,
    is_simulated_quote,
)
from teepsi.attestation.transcript import join_transcript_digest
from teepsi.attestation.trust import verify_trusted_quote
from teepsi.attestation.verify import QuoteVerificationError, SimulatedEvidenceRefused

VECTORS = Path(__file__).parent.parent / "vectors" / "sgx-dcap"
REAL_TDX_AT = 1750330631
REAL_MR_TD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
OTHER = hashlib.sha384(b"another value").digest()


def _policy(**entry_changes: object) -> Policy:
    """The simulated TDX VM's policy (every field pinned), with ``entry_changes``."""
    policy = policy_for([], [("teepsi VM", sim_td_identity())])
    entry = dataclasses.replace(policy.tdx_entries[0], **entry_changes)  # type: ignore[arg-type]
    return dataclasses.replace(policy, tdx_entries=(entry,))


def _certificate(
    role: Role = Role.SERVER,
    *,
    identity: TdIdentity | None = None,
    platform: SimTdxPlatform | None = None,
) -> tuple[bytes, str]:
    provider = SimTdxEvidenceProvider(identity or sim_td_identity(), role, platform)
    cert = create_certificate(provider)
    collateral = provider.collateral_json(cert.quote)
    assert collateral
    return cert.certificate_der, collateral


def _refused(
    policy: Policy | None, cert: tuple[bytes, str], *, allow_simulated: bool = True
) -> str:
    verifier = PeerVerifier(policy, allow_simulated=allow_simulated)
    with pytest.raises(PeerRejected) as caught:
        verifier.verify_certificate(*cert, role=Role.SERVER)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the simulated TDX platform --------------------------------------------------------


def test_sim_tdx_quote_has_the_real_v4_layout() -> None:
    """The simulated quote is split by the same parser as Intel's real TDX quote."""
    real = parse_quote((VECTORS / "tdx_quote").read_bytes())
    assert isinstance(real.report_body, TdReportBody)
    assert real.report_body.mr_td.hex() == REAL_MR_TD
    identity = sim_td_identity()
    quote = SimTdxPlatform().quote(identity, bytes(range(64)))
    version, key_type, tee_type = struct.unpack_from("<HHI", quote)
    assert (version, key_type, tee_type) == (4, 2, TEE_TYPE_TDX)
    parsed = parse_quote(quote)
    body = parsed.report_body
    assert isinstance(body, TdReportBody)
    assert body.mr_td == identity.mr_td and body.rt_mr2 == identity.rt_mr2
    assert body.mr_seam == SIM_MR_SEAM and body.report_data == bytes(range(64))
    # TDX v4: certification data type 6 wraps the QE report and the PEM chain.
    offset = 48 + 584 + 4 + 64 + 64
    assert struct.unpack_from("<H", quote, offset)[0] == CERT_DATA_TYPE_QE_REPORT
    assert is_simulated_quote(quote)
    assert not is_simulated_quote((VECTORS / "tdx_quote").read_bytes())


def test_sim_tdx_verified_by_the_same_dcap_call_under_the_simulated_root() -> None:
    platform = SimTdxPlatform()
    identity = sim_td_identity()
    quote = platform.quote(identity, bytes(64))
    verified = verify_trusted_quote(quote, platform.collateral_json(), allow_simulated=True)
    assert (verified.tee_type, verified.tcb_status, verified.simulated) == ("TDX", "UpToDate", True)
    assert verified.identity is None
    assert verified.td == identity
    assert verified.ppid


def test_sim_tdx_refused_under_intels_root() -> None:
    platform = SimTdxPlatform()
    quote = platform.quote(sim_td_identity(), bytes(64))
    # The library names no flag; the refusing side (PeerVerifier) adds its remedy.
    with pytest.raises(SimulatedEvidenceRefused, match=r"SIMULATED .* under Intel's root"):
        verify_trusted_quote(quote, platform.collateral_json())


def test_sim_tdx_tcb_status_comes_from_its_signed_tdx_tcb_info() -> None:
    config = SimPlatformConfig(tcb_status=TcbStatus.OUT_OF_DATE, advisory_ids=("INTEL-SA-00837",))
    platform = SimTdxPlatform(config)
    info = json.loads(json.loads(platform.collateral_json())["tcb_info"])
    assert info["id"] == "TDX" and info["tdxModuleIdentities"][0]["id"] == "TDX_01"
    assert len(info["tcbLevels"][0]["tcb"]["tdxtcbcomponents"]) == 16
    qe = json.loads(json.loads(platform.collateral_json())["qe_identity"])
    assert (qe["id"], qe["isvprodid"]) == ("TD_QE", 2)
    verified = verify_trusted_quote(
        platform.quote(sim_td_identity(), bytes(64)),
        platform.collateral_json(),
        allow_simulated=True,
    )
    assert (verified.tcb_status, verified.advisory_ids) == ("OutOfDate", ("INTEL-SA-00837",))


def test_real_tdx_vectors_through_the_same_quote_stage() -> None:
    quote = (VECTORS / "tdx_quote").read_bytes()
    collateral = (VECTORS / "tdx_quote_collateral.json").read_text()
    verified = verify_trusted_quote(quote, collateral, now=REAL_TDX_AT)
    assert (verified.tee_type, verified.tcb_status, verified.simulated) == (
        "TDX",
        "UpToDate",
        False,
    )
    assert verified.td is not None and verified.td.mr_td.hex() == REAL_MR_TD
    with pytest.raises(QuoteVerificationError):
        verify_trusted_quote(quote, collateral)  # today: its collateral has expired


# --- policy: tdx_mrs -------------------------------------------------------------------


def _policy_dict(**entry: object) -> dict[str, object]:
    data = _policy().to_dict()
    tdx = data["tdx_mrs"]
    assert isinstance(tdx, list)
    tdx[0].update(entry)
    return data


def test_tdx_policy_round_trips_and_accepts_the_simulated_vm() -> None:
    policy = Policy.from_dict(_policy().to_dict())
    assert policy == _policy()
    td = dataclasses.replace(sim_td_identity(), tee_tcb_svn=bytes([3, 1, 2]) + bytes(13))
    assert policy.check_td(td, "UpToDate").name == "teepsi VM"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mr_td": "00" * 47}, "tdx_mrs[0].mr_td: expected 96 hex characters"),
        ({"rtmr1": "zz" * 48}, "tdx_mrs[0].rtmr1: expected 96 hex characters"),
        ({"mr_seam": []}, "tdx_mrs[0].mr_seam: expected a non-empty list"),
        ({"mr_seam": "ab" * 48}, "tdx_mrs[0].mr_seam: expected a non-empty list"),
        ({"mr_seam": ["ab" * 47]}, "tdx_mrs[0].mr_seam[0]: expected 96 hex"),
        ({"min_tee_tcb_svn": "03"}, "tdx_mrs[0].min_tee_tcb_svn: expected 32 hex"),
        ({"xfam": 0x602E7}, "tdx_mrs[0].xfam: expected 16 hex"),
        ({"rtmr4": "00" * 48}, "tdx_mrs[0].rtmr4: unknown key (did you mean rtmr3?)"),
        ({"mrtd": "00" * 48}, "tdx_mrs[0].mrtd: unknown key (did you mean mr_td?)"),
    ],
)
def test_tdx_policy_parsing_is_strict(change: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(_policy_dict(**change), source="p.json")
    assert str(caught.value).startswith(f"p.json: {message}"), caught.value


def test_tdx_policy_structure_errors() -> None:
    data = _policy_dict()
    del data["tdx_mrs"][0]["mr_td"]  # type: ignore[index]
    with pytest.raises(PolicyError, match=r"p\.json: tdx_mrs\[0\]\.mr_td: missing"):
        Policy.from_dict(data, source="p.json")
    for bad in ([], {}, "x"):
        with pytest.raises(PolicyError, match=r"p\.json: tdx_mrs: expected a non-empty list"):
            Policy.from_dict({**_policy_dict(), "tdx_mrs": bad}, source="p.json")
    # sgx_mrs may be absent beside tdx_mrs, never absent alone.
    data = _policy_dict()
    del data["sgx_mrs"]
    assert Policy.from_dict(data).entries == ()
    del data["tdx_mrs"]
    with pytest.raises(PolicyError, match=r"p\.json: sgx_mrs: missing"):
        Policy.from_dict(data, source="p.json")


def test_tdx_and_sgx_entries_each_accept_only_their_tee() -> None:
    tdx_only = _policy()
    with pytest.raises(PolicyViolation, match="SGX enclave, but the policy lists none"):
        tdx_only.check(sim_identity(Role.SERVER), "UpToDate")
    sgx_only = policy_for([("server", sim_identity(Role.SERVER))])
    with pytest.raises(PolicyViolation, match="TDX VM, but the policy lists none"):
        sgx_only.check_td(sim_td_identity(), "UpToDate")


@pytest.mark.parametrize(
    ("td_change", "message"),
    [
        ({"mr_td": OTHER}, f"MRTD {OTHER.hex()} (expected"),
        ({"rt_mr2": OTHER}, f"RTMR2 {OTHER.hex()} (expected"),
        ({"rt_mr3": OTHER}, "RTMR3"),
        ({"mr_config_id": OTHER}, "MRCONFIGID"),
        ({"mr_owner": OTHER}, "MROWNER "),
        ({"mr_owner_config": OTHER}, "MROWNERCONFIG"),
        ({"mr_seam": OTHER}, f"MRSEAM {OTHER.hex()} (not an allowed TDX module)"),
        ({"tee_tcb_svn": bytes([2, 1, 2]) + bytes(13)}, "TEE_TCB_SVN 02010200"),
        ({"xfam": 0x2E7}, "XFAM e702000000000000 (expected e702060000000000)"),
        ({"td_attributes": DEFAULT_TD_ATTRIBUTES | TdAttributeFlag.DEBUG}, "DEBUG TD"),
        ({"td_attributes": 0}, "lacks the SEPT_VE_DISABLE attribute"),
    ],
)
def test_tdx_policy_refuses_each_field(td_change: dict[str, object], message: str) -> None:
    td = dataclasses.replace(sim_td_identity(), **td_change)  # type: ignore[arg-type]
    with pytest.raises(PolicyViolation) as caught:
        _policy().check_td(td, "UpToDate")
    assert message in str(caught.value), caught.value


def test_tdx_policy_unset_fields_are_not_checked_and_newer_tcb_passes() -> None:
    policy = _policy(rt_mr3=None, mr_seam=None, xfam=None)
    td = dataclasses.replace(
        sim_td_identity(), rt_mr3=OTHER, mr_seam=OTHER, xfam=0x2E7, tee_tcb_svn=b"\x09" * 16
    )
    assert policy.check_td(td, "UpToDate")


def test_tdx_policy_tcb_status_needs_its_flag() -> None:
    with pytest.raises(PolicyViolation, match="TCB status OutOfDate is not allowed"):
        _policy().check_td(sim_td_identity(), "OutOfDate")
    allowed = _policy().with_tcb(TcbAllowances(outdated=True))
    assert allowed.check_td(sim_td_identity(), "OutOfDate")


# --- the one verification path: RA-TLS and joins ---------------------------------------


def test_tdx_server_certificate_verifies_with_its_role() -> None:
    peer, evidence = PeerVerifier(_policy(), allow_simulated=True).verify_certificate(
        *_certificate(Role.SERVER), role=Role.SERVER
    )
    assert peer.role is Role.SERVER and peer.verified.tee_type == "TDX"
    assert peer.matched is not None and peer.matched.name == "teepsi VM"
    assert evidence.source == "tcg-dice"
    assert peer.canonical_line().startswith(f"TDX MRTD {sim_td_identity().mr_td.hex()}")


def test_refused_another_mrtd() -> None:
    cert = _certificate(identity=dataclasses.replace(sim_td_identity(), mr_td=OTHER))
    assert "peer TD matches no tdx_mrs entry" in _refused(_policy(), cert)
    assert f"MRTD {OTHER.hex()}" in _refused(_policy(), cert)


def test_refused_another_rtmr_value() -> None:
    cert = _certificate(identity=dataclasses.replace(sim_td_identity(), rt_mr1=OTHER))
    assert f"RTMR1 {OTHER.hex()}" in _refused(_policy(), cert)


def test_refused_an_mrseam_not_allowed() -> None:
    cert = _certificate(platform=SimTdxPlatform(mr_seam=OTHER))
    assert "not an allowed TDX module" in _refused(_policy(), cert)


def test_refused_a_debug_td() -> None:
    debug = dataclasses.replace(
        sim_td_identity(), td_attributes=DEFAULT_TD_ATTRIBUTES | TdAttributeFlag.DEBUG
    )
    # dcap-qvl refuses it before the policy would.
    assert "Debug mode is enabled" in _refused(_policy(), _certificate(identity=debug))


def test_refused_a_tcb_status_without_its_flag() -> None:
    platform = SimTdxPlatform(SimPlatformConfig(tcb_status=TcbStatus.SW_HARDENING_NEEDED))
    message = _refused(_policy(), _certificate(platform=platform))
    assert "TCB status SWHardeningNeeded is not allowed" in message


def test_refused_simulated_tdx_under_intels_root() -> None:
    message = _refused(_policy(), _certificate(), allow_simulated=False)
    # The library names no flag; the CLI and client add theirs (test_end_to_end checks it).
    assert "SIMULATED" in message and "allow simulated evidence" in message


def test_refused_a_data_provider_vm_posing_as_the_server() -> None:
    """One image, same measurements: the role binding alone tells the roles apart."""
    message = _refused(_policy(), _certificate(Role.DATA_PROVIDER))
    assert message == ("server: TDX VM attests as the data provider role, not the server role")


def _legacy_certificate(
    key: ec.EllipticCurvePrivateKey, quote: bytes, not_before: datetime, not_after: datetime
) -> bytes:
    """A self-signed RA-TLS-shaped certificate for ``key`` carrying ``quote`` as is."""
    return (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.UnrecognizedExtension(LEGACY_QUOTE_OID_GRAMINE, quote), False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


class _UnboundTdxProvider(EvidenceProvider):
    """A TD that quotes the key hash as is, without teepsi's role binding."""

    name = "unbound"
    simulated = True

    def __init__(self) -> None:
        self.platform = SimTdxPlatform()

    def quote(self, report_data: bytes) -> bytes:
        return self.platform.quote(sim_td_identity(), report_data)

    def collateral_json(self, quote: bytes) -> str | None:
        return self.platform.collateral_json()


def test_refused_a_tdx_quote_whose_report_data_does_not_bind_the_tls_key() -> None:
    provider = SimTdxEvidenceProvider(sim_td_identity(), Role.SERVER)
    cert = create_certificate(provider)
    collateral = provider.collateral_json(cert.quote) or ""
    # Another key's certificate carrying this one's quote: the binding check refuses it.
    other = ec.generate_private_key(ec.SECP384R1())
    original = x509.load_der_x509_certificate(cert.certificate_der)
    forged = _legacy_certificate(
        other, cert.quote, original.not_valid_before_utc, original.not_valid_after_utc
    )
    message = _refused(_policy(), (forged, collateral))
    assert "does not bind the certificate's public key" in message
    # A TD quote over the key but without teepsi's role binding is refused too.
    unbound = _UnboundTdxProvider()
    unbound_cert = create_certificate(unbound)
    message = _refused(
        _policy(), (unbound_cert.certificate_der, unbound.platform.collateral_json())
    )
    assert "report_data binds no teepsi role" in message


def _join_digest(party: str = "bank-a") -> bytes:
    return join_transcript_digest(
        nonce=b"n" * 32,
        server_certificate_sha256=b"c" * 32,
        job_id="j1",
        party_name=party,
        party_public_key_sha256=b"k" * 32,
    )


def test_tdx_data_provider_join_binds_role_and_transcript() -> None:
    verifier = PeerVerifier(_policy(), allow_simulated=True)
    provider = SimTdxEvidenceProvider(sim_td_identity(), Role.DATA_PROVIDER)
    digest = _join_digest()
    quote = provider.quote(digest)
    collateral = provider.collateral_json(quote)
    peer = verifier.verify_bound_quote(quote, collateral, digest, what="party bank-a")
    assert peer.role is Role.DATA_PROVIDER
    with pytest.raises(PeerRejected, match="does not bind this join"):
        verifier.verify_bound_quote(quote, collateral, _join_digest("bank-b"), what="party")
    server_vm = SimTdxEvidenceProvider(sim_td_identity(), Role.SERVER)
    posing = server_vm.quote(digest)
    with pytest.raises(PeerRejected, match="attests as the server role, not the data provider"):
        verifier.verify_bound_quote(posing, collateral, digest, what="party")


def test_tdx_report_data_keeps_the_key_binding_and_binds_all_64_bytes() -> None:
    requested = bytes(range(64))
    bound = tdx_report_data(Role.SERVER, requested)
    assert bound[:32] == requested[:32]
    assert bound != tdx_report_data(Role.DATA_PROVIDER, requested)
    assert bound != tdx_report_data(Role.SERVER, requested[:63] + b"\xff")


def test_mixed_policy_accepts_sgx_and_tdx_through_one_verifier() -> None:
    policy = policy_for([("server", sim_identity(Role.SERVER))], [("teepsi VM", sim_td_identity())])
    verifier = PeerVerifier(policy, allow_simulated=True)
    sgx = SimEvidenceProvider(sim_identity(Role.SERVER), SimPlatform())
    sgx_cert = create_certificate(sgx)
    sgx_peer, _ = verifier.verify_certificate(
        sgx_cert.certificate_der, sgx.collateral_json(sgx_cert.quote)
    )
    tdx_peer, _ = verifier.verify_certificate(*_certificate(Role.SERVER))
    assert (sgx_peer.verified.tee_type, tdx_peer.verified.tee_type) == ("SGX", "TDX")


# --- command line ----------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    from teepsi.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def _write_policy(path: Path, policy: Policy) -> Path:
    path.write_text(json.dumps(policy.to_dict()))
    return path


def test_verify_quote_judges_a_real_tdx_quote_by_tdx_mrs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    quote = str(VECTORS / "tdx_quote")
    collateral = str(VECTORS / "tdx_quote_collateral.json")
    pinned = Policy(
        True, True, True, True, (), tdx_entries=(TdxEntry(bytes.fromhex(REAL_MR_TD), name="v"),)
    )
    good = _write_policy(tmp_path / "good.json", pinned)
    args = ("verify-quote", quote, "--collateral", collateral, "--at", str(REAL_TDX_AT))
    code, out, _ = _cli(capsys, *args, "--config", str(good))
    assert (code, out["accepted"], out["matched"]) == (0, True, "v")
    other = dataclasses.replace(pinned, tdx_entries=(TdxEntry(OTHER, name="other"),))
    code, out, _ = _cli(capsys, *args, "--config", str(_write_policy(tmp_path / "o.json", other)))
    assert code == 1 and out["accepted"] is False
    assert str(out["reason"]).startswith("quote: peer TD matches no tdx_mrs entry")
    assert f"MRTD {REAL_MR_TD}" in str(out["reason"])
    sgx_only = _write_policy(
        tmp_path / "sgx.json", policy_for([("server", sim_identity(Role.SERVER))])
    )
    code, out, _ = _cli(capsys, *args, "--config", str(sgx_only))
    assert code == 1 and "TDX VM, but the policy lists none" in str(out["reason"])


def test_inspect_cert_shows_td_fields_and_role(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    der, collateral = _certificate(Role.DATA_PROVIDER)
    cert = tmp_path / "cert.der"
    cert.write_bytes(der)
    coll = tmp_path / "collateral.json"
    coll.write_text(collateral)
    code, out, _ = _cli(
        capsys, "inspect-cert", str(cert), "--collateral", str(coll), "--allow-simulated"
    )
    assert code == 0
    quote = out["quote"]
    assert isinstance(quote, dict)
    assert quote["tee_type"] == "TDX" and quote["quote_version"] == 4
    assert quote["mr_td"] == sim_td_identity().mr_td.hex()
    assert quote["rt_mr2"] == sim_td_identity().rt_mr2.hex()
    assert quote["td_attribute_flags"] == ["SEPT_VE_DISABLE"] and quote["debug"] is False
    verification = out["quote_verification"]
    assert isinstance(verification, dict)
    assert verification["verified"] is True and verification["tee"] == "TDX"
    assert verification["role"] == "data_provider"


def test_real_tdx_vector_through_the_peer_verifier_at_its_pinned_time_and_now() -> None:
    """The path servers and clients use: accepted when its collateral was current,
    refused today naming each expired document and its date."""
    quote = (VECTORS / "tdx_quote").read_bytes()
    collateral = (VECTORS / "tdx_quote_collateral.json").read_text()
    pinned = Policy(True, True, True, True, (), tdx_entries=(TdxEntry(bytes.fromhex(REAL_MR_TD)),))
    verifier = PeerVerifier(pinned)
    peer = verifier.verify_unbound_quote(quote, collateral, at=REAL_TDX_AT)
    assert peer.verified.tcb_status == "UpToDate" and not peer.verified.simulated
    with pytest.raises(PeerRejected) as caught:
        verifier.verify_unbound_quote(quote, collateral, at=None)
    message = str(caught.value)
    assert "\n" not in message
    assert "TCB info (TDX, FMSPC B0C06F000000) expired 2025-07-19T10:16:03Z" in message
    assert "QE identity (TD_QE) expired" in message
    # In a test certificate the real quote cannot bind the certificate's key (its
    # report_data was made for another key): refused at the binding stage.
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _legacy_certificate(
        key,
        quote,
        datetime.fromtimestamp(REAL_TDX_AT - 3600, UTC),
        datetime.fromtimestamp(REAL_TDX_AT + 3600, UTC),
    )
    with pytest.raises(PeerRejected, match="does not bind the certificate's public key"):
        verifier.verify_certificate(cert, collateral, at=REAL_TDX_AT)
