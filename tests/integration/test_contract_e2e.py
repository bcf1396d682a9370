"""Job contracts through separate server and client processes: every release rule."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_faults import _wait_for_log
from tests.support.processes import start_client, teepsi_cmd

NAMES = ("alpha", "beta", "gamma")
DATA = {
    "alpha": ["car", "bicycle", "train", "cat", "dog"],
    "beta": ["train", "car", "e-car", "cat", "computer"],
    "gamma": ["car", "bicycle", "train", "cat", "dog", "computer"],
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    public = {}
    for name in (*NAMES, "mallory"):
        made = subprocess.run(
            teepsi_cmd("keygen", "--out", str(folder / f"{name}.key")),
            capture_output=True,
            check=True,
        )
        public[name] = made.stdout.decode().strip()
    return folder, public


def _spec(tmp_path: Path, public, *, job="c1", parties=NAMES, **extra) -> Path:
    lines = [f'job_id = "{job}"']
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for name in parties:
        lines += ["[[parties]]", f'name = "{name}"', f'public_key = "{public[name]}"']
    path = tmp_path / f"{job}-{abs(hash(tuple(lines)))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _client(server, policy, tmp_path, keys, name, spec, *, key_name=None, data=None, job_dir=None):
    folder, _ = keys
    data_path = tmp_path / f"{name}.txt"
    data_path.write_text("\n".join(data if data is not None else DATA[name]) + "\n")
    return teepsi_cmd(
        "client",
        "--host",
        server.host,
        "--config",
        str(policy),
        "--data",
        str(data_path),
        "--spec",
        str(spec),
        "--key-file",
        str(folder / f"{key_name or name}.key"),
        "--name",
        name,
        "--attestation",
        "sim",
        "--allow-simulated",
        "--timeout",
        "60",
        "--quiet",
        "--receipt",
        str(tmp_path / f"{name}.receipt.json"),
    )


def _run_all(server, policy, tmp_path, keys, spec, names=NAMES, data=None):
    procs = {
        n: start_client(_client(server, policy, tmp_path, keys, n, spec, data=(data or {}).get(n)))
        for n in names
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[name] = (proc.returncode, stdout.decode(), stderr.decode())
    return out


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line or "error:" in line]


def test_intersection_with_a_non_recipient_and_receipts(
    start_server, sim_policy_file, tmp_path, keys
):
    server = start_server("--audit-log", str(tmp_path / "audit.jsonl"))
    spec = _spec(tmp_path, keys[1], recipients=["alpha", "beta"])
    out = _run_all(server, sim_policy_file, tmp_path, keys, spec)
    assert out["alpha"][:2] == (0, "car\ncat\ntrain\n")
    assert out["beta"][:2] == (0, "car\ncat\ntrain\n")
    code, stdout, _ = out["gamma"]
    assert code == 0 and "not a result recipient" in stdout
    assert "car" not in stdout and "train" not in stdout
    for name in NAMES:
        receipt = tmp_path / f"{name}.receipt.json"
        check = subprocess.run(
            teepsi_cmd(
                "verify-receipt",
                str(receipt),
                "--cert",
                f"{receipt}.cert.pem",
                "--config",
                str(sim_policy_file),
                "--allow-simulated",
            ),
            capture_output=True,
        )
        assert check.returncode == 0, check.stdout
        body = json.loads(check.stdout)["receipt"]
        assert [p["name"] for p in body["parties"]] == list(NAMES)
        assert body["result_size"] == 3
    # Any changed byte breaks the receipt.
    receipt = tmp_path / "alpha.receipt.json"
    original = receipt.read_bytes()
    for position in range(0, len(original) - 1, max(1, len(original) // 40)):
        tampered = bytearray(original)
        tampered[position] ^= 0x01
        receipt.write_bytes(bytes(tampered))
        check = subprocess.run(
            teepsi_cmd("verify-receipt", str(receipt), "--allow-simulated"),
            capture_output=True,
        )
        assert check.returncode != 0, position
    receipt.write_bytes(original)
    # The audit log verifies, and fails after an edit, a deletion and a reordering.
    audit = tmp_path / "audit.jsonl"
    server.proc.terminate()
    server.proc.wait(20)
    verify_audit = teepsi_cmd("audit", "verify", "--allow-simulated", str(audit))
    assert subprocess.run(verify_audit).returncode == 0
    # Simulated evidence is not trusted unless asked for.
    run = subprocess.run(teepsi_cmd("audit", "verify", str(audit)), capture_output=True)
    assert run.returncode == 1 and "SIMULATED" in json.loads(run.stdout)["reason"]
    # Every party's receipt names a head of this log, signed by the same server.
    for name in NAMES:
        receipt = tmp_path / f"{name}.receipt.json"
        run = subprocess.run(
            [*verify_audit, "--receipt", str(receipt)],
            capture_output=True,
        )
        assert run.returncode == 0, run.stdout
        assert json.loads(run.stdout)["unsigned_tail"] == 0  # the stopping server signed
    text = audit.read_text()
    assert "car" not in text and "train" not in text  # never any item
    lines = text.splitlines(keepends=True)
    created = next(i for i, line in enumerate(lines) if '"event":"created"' in line)
    edited = list(lines)
    edited[created] = lines[created].replace('"parties":3', '"parties":4')
    assert edited != lines
    for broken in (edited, lines[:2] + lines[3:], [lines[1], lines[0], *lines[2:]]):
        audit.write_text("".join(broken))
        run = subprocess.run(verify_audit, capture_output=True)
        assert run.returncode == 1 and json.loads(run.stdout)["valid"] is False


def test_count_only(start_server, sim_policy_file, tmp_path, keys):
    server = start_server()
    spec = _spec(tmp_path, keys[1], job="count", output="count")
    out = _run_all(server, sim_policy_file, tmp_path, keys, spec)
    for name in NAMES:
        code, stdout, stderr = out[name]
        assert code == 0, stderr
        assert "count-only job: the intersection has 3 keys" in stdout
        assert "car" not in stdout


def test_threshold_met_and_not_met(start_server, sim_policy_file, tmp_path, keys):
    server = start_server()
    met = _spec(tmp_path, keys[1], job="met", min_intersection=3)
    out = _run_all(server, sim_policy_file, tmp_path, keys, met)
    assert all(out[n][:2] == (0, "car\ncat\ntrain\n") for n in NAMES)
    unmet = _spec(tmp_path, keys[1], job="unmet", min_intersection=4)
    out = _run_all(server, sim_policy_file, tmp_path, keys, unmet)
    for name in NAMES:
        code, stdout, _ = out[name]
        assert code == 0 and "below the job's min_intersection" in stdout
        assert "car" not in stdout and "3" not in stdout  # not even the size


def test_oversized_upload_refused(start_server, sim_policy_file, tmp_path, keys):
    server = start_server()
    spec = _spec(tmp_path, keys[1], job="small", max_items_per_party=5)
    out = _run_all(server, sim_policy_file, tmp_path, keys, spec, names=("alpha", "gamma"))
    code, _, stderr = out["gamma"]  # six items
    assert code == 1 and "RESOURCE_EXHAUSTED" in stderr and "max_items_per_party" in stderr


def test_spec_mismatch_unlisted_and_impersonation_refused(
    start_server, sim_policy_file, tmp_path, keys
):
    server = start_server()
    spec = _spec(tmp_path, keys[1], job="strict")
    other = _spec(tmp_path, keys[1], job="strict", min_intersection=1)
    first = start_client(_client(server, sim_policy_file, tmp_path, keys, "alpha", spec))
    _wait_for_log(server, "party alpha joined")  # the job exists under alpha's spec
    runs = {
        "mismatch": _client(server, sim_policy_file, tmp_path, keys, "beta", other),
        "impersonation": _client(
            server, sim_policy_file, tmp_path, keys, "beta", spec, key_name="mallory"
        ),
    }
    for what, args in runs.items():
        run = subprocess.run(args, capture_output=True, timeout=60)
        err = _errors(run.stderr.decode())
        assert run.returncode != 0, what
        assert len(err) == 1, (what, err)
        if what == "mismatch":
            assert "FAILED_PRECONDITION" in err[0] and "digest mismatch" in err[0]
            assert "min_intersection" not in err[0]  # nothing of the job's spec leaks
        else:
            assert "not the key the spec lists" in err[0]
    # An attested client whose name the spec does not list cannot join the job: a spec of
    # its own that lists it is another job (keyed by the spec digest), of which it learns
    # nothing, and which does not touch the real one.
    outsider = _spec(tmp_path, keys[1], job="strict", parties=("alpha", "beta", "mallory"))
    mallory = start_client(
        _client(server, sim_policy_file, tmp_path, keys, "mallory", outsider, data=["car"])
    )
    try:
        give_up = time.monotonic() + 60
        while server.log().count("job strict created") < 2:
            assert time.monotonic() < give_up and mallory.poll() is None, server.log()[-2000:]
            time.sleep(0.05)
    finally:
        mallory.kill()
        mallory.wait()
    # A listed party cannot join twice.
    again = subprocess.run(
        _client(server, sim_policy_file, tmp_path, keys, "alpha", spec),
        capture_output=True,
        timeout=60,
    )
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr.decode()
    first.kill()
    first.wait()


def test_server_refuses_a_forged_key_for_a_listed_name(
    start_server, sim_policy_file, tmp_path, keys
):
    """The spec names mallory's key for beta: the server only accepts beta's signature."""
    server = start_server()
    _, public = keys
    forged = dict(public)
    forged["beta"] = public["mallory"]
    spec = _spec(tmp_path, forged, job="forged")
    run = subprocess.run(
        _client(server, sim_policy_file, tmp_path, keys, "beta", spec),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 2 and "not the key the spec lists" in run.stderr.decode()


def test_spec_check_prints_digest(tmp_path, keys):
    spec = _spec(tmp_path, keys[1], job="digest")
    run = subprocess.run(teepsi_cmd("spec", "check", str(spec)), capture_output=True)
    assert run.returncode == 0
    assert len(json.loads(run.stdout)["sha256"]) == 64
    bad = tmp_path / "bad.toml"
    bad.write_text('job_id = "x"\noutput = "everything"\n')
    run = subprocess.run(teepsi_cmd("spec", "check", str(bad)), capture_output=True)
    assert run.returncode == 2
    err = run.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "bad.toml" in err[0] and "output" in err[0]
