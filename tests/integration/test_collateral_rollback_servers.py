"""Collateral rollback state across server and client processes and in-process servers."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from teepsi.attestation.evidence import EnclaveIdentity, Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.sim import SimPlatform, SimPlatformConfig
from teepsi.engine.tables import TableSpec
from tests.support.processes import client_args, teepsi_cmd
from tests.unit.test_collateral_rollback import (
    _policy,
)

KEY_SCHEME = TableSpec(path=Path("x")).key_scheme


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


def _start(state: Path | None) -> Any:
    from teepsi.server import ServerConfig, start_server
    from teepsi.server.limits import Limits

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
    from teepsi.contract.party_keys import public_key_der, sign
    from teepsi.protocol import teepsi_pb2 as pb

    config = PartyConfig(
        host=f"127.0.0.1:{server.port}",
        policy=_policy(),
        name="p",
        party_count=2,
        attestation="sim",
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
