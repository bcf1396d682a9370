"""Collateral rollback state: it cannot be poisoned by a refused peer, nor forgotten.

The verifier keeps, per attesting platform (PPID), the newest collateral that platform
showed; only a peer that passed everything (binding, quote, role, policy) moves it, and
the state survives restarts in a 0600 file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
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
from teepsi.engine.tables import TableSpec
from tests.support.processes import client_args, teepsi_cmd

DAY = 24 * 3600
REPORT_DATA = bytes(range(64))
KEY_SCHEME = TableSpec(path=Path("x")).key_scheme


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
    freshness.observe(newer, source=a)
    freshness.observe(older, source=b)  # another platform whose PCCS lags: accepted
    with pytest.raises(CollateralRollbackError, match="lower than 18"):
        freshness.observe(older, source=a)  # platform A going back: a rollback


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
    first.observe(newer, source="ppid:01")
    second.observe(older, source="ppid:02")  # must merge, not overwrite ppid:01's record
    with pytest.raises(CollateralRollbackError):
        CollateralFreshness(state).observe(older, source="ppid:01")
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


def test_client_refuses_older_server_collateral_in_a_fresh_process(
    start_server, sim_policy_file, tmp_path
):
    """Two runs of ``teepsi client``: the second, a new process, is shown older collateral."""
    server = start_server()
    data = tmp_path / "items.txt"
    data.write_text("x\ny\n")
    newer = tmp_path / "newer.json"
    newer.write_text(
        SimPlatform(SimPlatformConfig(tcb_evaluation_data_number=18)).collateral_json()
    )
    older = tmp_path / "older.json"
    older.write_text(SimPlatform().collateral_json())
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state-home")}

    def run(job: str, collateral: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
        args = client_args(
            server,
            data,
            parties=1,
            name="a",
            policy=sim_policy_file,
            job=job,
            extra=("--collateral", str(collateral), *extra),
        )
        return subprocess.run(args, capture_output=True, timeout=120, env=env)

    receipt = tmp_path / "first.receipt.json"
    first = run("first", newer, "--receipt", str(receipt))
    assert first.returncode == 0, first.stderr.decode()
    # The receipt comes with the evidence to verify it offline, all private to the owner.
    saved = [receipt, Path(f"{receipt}.cert.pem"), Path(f"{receipt}.collateral.json")]
    assert [stat.S_IMODE(p.stat().st_mode) for p in saved] == [0o600] * 3
    assert saved[2].read_text().strip() == newer.read_text().strip()  # what it verified with
    check = subprocess.run(
        teepsi_cmd("verify-receipt", str(receipt), "--allow-simulated"), capture_output=True
    )
    assert check.returncode == 0, check.stdout
    assert json.loads(check.stdout)["root"] == "SIMULATED root"
    default_state = tmp_path / "state-home" / "teepsi" / "client-collateral-state.json"
    assert stat.S_IMODE(default_state.stat().st_mode) == 0o600
    second = run("second", older)
    assert second.returncode == 1
    assert "refusing a possible rollback" in second.stderr.decode()
    # An explicit --collateral-state is a separate history.
    explicit = tmp_path / "explicit-state.json"
    third = run("third", older, "--collateral-state", str(explicit))
    assert third.returncode == 0, third.stderr.decode()
    fourth = run("fourth", older, "--collateral-state", str(default_state))
    assert fourth.returncode == 1 and "lower than 18" in fourth.stderr.decode()


@pytest.mark.parametrize("command", ["server", "client"])
def test_bad_collateral_state_file_is_a_usage_error(sim_policy_file, tmp_path, command):
    """--collateral-state is read before anything runs: a bad file stops it, in one line."""
    state = tmp_path / "collateral-state.json"
    state.write_text("{not json")
    data = tmp_path / "items.txt"
    data.write_text("x\n")
    args = {
        "server": ["--host", "127.0.0.1:0", "--attestation", "sim", "--allow-simulated"],
        "client": ["--host", "127.0.0.1:1", "--data", str(data), "--parties", "1", "--name", "a"],
    }[command]
    run = subprocess.run(
        teepsi_cmd(
            command, *args, "--config", str(sim_policy_file), "--collateral-state", str(state)
        ),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 2
    err = run.stderr.decode()
    assert err.count("\n") == 1 and err.startswith(f"teepsi {command}: error: --collateral-state")
    assert str(state) in err and "not JSON" in err


# --- the real server, in-process -------------------------------------------------------


def _start(state: Path | None) -> Any:
    from teepsi.server.app import ServerConfig, start_server
    from teepsi.server.jobs import Limits

    return start_server(
        ServerConfig(
            host="127.0.0.1:0",
            attestation="sim",
            client_policy=_policy(),
            allow_simulated=True,
            limits=Limits(job_timeout_seconds=20),
            collateral_state=state,
        )
    )


def _try_join(
    server: Any, job: str, identity: EnclaveIdentity, platform: SimPlatform
) -> grpc.StatusCode:
    """One Join with this enclave's quote and this platform's collateral; OK or the code."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from teepsi.attestation.sim import SimEvidenceProvider
    from teepsi.attestation.transcript import join_transcript_digest
    from teepsi.client.party import PartyConfig, PsiClient
    from teepsi.contract.keys import public_key_der, sign
    from teepsi.protocol import teepsi_pb2 as pb

    config = PartyConfig(
        host=f"127.0.0.1:{server.port}",
        policy=_policy(),
        name="p",
        party_count=2,
        job_id=job,
        allow_simulated=True,
        timeout=30,
    )
    client = PsiClient(config)
    try:
        client.connect()
        nonce = client.stub.GetChallenge(pb.GetChallengeRequest(job_id=job, party_name="p")).nonce
        key = ed25519.Ed25519PrivateKey.generate()
        public = public_key_der(key)
        digest = join_transcript_digest(
            nonce=nonce,
            server_certificate_sha256=client.server_certificate_sha256,
            job_id=job,
            party_name="p",
            party_public_key_sha256=hashlib.sha256(public).digest(),
        )
        quote = SimEvidenceProvider(identity, platform).quote(digest)
        request = pb.JoinRequest(
            job_id=job,
            party_name="p",
            party_count=2,
            nonce=nonce,
            party_public_key=public,
            transcript_signature=sign(key, digest),
            key_scheme=KEY_SCHEME,
            evidence=pb.ClientEvidence(quote=quote, collateral_json=platform.collateral_json()),
        )
        try:
            client.stub.Join(request, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
    finally:
        client.close()


def test_server_refused_join_does_not_lock_out_honest_providers() -> None:
    server = _start(None)
    try:
        newer = SimPlatform(SimPlatformConfig(tcb_evaluation_data_number=18))
        server_enclave = sim_identity(Role.SERVER)  # a genuine enclave, in the wrong role
        assert _try_join(server, "j1", server_enclave, newer) is grpc.StatusCode.PERMISSION_DENIED
        provider = sim_identity(Role.DATA_PROVIDER)
        assert _try_join(server, "j2", provider, SimPlatform()) is grpc.StatusCode.OK
    finally:
        server.stop(grace=0)


def test_server_keeps_its_rollback_state_across_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "server-collateral-state.json"
    provider = sim_identity(Role.DATA_PROVIDER)
    newer = SimPlatform(SimPlatformConfig(tcb_evaluation_data_number=18))
    server = _start(state)
    try:
        assert _try_join(server, "j1", provider, newer) is grpc.StatusCode.OK
    finally:
        server.stop(grace=0)
    server = _start(state)
    try:
        # The same platform showing older collateral to the restarted server: refused ...
        assert _try_join(server, "j2", provider, SimPlatform()) is grpc.StatusCode.PERMISSION_DENIED
        # ... while its current collateral still joins.
        assert _try_join(server, "j3", provider, newer) is grpc.StatusCode.OK
    finally:
        server.stop(grace=0)
