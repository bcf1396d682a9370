"""Mixed SGX/TDX deployments, every role its own process, in sim mode: a TDX server with
SGX data providers, an SGX server with TDX data providers, mixed providers in one job.
Exact results, and receipts that verify and name the TEE that signed them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity, sim_td_identity
from teepsi.attestation.policy import policy_for
from tests.support.processes import start_client, teepsi_cmd

NAMES = ("alpha", "beta", "gamma")
DATA = {
    "alpha": ["car", "bicycle", "train", "cat", "dog"],
    "beta": ["train", "car", "e-car", "cat", "computer"],
    "gamma": ["car", "bicycle", "train", "cat", "dog", "computer"],
}


@pytest.fixture(scope="module")
def mixed_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated SGX enclaves (both roles) and the simulated TDX VM image."""
    path = tmp_path_factory.mktemp("mixed") / "dynamic_config.json"
    policy = policy_for(
        [
            ("teepsi server (simulated)", sim_identity(Role.SERVER)),
            ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
        ],
        [("teepsi VM (simulated)", sim_td_identity())],
    )
    path.write_text(json.dumps(policy.to_dict(), indent=2))
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("keys")
    public = {}
    for name in NAMES:
        made = subprocess.run(
            teepsi_cmd("keygen", "--out", str(folder / f"{name}.key")),
            capture_output=True,
            check=True,
        )
        public[name] = made.stdout.decode().strip()
    return folder, public


def _spec(tmp_path: Path, public: dict[str, str], job: str) -> Path:
    lines = [f'job_id = "{job}"']
    for name in NAMES:
        lines += ["[[parties]]", f'name = "{name}"', f'public_key = "{public[name]}"']
    path = tmp_path / f"{job}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_job(
    start_server: object,
    policy: Path,
    tmp_path: Path,
    keys: tuple[Path, dict[str, str]],
    *,
    server_tee: str,
    party_tees: dict[str, str],
) -> None:
    server = start_server("--sim-tee", server_tee, policy=policy)  # type: ignore[operator]
    folder, public = keys
    spec = _spec(tmp_path, public, f"mixed-{server_tee}")
    procs = {}
    for name in NAMES:
        data = tmp_path / f"{name}.txt"
        data.write_text("\n".join(DATA[name]) + "\n")
        procs[name] = start_client(
            teepsi_cmd(
                "client",
                "--host",
                server.host,
                "--config",
                str(policy),
                "--data",
                str(data),
                "--spec",
                str(spec),
                "--key-file",
                str(folder / f"{name}.key"),
                "--name",
                name,
                "--attestation",
                "sim",
                "--sim-tee",
                party_tees[name],
                "--allow-simulated",
                "--timeout",
                "60",
                "--quiet",
                "--receipt",
                str(tmp_path / f"{name}.receipt.json"),
            )
        )
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert (proc.returncode, stdout.decode()) == (0, "car\ncat\ntrain\n"), (
            name,
            stderr.decode(),
            server.log(),
        )
    for name in NAMES:
        receipt = tmp_path / f"{name}.receipt.json"
        check = subprocess.run(
            teepsi_cmd(
                "verify-receipt", str(receipt), "--config", str(policy), "--allow-simulated"
            ),
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        out = json.loads(check.stdout)
        assert out["valid"] is True
        # The receipt records which TEE signed it.
        assert out["signer"]["tee"] == server_tee.upper()
        if server_tee == "tdx":
            assert out["signer"]["mr_td"] == sim_td_identity().mr_td.hex()
        else:
            assert out["signer"]["mr_enclave"] == sim_identity(Role.SERVER).mr_enclave.hex()
        assert out["receipt"]["result_size"] == 3


@pytest.mark.parametrize(
    ("server_tee", "party_tees"),
    [
        ("tdx", {"alpha": "sgx", "beta": "sgx", "gamma": "sgx"}),
        ("sgx", {"alpha": "tdx", "beta": "tdx", "gamma": "tdx"}),
        ("tdx", {"alpha": "sgx", "beta": "tdx", "gamma": "sgx"}),
    ],
    ids=["tdx-server-sgx-providers", "sgx-server-tdx-providers", "tdx-server-mixed-providers"],
)
def test_mixed_deployment(
    start_server: object,
    mixed_policy: Path,
    tmp_path: Path,
    keys: tuple[Path, dict[str, str]],
    server_tee: str,
    party_tees: dict[str, str],
) -> None:
    _run_job(
        start_server, mixed_policy, tmp_path, keys, server_tee=server_tee, party_tees=party_tees
    )


def test_sgx_only_server_refuses_a_tdx_data_provider(
    start_server: object, sim_policy_file: Path, tmp_path: Path
) -> None:
    """A policy without tdx_mrs accepts no TD: the join is refused with one line."""
    server = start_server(policy=sim_policy_file)  # type: ignore[operator]
    data = tmp_path / "alpha.txt"
    data.write_text("car\n")
    run = subprocess.run(
        teepsi_cmd(
            "client",
            "--host",
            server.host,
            "--config",
            str(sim_policy_file),
            "--data",
            str(data),
            "--name",
            "alpha",
            "--parties",
            "2",
            "--attestation",
            "sim",
            "--sim-tee",
            "tdx",
            "--allow-simulated",
            "--timeout",
            "30",
            "--quiet",
        ),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode != 0
    assert "peer is a TDX VM, but the policy lists none (add it to tdx_mrs)" in run.stderr
