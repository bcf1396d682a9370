"""Collateral rollback state: it cannot be poisoned by a refused peer, nor forgotten.

The verifier keeps, per attesting platform (PPID), the newest collateral that platform
showed; only a peer that passed everything (binding, quote, role, policy) moves it, and
the state survives restarts in a 0600 file.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from teepsi.attestation.collateral import (
    FRESHNESS_TOLERANCE_SECONDS,
    CollateralError,
    CollateralFreshness,
    CollateralRollbackError,
)
from teepsi.attestation.evidence import EnclaveIdentity, Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.peer import PeerRejected, PeerVerifier
from teepsi.attestation.policy import Policy, PolicyError, policy_for
from teepsi.attestation.sim import SimPlatform, SimPlatformConfig, TcbStatus

DAY = 24 * 3600
REPORT_DATA = bytes(range(64))


def _policy(**rules: int) -> Policy:
    data = policy_for(
        [
            ("teepsi server (simulated)", sim_identity(Role.SERVER)),
            ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
        ]
    ).to_dict()
    data.update(rules)
    return Policy.from_dict(data)


def _server_verifier(state: Path | None = None, **rules: int) -> PeerVerifier:
    """As ``teepsi server`` builds its verifier of data providers."""
    freshness = CollateralFreshness(state, tolerance_seconds=FRESHNESS_TOLERANCE_SECONDS)
    return PeerVerifier(_policy(**rules), allow_simulated=True, freshness=freshness)


def _evidence(
    identity: EnclaveIdentity | None = None,
    report_data: bytes = REPORT_DATA,
    **config: object,
) -> tuple[bytes, str]:
    platform = SimPlatform(SimPlatformConfig(**config))  # type: ignore[arg-type]
    quote = platform.quote(identity or sim_identity(Role.DATA_PROVIDER), report_data)
    return quote, platform.collateral_json()


def _join(verifier: PeerVerifier, quote: bytes, collateral: str) -> None:
    verifier.verify_bound_quote(quote, collateral, REPORT_DATA, what="data provider")


def _other_enclave() -> EnclaveIdentity:
    ident = sim_identity(Role.DATA_PROVIDER)
    return EnclaveIdentity(bytes(32), ident.mr_signer, ident.isv_prod_id, ident.isv_svn)


REFUSALS: dict[str, tuple[EnclaveIdentity | None, bytes, dict[str, object], str]] = {
    # name: (identity, report_data, platform config, expected refusal)
    "wrong role": (sim_identity(Role.SERVER), REPORT_DATA, {}, "not the data provider role"),
    "failed binding": (None, bytes(64), {}, "does not bind this join"),
    "policy mismatch": (_other_enclave(), REPORT_DATA, {}, "matches no sgx_mrs entry"),
    "TCB not allowed": (
        None,
        REPORT_DATA,
        {"tcb_status": TcbStatus.OUT_OF_DATE},
        "TCB status OutOfDate is not allowed",
    ),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refused_join_with_newer_collateral_does_not_poison_the_next_provider(
    refusal: str,
) -> None:
    """Genuine, signed, newer collateral on a refused join must not move the state."""
    identity, report_data, config, expected = REFUSALS[refusal]
    verifier = _server_verifier()
    hostile, newer = _evidence(identity, report_data, tcb_evaluation_data_number=18, **config)
    with pytest.raises(PeerRejected, match=expected):
        verifier.verify_bound_quote(hostile, newer, REPORT_DATA, what="hostile")
    honest, current = _evidence()  # evaluation number 17, as its PCCS still serves
    _join(verifier, honest, current)
    _join(verifier, *_evidence())  # and the next one


def test_binding_is_checked_before_the_quote_is_verified() -> None:
    """A quote for another join is refused on its bytes: dcap-qvl never sees the junk."""
    quote, _ = _evidence(report_data=bytes(64))
    verifier = _server_verifier()
    for junk in (None, "{not collateral"):
        with pytest.raises(PeerRejected, match="does not bind this join"):
            verifier.verify_bound_quote(quote, junk, REPORT_DATA, what="data provider")


def test_accepted_peer_raises_the_floor_of_its_own_platform_only() -> None:
    """Per source: what platform A showed says nothing about platform B."""
    a, b = "ppid:" + "aa" * 16, "ppid:" + "bb" * 16
    _, newer = _evidence(tcb_evaluation_data_number=18)
    _, older = _evidence()
    freshness = CollateralFreshness(tolerance_seconds=FRESHNESS_TOLERANCE_SECONDS)
    freshness.check_and_record(newer, source=a)
    freshness.check_and_record(older, source=b)  # another platform whose PCCS lags: accepted
    with pytest.raises(CollateralRollbackError, match="lower than 18"):
        freshness.check_and_record(older, source=a)  # platform A going back: a rollback


def test_accepted_peer_is_recorded_and_its_platform_cannot_go_back() -> None:
    verifier = _server_verifier()
    _join(verifier, *_evidence(tcb_evaluation_data_number=18))
    with pytest.raises(PeerRejected, match="refusing a possible rollback"):
        _join(verifier, *_evidence())


def test_rollback_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "collateral-state.json"
    _join(_server_verifier(state), *_evidence(tcb_evaluation_data_number=18))
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["version"] == 2
    restarted = _server_verifier(state)  # a fresh process reads what the last one saw
    with pytest.raises(PeerRejected, match="lower than 18"):
        _join(restarted, *_evidence())


def test_processes_sharing_a_state_file_never_forget_each_other(tmp_path: Path) -> None:
    state = tmp_path / "collateral-state.json"
    first = CollateralFreshness(state)
    second = CollateralFreshness(state)  # loaded before `first` records anything
    _, newer = _evidence(tcb_evaluation_data_number=18)
    _, older = _evidence()
    first.check_and_record(newer, source="ppid:01")
    second.check_and_record(older, source="ppid:02")  # must merge, not overwrite ppid:01's record
    with pytest.raises(CollateralRollbackError):
        CollateralFreshness(state).check_and_record(older, source="ppid:01")
    with pytest.raises(CollateralRollbackError):
        second.check(older, source="ppid:01")  # re-reads the file too


def test_unreadable_state_file_fails_closed(tmp_path: Path) -> None:
    state = tmp_path / "collateral-state.json"
    state.write_text(json.dumps({"version": 1, "newest": {}}))  # the old, unsourced form
    with pytest.raises(CollateralError, match="not a teepsi collateral state file"):
        CollateralFreshness(state)


# --- policy rules ----------------------------------------------------------------------


def test_policy_min_tcb_evaluation_data_number_is_enforced() -> None:
    quote, collateral = _evidence()  # 17
    with pytest.raises(PeerRejected, match="TCB evaluation data number 17, below the policy's"):
        _join(_server_verifier(min_tcb_evaluation_data_number=18), quote, collateral)
    _join(_server_verifier(min_tcb_evaluation_data_number=17), quote, collateral)
    _join(
        _server_verifier(min_tcb_evaluation_data_number=18),
        *_evidence(tcb_evaluation_data_number=18),
    )


def test_policy_max_collateral_age_days_is_enforced() -> None:
    issued = int(time.time()) - 10 * DAY
    quote, collateral = _evidence(collateral_issued_at=issued)
    with pytest.raises(PeerRejected, match=r"issued 10 days before .* max_collateral_age_days 5"):
        _join(_server_verifier(max_collateral_age_days=5), quote, collateral)
    _join(_server_verifier(max_collateral_age_days=11), quote, collateral)
    # Judged as of the verification time: a receipt checked later sees the same age.
    PeerVerifier(_policy(max_collateral_age_days=5), allow_simulated=True).verify_bound_quote(
        quote, collateral, REPORT_DATA, what="data provider", at=issued + 2 * DAY
    )


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("min_tcb_evaluation_data_number", True, "expected an integer 0..4294967295"),
        ("min_tcb_evaluation_data_number", None, "got null"),
        ("min_tcb_evaluation_data_number", -1, "got -1"),
        ("min_tcb_evaluation_data_number", 17.0, "got 17.0"),
        ("min_tcb_evaluation_data_number", "seventeen", 'got "seventeen"'),
        ("min_tcb_evaluation_data_number", 2**32, "got 4294967296"),
        ("max_collateral_age_days", 0, "expected an integer 1..3650"),
        ("max_collateral_age_days", "30d", 'got "30d"'),
        ("max_collateral_age_days", 3651, "got 3651"),
        ("max_colateral_age_days", 30, "unknown key (did you mean max_collateral_age_days?)"),
    ],
)
def test_policy_collateral_rules_parse_strictly(
    tmp_path: Path, key: str, value: object, problem: str
) -> None:
    data = _policy().to_dict()
    data[key] = value
    path = tmp_path / "dynamic_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PolicyError) as exc:
        Policy.load(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: {key}: ") and problem in message
    assert "\n" not in message


def test_policy_collateral_rules_round_trip() -> None:
    policy = _policy(min_tcb_evaluation_data_number=17, max_collateral_age_days=30)
    assert policy.min_tcb_evaluation_data_number == 17 and policy.max_collateral_age_days == 30
    assert Policy.from_dict(policy.to_dict()) == policy
    assert Policy.from_dict({**policy.to_dict(), "max_collateral_age_days": "30"}) == policy
    assert "min_tcb_evaluation_data_number" not in _policy().to_dict()


# --- the CLI keeps the state across runs -----------------------------------------------
