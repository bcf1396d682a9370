"""Quote verification and peer acceptance: the one code path for real and simulated evidence."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from teepsi.attestation.evidence import AttributeFlag, EnclaveIdentity, Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.peer import PeerRejected, PeerVerifier
from teepsi.attestation.policy import Policy, TcbAllowances, policy_for
from teepsi.attestation.sim import SimPlatform, SimPlatformConfig, TcbStatus
from teepsi.attestation.trust import verify_trusted_quote
from teepsi.attestation.verify import (
    QuoteVerificationError,
    SimulatedEvidenceRefused,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "sgx-dcap"

REPORT_DATA = bytes(range(64))


def _vector(name: str) -> tuple[bytes, str]:
    return (VECTORS / name).read_bytes(), (VECTORS / f"{name}_collateral.json").read_text()


def _sim_quote(
    identity: EnclaveIdentity | None = None, **config: object
) -> tuple[bytes, str, EnclaveIdentity]:
    ident = identity or sim_identity(Role.DATA_PROVIDER)
    platform = SimPlatform(SimPlatformConfig(**config))  # type: ignore[arg-type]
    return platform.quote(ident, REPORT_DATA), platform.collateral_json(), ident


def _verifier(*identities: EnclaveIdentity, tcb: TcbAllowances | None = None) -> PeerVerifier:
    policy = policy_for([(f"id{i}", ident) for i, ident in enumerate(identities)])
    if tcb is not None:
        policy = policy.with_tcb(tcb)
    return PeerVerifier(policy, allow_simulated=True)


# -- real Intel vectors ------------------------------------------------------------


def test_real_sgx_vector_at_pinned_time():
    quote, collateral = _vector("sgx_quote")
    verified = verify_trusted_quote(quote, collateral, now=1750330631)
    assert verified.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert verified.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert not verified.simulated
    assert verified.identity is not None
    assert verified.identity.mr_enclave.hex() == (
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    )
    assert verified.identity.attribute_flags == 0x05
    assert verified.report_data.startswith(b"Hello, world!")


def test_real_sgx_vector_policy_needs_both_flags():
    quote, collateral = _vector("sgx_quote")
    verified = verify_trusted_quote(quote, collateral, now=1750330631)
    assert verified.identity is not None
    policy = policy_for([("vector", verified.identity)])
    with pytest.raises(Exception, match="ConfigurationAndSWHardeningNeeded"):
        policy.check(verified.identity, verified.tcb_status)
    with pytest.raises(Exception, match="ConfigurationAndSWHardeningNeeded"):
        policy.with_tcb(TcbAllowances(hw_config_needed=True)).check(
            verified.identity, verified.tcb_status
        )
    both = policy.with_tcb(TcbAllowances(hw_config_needed=True, sw_hardening_needed=True))
    both.check(verified.identity, verified.tcb_status)


def test_real_sgx_vector_now_fails_on_expired_collateral():
    quote, collateral = _vector("sgx_quote")
    with pytest.raises(QuoteVerificationError, match=r"(?i)expired"):
        verify_trusted_quote(quote, collateral)


def test_real_tdx_vectors():
    quote, collateral = _vector("tdx_quote")
    verified = verify_trusted_quote(quote, collateral, now=1750330631)
    assert verified.tcb_status == "UpToDate"
    assert verified.tee_type == "TDX" and verified.identity is None
    quote, collateral = _vector("tdx_quote_outdated")
    with pytest.raises(QuoteVerificationError, match="No matching TCB level"):
        verify_trusted_quote(quote, collateral, now=1771500000)


def test_tampered_real_quote_rejected():
    quote, collateral = _vector("sgx_quote")
    tampered = bytearray(quote)
    tampered[112] ^= 1  # first byte of MRENCLAVE
    with pytest.raises(QuoteVerificationError):
        verify_trusted_quote(bytes(tampered), collateral, now=1750330631)


# -- simulated evidence -------------------------------------------------------------


def test_simulated_quote_needs_explicit_permission():
    quote, collateral, _ = _sim_quote()
    # The refusal names no flag: the remedy is the verifying side's, which its caller names.
    with pytest.raises(SimulatedEvidenceRefused, match=r"SIMULATED"):
        verify_trusted_quote(quote, collateral)
    verified = verify_trusted_quote(quote, collateral, allow_simulated=True)
    assert verified.simulated and verified.tcb_status == "UpToDate"
    assert verified.report_data == REPORT_DATA


def test_simulated_quote_rejected_under_intel_root_even_with_real_collateral():
    quote, _, _ = _sim_quote()
    _, real_collateral = _vector("sgx_quote")
    with pytest.raises(QuoteVerificationError):
        verify_trusted_quote(quote, real_collateral, now=1750330631)


def test_real_quote_is_not_verified_against_the_sim_root():
    quote, collateral = _vector("sgx_quote")
    verified = verify_trusted_quote(quote, collateral, allow_simulated=True, now=1750330631)
    assert not verified.simulated


@pytest.mark.parametrize("offset", [0x30 + 64, 0x30 + 320, 0x30 + 383, 500])
def test_tampered_sim_quote_rejected(offset):
    quote, collateral, _ = _sim_quote()
    tampered = bytearray(quote)
    tampered[offset] ^= 0x80
    with pytest.raises(QuoteVerificationError):
        verify_trusted_quote(bytes(tampered), collateral, allow_simulated=True)


def test_flipped_report_data_rejected_by_binding():
    quote, collateral, ident = _sim_quote()
    verifier = _verifier(ident)
    verifier.verify_bound_quote(quote, collateral, REPORT_DATA, what="peer")
    other = bytes([REPORT_DATA[0] ^ 1]) + REPORT_DATA[1:]
    with pytest.raises(PeerRejected, match="report_data"):
        verifier.verify_bound_quote(quote, collateral, other, what="peer")


def test_expired_collateral_rejected():
    quote, collateral, _ = _sim_quote(
        collateral_issued_at=int(time.time()) - 90 * 24 * 3600,
        collateral_validity_seconds=24 * 3600,
    )
    with pytest.raises(QuoteVerificationError, match=r"(?i)expired"):
        verify_trusted_quote(quote, collateral, allow_simulated=True)


def test_missing_or_garbage_collateral_rejected():
    quote, _, _ = _sim_quote()
    with pytest.raises(QuoteVerificationError, match="no collateral"):
        verify_trusted_quote(quote, None, allow_simulated=True)
    with pytest.raises(QuoteVerificationError, match="collateral"):
        verify_trusted_quote(quote, "{not json", allow_simulated=True)


def test_debug_enclave_refused():
    debug = EnclaveIdentity(
        mr_enclave=b"\1" * 32,
        mr_signer=b"\2" * 32,
        isv_prod_id=2,
        isv_svn=1,
        attribute_flags=int(AttributeFlag.INIT | AttributeFlag.MODE64BIT | AttributeFlag.DEBUG),
    )
    quote, collateral, _ = _sim_quote(debug)
    with pytest.raises(PeerRejected, match=r"(?i)debug"):
        _verifier(debug).verify_bound_quote(quote, collateral, REPORT_DATA, what="peer")


def test_revoked_pck_refused():
    quote, collateral, ident = _sim_quote(revoke_pck=True)
    with pytest.raises(PeerRejected, match=r"(?i)revoked"):
        _verifier(ident).verify_bound_quote(quote, collateral, REPORT_DATA, what="peer")


TCB_CASES = [
    (TcbStatus.UP_TO_DATE, TcbAllowances(), True),
    (TcbStatus.SW_HARDENING_NEEDED, TcbAllowances(), False),
    (TcbStatus.SW_HARDENING_NEEDED, TcbAllowances(sw_hardening_needed=True), True),
    (TcbStatus.CONFIGURATION_NEEDED, TcbAllowances(), False),
    (TcbStatus.CONFIGURATION_NEEDED, TcbAllowances(hw_config_needed=True), True),
    (TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED, TcbAllowances(hw_config_needed=True), False),
    (
        TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        TcbAllowances(hw_config_needed=True, sw_hardening_needed=True),
        True,
    ),
    (TcbStatus.OUT_OF_DATE, TcbAllowances(), False),
    (TcbStatus.OUT_OF_DATE, TcbAllowances(outdated=True), True),
    (TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED, TcbAllowances(outdated=True), False),
    (
        TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED,
        TcbAllowances(outdated=True, hw_config_needed=True),
        True,
    ),
    (TcbStatus.REVOKED, TcbAllowances(True, True, True), False),
]


@pytest.mark.parametrize(("status", "allow", "accepted"), TCB_CASES)
def test_tcb_status_flags_end_to_end(status, allow, accepted):
    advisories = () if status is TcbStatus.UP_TO_DATE else ("INTEL-SA-00000",)
    quote, collateral, ident = _sim_quote(tcb_status=status, advisory_ids=advisories)
    verifier = _verifier(ident, tcb=allow)
    if accepted:
        peer = verifier.verify_bound_quote(quote, collateral, REPORT_DATA, what="peer")
        assert peer.verified.tcb_status == status.value
    else:
        with pytest.raises(PeerRejected):
            verifier.verify_bound_quote(quote, collateral, REPORT_DATA, what="peer")


def test_role_confusion_refused():
    """A data provider's evidence never passes as the server's, even if the policy lists both."""
    server, provider = sim_identity(Role.SERVER), sim_identity(Role.DATA_PROVIDER)
    quote, collateral, _ = _sim_quote(provider)
    verifier = _verifier(server, provider)
    with pytest.raises(PeerRejected, match="ISV_PROD_ID 2"):
        verifier.verify_bound_quote(quote, collateral, REPORT_DATA, what="peer", role=Role.SERVER)


def test_policy_pinning_another_mrenclave_or_higher_svn_refuses():
    quote, collateral, ident = _sim_quote()
    base = policy_for([("p", ident)]).to_dict()
    entries = base["sgx_mrs"]
    assert isinstance(entries, list)
    other = json.loads(json.dumps(base))
    other["sgx_mrs"][0]["mr_enclave"] = "ab" * 32
    with pytest.raises(PeerRejected, match="MRENCLAVE"):
        PeerVerifier(Policy.from_dict(other), allow_simulated=True).verify_bound_quote(
            quote, collateral, REPORT_DATA, what="peer"
        )
    higher = json.loads(json.dumps(base))
    higher["sgx_mrs"][0]["isv_svn"] = str(ident.isv_svn + 1)
    with pytest.raises(PeerRejected, match="ISV_SVN"):
        PeerVerifier(Policy.from_dict(higher), allow_simulated=True).verify_bound_quote(
            quote, collateral, REPORT_DATA, what="peer"
        )


def test_sim_measurement_tracks_the_code_and_the_role():
    server, provider = sim_identity(Role.SERVER), sim_identity(Role.DATA_PROVIDER)
    assert server.mr_enclave != provider.mr_enclave
    assert (server.isv_prod_id, provider.isv_prod_id) == (1, 2)
    assert server.mr_signer == provider.mr_signer
