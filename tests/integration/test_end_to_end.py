"""Whole runs through separate `teepsi server` and `teepsi client` processes on loopback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_faults import _wait_for_log
from tests.support.processes import client_args, start_client, teepsi_cmd


def _errors(stderr: bytes) -> list[str]:
    """The error lines of a run (simulation mode adds loud warning lines of its own)."""
    return [line for line in stderr.decode().splitlines() if " ERROR " in line or "error:" in line]


def _write(path: Path, lines: list[str], *, newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def _run_job(server, tmp_path, policy, datasets, *, job="default", extra=()):
    procs = []
    for index, lines in enumerate(datasets):
        data = tmp_path / f"{job}-data{index}.txt"
        if isinstance(lines, bytes):
            data.write_bytes(lines)
        else:
            _write(data, lines)
        out = tmp_path / f"{job}-out{index}.txt"
        args = client_args(
            server,
            data,
            parties=len(datasets),
            name=f"p{index}",
            policy=policy,
            job=job,
            extra=["--output", str(out), *extra],
        )
        procs.append((start_client(args), out))
    results = []
    for proc, out in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()
        assert stdout == out.read_bytes()
        results.append(out.read_bytes())
    return results


def _expected(datasets) -> bytes:
    sets = []
    for lines in datasets:
        raw = lines if isinstance(lines, bytes) else "\n".join(lines).encode()
        sets.append({line.strip() for line in raw.split(b"\n")} - {b""})
    common = set.intersection(*sets)
    return b"".join(item + b"\n" for item in sorted(common))


def test_seed_demo_prints_car_cat_train():
    for parties in (2, 3):
        run = subprocess.run(
            teepsi_cmd("demo", "--parties", str(parties)), capture_output=True, timeout=180
        )
        assert run.returncode == 0, run.stderr.decode()
        lines = [ln for ln in run.stdout.decode().splitlines() if ln.startswith("data_provider")]
        assert len(lines) == parties
        assert all(ln.endswith("-> car, cat, train") for ln in lines)


def test_random_multi_party_runs(start_server, sim_policy_file, tmp_path):
    server = start_server()
    rng = random.Random(20261130)
    alphabet = ["apple", "Äpfel", "车", "café", "naïve", "🙂", "x", "y y", "tab\tin", "ß"]
    cases = []
    for parties in (2, 3, 4, 5):
        universe = [f"{rng.choice(alphabet)}-{i}" for i in range(60)]
        core = rng.sample(universe, 10)
        datasets = []
        for _ in range(parties):
            items = core + rng.sample(universe, 25)
            items += rng.sample(items, 10)  # duplicates inside one party
            rng.shuffle(items)
            items = [f"  {it} " if rng.random() < 0.2 else it for it in items] + ["", "   "]
            datasets.append(items)
        cases.append(datasets)
    # CRLF files and blank lines.
    cases.append([b"a\r\nb\r\n\r\nc\r\n", b"c\nb\n\n", b"\r\nb\r\nc"])
    # An empty set, and an empty intersection.
    cases.append([["a", "b"], []])
    cases.append([["a", "b"], ["c", "d"], ["a", "d"]])
    for job, datasets in enumerate(cases):
        results = _run_job(server, tmp_path, sim_policy_file, datasets, job=f"job{job}")
        expected = _expected(datasets)
        assert all(r == expected for r in results), f"case {job}"


def test_one_million_items_per_party(start_server, sim_policy_file, tmp_path):
    server = start_server()
    a = [f"user{i:08d}@example.org" for i in range(1_000_000)]
    b = [f"user{i:08d}@example.org" for i in range(500_000, 1_500_000)]
    results = _run_job(server, tmp_path, sim_policy_file, [a, b], job="big")
    expected = b"".join(f"user{i:08d}@example.org\n".encode() for i in range(500_000, 1_000_000))
    assert results[0] == results[1] == expected


def test_second_run_on_same_server_gets_only_its_own_result(
    start_server, sim_policy_file, tmp_path
):
    server = start_server()
    first = _run_job(server, tmp_path / "..", sim_policy_file, [["car", "cat"], ["cat", "car"]])
    assert first[0] == b"car\ncat\n"
    run2 = tmp_path / "run2"
    run2.mkdir()
    second = _run_job(server, run2, sim_policy_file, [["dog", "train"], ["train", "emu"]])
    assert second == [b"train\n", b"train\n"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_party_that_never_arrives_gets_deadline_without_spinning(
    start_server, sim_policy_file, tmp_path
):
    server = start_server("--job-timeout", "6")
    data = _write(tmp_path / "a.txt", ["x", "y"])
    proc = start_client(client_args(server, data, parties=2, name="a", policy=sim_policy_file))
    # Wait (bounded) until the client has uploaded and so is waiting for the result.
    give_up = time.monotonic() + 60
    while "uploaded" not in server.log() and time.monotonic() < give_up:
        time.sleep(0.1)
    assert "uploaded" in server.log()
    time.sleep(0.3)
    server_cpu, client_cpu = _cpu_seconds(server.proc.pid), _cpu_seconds(proc.pid)
    time.sleep(1.5)
    # Both sides are blocked in a wait: nearly no CPU over 1.5 s.
    assert _cpu_seconds(server.proc.pid) - server_cpu < 0.15
    assert _cpu_seconds(proc.pid) - client_cpu < 0.15
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "DEADLINE_EXCEEDED" in stderr.decode()
    assert time.monotonic() - started < 10


def test_client_refuses_server_before_uploading(start_server, sim_policy_file, tmp_path):
    server = start_server()
    data = _write(tmp_path / "a.txt", ["secret-item"])
    import json

    base = json.loads(sim_policy_file.read_text())
    variants = {}
    other = json.loads(json.dumps(base))
    for entry in other["sgx_mrs"]:
        entry["mr_enclave"] = "ab" * 32
    variants["MRENCLAVE"] = other
    higher = json.loads(json.dumps(base))
    for entry in higher["sgx_mrs"]:
        entry["isv_svn"] = str(int(entry["isv_svn"]) + 1)
    variants["ISV_SVN"] = higher
    for what, policy in variants.items():
        path = tmp_path / f"policy-{what}.json"
        path.write_text(json.dumps(policy))
        run = subprocess.run(
            client_args(server, data, parties=1, name="a", policy=path),
            capture_output=True,
            timeout=60,
        )
        assert run.returncode == 1
        err = _errors(run.stderr)
        assert len(err) == 1 and what in err[0] and "refusing the server" in err[0], err
    # Without --allow-simulated the simulated server is refused too.
    args = [
        a
        for a in client_args(server, data, parties=1, name="a", policy=sim_policy_file)
        if a != "--allow-simulated"
    ]
    run = subprocess.run(args, capture_output=True, timeout=60)
    assert run.returncode == 1
    err = _errors(run.stderr)
    assert len(err) == 1 and "SIMULATED" in err[0] and "--allow-simulated" in err[0]
    assert "joined" not in server.log() and "uploaded" not in server.log()


def test_server_refuses_data_provider(start_server, sim_policy_file, tmp_path):
    import json

    other = json.loads(sim_policy_file.read_text())
    for entry in other["sgx_mrs"]:
        entry["mr_enclave"] = "cd" * 32
    path = tmp_path / "server-policy.json"
    path.write_text(json.dumps(other))
    server = start_server(policy=path)
    data = _write(tmp_path / "a.txt", ["secret-item"])
    run = subprocess.run(
        client_args(server, data, parties=1, name="a", policy=sim_policy_file),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 1
    err = _errors(run.stderr)
    assert len(err) == 1 and "PERMISSION_DENIED" in err[0] and "MRENCLAVE" in err[0], err
    assert "secret-item" not in server.log()


def test_server_without_allow_simulated_refuses_sim_provider(
    start_server, sim_policy_file, tmp_path
):
    server = start_server("--config", str(sim_policy_file), policy=None)
    data = _write(tmp_path / "a.txt", ["x"])
    run = subprocess.run(
        client_args(server, data, parties=1, name="a", policy=sim_policy_file),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "PERMISSION_DENIED" in run.stderr.decode() and "SIMULATED" in run.stderr.decode()


def test_server_needs_a_client_policy_or_explicit_opt_out():
    run = subprocess.run(
        teepsi_cmd("server", "--host", "127.0.0.1:0", "--attestation", "sim"),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 2
    err = _errors(run.stderr)
    assert len(err) == 1 and "--config" in err[0] and "--no-client-attestation" in err[0]


def test_unattested_client_needs_server_opt_in(start_server, sim_policy_file, tmp_path):
    data = _write(tmp_path / "a.txt", ["x", "y"])
    strict = start_server()
    args = client_args(strict, data, parties=1, name="a", policy=sim_policy_file)
    args[args.index("--attestation") + 1] = "none"
    run = subprocess.run(args, capture_output=True, timeout=60)
    assert run.returncode == 1 and "requires data providers to attest" in run.stderr.decode()
    relaxed = start_server("--no-client-attestation")
    args = client_args(relaxed, data, parties=1, name="a", policy=sim_policy_file)
    args[args.index("--attestation") + 1] = "none"
    run = subprocess.run(args, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == b"x\ny\n"
    assert "WITHOUT attestation" in relaxed.log()


def test_server_shuts_down_cleanly_on_sigterm(start_server):
    server = start_server()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0
    assert "server stopped" in server.log()
    assert "MRENCLAVE" in server.log()  # it logged its own measurement at start


@pytest.mark.parametrize("bad", ["--parties 0", "--host nohost"])
def test_client_usage_errors_are_one_line(sim_policy_file, tmp_path, bad):
    data = _write(tmp_path / "a.txt", ["x"])
    flag, value = bad.split()
    args = teepsi_cmd(
        "client",
        "--host",
        "127.0.0.1:1",
        "--config",
        str(sim_policy_file),
        "--data",
        str(data),
        "--parties",
        "2",
        "--name",
        "a",
        "--attestation",
        "sim",
        "--allow-simulated",
        "--quiet",
    )
    args[args.index(flag) + 1] = value
    run = subprocess.run(args, capture_output=True, timeout=60)
    assert run.returncode != 0
    assert len(_errors(run.stderr)) == 1


def test_missing_data_file_is_a_usage_error(sim_policy_file, tmp_path):
    run = subprocess.run(
        teepsi_cmd(
            "client",
            "--host",
            "127.0.0.1:1",
            "--config",
            str(sim_policy_file),
            "--data",
            str(tmp_path / "nope.txt"),
            "--parties",
            "2",
            "--name",
            "a",
            "--attestation",
            "sim",
        ),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 2
    err = _errors(run.stderr)
    assert len(err) == 1 and "nope.txt" in err[0]


def _csv_job(server, policy, tmp_path, tables, *, extra=(), job="csv"):
    procs = []
    for index, (text, keys) in enumerate(tables):
        data = tmp_path / f"{job}-in{index}.csv"
        data.write_text(text)
        out = tmp_path / f"{job}-out{index}.csv"
        key_args = [a for k in keys for a in ("--key-column", k)]
        args = client_args(
            server,
            data,
            parties=len(tables),
            name=f"p{index}",
            policy=policy,
            job=job,
            extra=[*key_args, "--output", str(out), *extra],
        )
        procs.append((start_client(args), out))
    outs = []
    for proc, out in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()
        outs.append(out.read_text())
    return outs


def test_csv_composite_keys_through_processes(start_server, sim_policy_file, tmp_path):
    server = start_server()
    a = "first,last,amount\nAda,Lovelace,1\nAda,Lovelace,2\nAlan,Turing,3\n"
    b = "last,first,note\nLovelace,Ada,x\nTuring,Grace,y\n"
    out_a, out_b = _csv_job(
        server, sim_policy_file, tmp_path, [(a, ("first", "last")), (b, ("first", "last"))]
    )
    assert out_a == "first,last,amount\nAda,Lovelace,1\nAda,Lovelace,2\n"
    assert out_b == "last,first,note\nLovelace,Ada,x\n"


def test_normalisation_mismatch_refused(start_server, sim_policy_file, tmp_path):
    server = start_server()
    a = _write(tmp_path / "a.txt", ["Car"])
    b = _write(tmp_path / "b.txt", ["car"])
    pa = start_client(
        client_args(
            server,
            a,
            parties=2,
            name="a",
            policy=sim_policy_file,
            extra=["--normalize", "trim,casefold"],
            timeout=30,
        )
    )
    _wait_for_log(server, "party a joined")  # a's settings are the job's
    run = subprocess.run(
        client_args(server, b, parties=2, name="b", policy=sim_policy_file, timeout=30),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 1
    err = _errors(run.stderr)
    assert len(err) == 1 and "FAILED_PRECONDITION" in err[0] and "--normalize" in err[0]
    pa.kill()
    pa.wait()


def test_spill_gives_identical_results_and_no_plaintext_on_disk(
    start_server, sim_policy_file, tmp_path
):
    rows = 300_000
    keys = [f"person{i:07d}@example.org" for i in range(rows)]
    a = "email,n\n" + "".join(f"{k},{i}\n" for i, k in enumerate(keys))
    b = "email\n" + "".join(f"{k}\n" for k in [*keys[rows // 2 :], "other@x"])
    plain = start_server()
    expected = _csv_job(
        plain, sim_policy_file, tmp_path, [(a, ("email",)), (b, ("email",))], job="plain"
    )
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    spilled = start_server("--memory-budget", "1MiB", "--spill-dir", str(spill_dir))
    got = _csv_job(
        spilled, sim_policy_file, tmp_path, [(a, ("email",)), (b, ("email",))], job="spilled"
    )
    assert got == expected
    assert expected[1].count("\n") == rows // 2 + 1
    assert "spilled to disk, encrypted" in spilled.log()
    # Segment files are deleted once the job ends; the area goes with the server.
    leftovers = [p for p in spill_dir.rglob("*") if p.is_file()]
    assert leftovers == []
    spilled.proc.terminate()
    spilled.proc.wait(20)
    assert list(spill_dir.iterdir()) == []


def test_progress_bars_follow_quiet(start_server, sim_policy_file, tmp_path):
    server = start_server()
    data = _write(tmp_path / "a.txt", ["x", "y"])
    out = tmp_path / "out.txt"
    loud = [
        a
        for a in client_args(
            server,
            data,
            parties=1,
            name="a",
            policy=sim_policy_file,
            job="loud",
            extra=["--output", str(out)],
        )
        if a != "--quiet"
    ]
    run = subprocess.run(loud, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    assert "uploading" in run.stderr.decode() and "reading a.txt" in run.stderr.decode()
    quiet = client_args(server, data, parties=1, name="a", policy=sim_policy_file, job="quiet")
    run = subprocess.run(quiet, capture_output=True, timeout=60)
    assert run.returncode == 0
    assert "uploading" not in run.stderr.decode() and "reading" not in run.stderr.decode()


def test_data_provider_brings_its_own_collateral(start_server, sim_policy_file, tmp_path):
    """Instead of the stapled copy: a collateral file, or a PCCS of the provider's choice."""
    from teepsi.attestation.sim import SimPlatform
    from tests.support.fake_pccs import fake_pccs

    server = start_server()
    data = _write(tmp_path / "a.txt", ["x", "y"])

    def run_client(job: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        args = client_args(
            server, data, parties=1, name="a", policy=sim_policy_file, job=job, extra=extra
        )
        return subprocess.run(args, capture_output=True, timeout=60)

    collateral = SimPlatform().collateral_json()
    path = tmp_path / "collateral.json"
    path.write_text(collateral)
    run = run_client("file", "--collateral", str(path))
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == b"x\ny\n"
    with fake_pccs(collateral) as pccs:
        run = run_client("pccs", "--pccs-url", pccs.url)
        assert run.returncode == 0, run.stderr.decode()
        assert pccs.count("tcb") >= 1  # the provider fetched it, not the server
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    run = run_client("bad", "--collateral", str(broken))
    assert run.returncode == 2
    assert len(_errors(run.stderr)) == 1 and "broken.json" in _errors(run.stderr)[0]
