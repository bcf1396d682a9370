"""``teepsi demo``: the seed's toy PSI, every role a separate process, in sim mode."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
from pathlib import Path

#: The seed's toy data sets; all three intersect to car, cat, train.
SEED_DATA = {
    "data1.txt": ["car", "bicycle", "train", "cat", "dog"],
    "data2.txt": ["train", "car", "e-car", "cat", "computer"],
    "data3.txt": ["car", "bicycle", "train", "cat", "dog", "computer"],
}


def _teepsi(*args: str) -> list[str]:
    return [sys.executable, "-m", "teepsi", *args]


def start_server_process(
    workdir: Path, policy: Path | None, *extra: str, timeout: float = 60.0
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``teepsi server`` in sim mode on a free loopback port; return (process, port).

    The server announces its port as one JSON line on stdout; we block on that pipe
    (with a timeout), so nothing polls.
    """
    # No drain: nothing balances load over a loopback server, and it stops at once.
    args = ["server", "--host", "127.0.0.1:0", "--attestation", "sim", "--announce"]
    args += ["--drain-seconds", "0"]
    if policy is not None:
        args += ["--config", str(policy), "--allow-simulated"]
    log = (workdir / "server.log").open("ab")
    proc = subprocess.Popen(_teepsi(*args, *extra), stdout=subprocess.PIPE, stderr=log, cwd=workdir)
    log.close()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start; see {workdir / 'server.log'}")
    return proc, int(json.loads(line)["port"])


def _start_client(
    port: int, policy: Path, data: Path, name: str, *extra: str, verbose: bool
) -> subprocess.Popen[bytes]:
    """One data provider, in sim mode, against the local server."""
    cmd = _teepsi(
        "client",
        "--host",
        f"127.0.0.1:{port}",
        "--config",
        str(policy),
        "--data",
        str(data),
        "--name",
        name,
        "--attestation",
        "sim",
        "--allow-simulated",
        "--timeout",
        "120",
        "--quiet",
        *extra,
    )
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE
    )


def _finish_client(name: str, proc: subprocess.Popen[bytes]) -> bytes | None:
    """The client's stdout, or None after printing why it failed."""
    out, err = proc.communicate(timeout=180)
    if proc.returncode == 0:
        return out
    reason = (err or b"").decode(errors="replace").strip().splitlines()
    print(f"{name}: FAILED: {reason[-1] if reason else proc.returncode}")
    return None


CONTRACT_PARTIES = ("hospital", "insurer", "researcher")


def _contract_spec(workdir: Path) -> Path:
    """Keys for three parties and a spec in which the researcher receives nothing."""
    lines = [
        'job_id = "toy-contract"',
        'output = "intersection"',
        "min_intersection = 2",
        'normalize = "trim,casefold"',
        'recipients = ["hospital", "insurer"]',
    ]
    for name in CONTRACT_PARTIES:
        key = workdir / f"{name}.key"
        made = subprocess.run(_teepsi("keygen", "--out", str(key)), capture_output=True, check=True)
        public = made.stdout.decode().strip()
        lines += ["", "[[parties]]", f'name = "{name}"', f'public_key = "{public}"']
    path = workdir / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_contract_demo(*, verbose: bool = False) -> int:
    """Three parties under a job spec: two recipients, one contributor who learns nothing."""
    with tempfile.TemporaryDirectory(prefix="teepsi-contract-demo-") as tmp:
        workdir = Path(tmp)
        policy = workdir / "dynamic_config.json"
        subprocess.run(_teepsi("measure", "--attestation", "sim", "-o", str(policy)), check=True)
        spec = _contract_spec(workdir)
        digest = subprocess.run(_teepsi("spec", "check", str(spec)), capture_output=True)
        print(
            "teepsi demo --contract: job spec",
            json.loads(digest.stdout)["sha256"][:16] + "…",
            "(recipients: hospital, insurer; researcher contributes only)",
        )
        for index, name in enumerate(CONTRACT_PARTIES, start=1):
            (workdir / f"{name}.txt").write_text("\n".join(SEED_DATA[f"data{index}.txt"]) + "\n")
        audit = workdir / "audit.jsonl"
        server, port = start_server_process(workdir, policy, "--audit-log", str(audit))
        try:
            procs = {
                name: _start_client(
                    port,
                    policy,
                    workdir / f"{name}.txt",
                    name,
                    "--spec",
                    str(spec),
                    "--key-file",
                    str(workdir / f"{name}.key"),
                    "--receipt",
                    str(workdir / f"{name}.receipt.json"),
                    verbose=verbose,
                )
                for name in CONTRACT_PARTIES
            }
            failed = False
            for name, proc in procs.items():
                out = _finish_client(name, proc)
                if out is None:
                    failed = True
                    continue
                lines = out.decode().split()
                shown = ", ".join(lines) if len(lines) < 10 else out.decode().strip()
                check = subprocess.run(
                    # The receipt's certificate and collateral sit beside it; the quote
                    # is verified under the simulated root, as of the receipt's time.
                    _teepsi(
                        "verify-receipt",
                        str(workdir / f"{name}.receipt.json"),
                        "--config",
                        str(policy),
                        "--allow-simulated",
                    ),
                    capture_output=True,
                )
                verdict = "receipt verified" if check.returncode == 0 else "RECEIPT INVALID"
                failed |= check.returncode != 0
                print(f"{name} -> {shown}  [{verdict}]")
        finally:
            server.terminate()
            server.wait(timeout=30)
        # Against a receipt: the log holds, unchanged, everything up to that job's release.
        receipt = workdir / f"{CONTRACT_PARTIES[-1]}.receipt.json"
        chain = subprocess.run(
            _teepsi("audit", "verify", str(audit), "--receipt", str(receipt), "--allow-simulated"),
            capture_output=True,
        )
        report = json.loads(chain.stdout) if chain.stdout else {}
        print(
            f"audit log: {report.get('entries')} entries, "
            f"{report.get('signed_entries')} covered by the enclave's signature, "
            f"consistent with {receipt.name}: "
            f"{'yes' if chain.returncode == 0 else 'NO: ' + str(report.get('reason'))}"
        )
        return 1 if failed or chain.returncode != 0 else 0


def run_demo(*, parties: int = 3, verbose: bool = False, tee: str = "sgx") -> int:
    """The toy PSI; ``tee`` "tdx" runs every role as a simulated TDX VM of one image."""
    sim_tee = ("--sim-tee", tee)
    with tempfile.TemporaryDirectory(prefix="teepsi-demo-") as tmp:
        workdir = Path(tmp)
        policy = workdir / "dynamic_config.json"
        subprocess.run(
            _teepsi("measure", "--attestation", "sim", *sim_tee, "-o", str(policy)), check=True
        )
        for name, items in SEED_DATA.items():
            (workdir / name).write_text("\n".join(items) + "\n")
        print(
            f"teepsi demo: {parties} data providers and a server, each its own process, "
            f"SIMULATED {tee.upper()} attestation (no hardware guarantee)"
        )
        server, port = start_server_process(workdir, policy, *sim_tee)
        try:
            clients = [
                _start_client(
                    port,
                    policy,
                    workdir / f"data{index}.txt",
                    f"data_provider{index}",
                    "--parties",
                    str(parties),
                    "--output",
                    str(workdir / f"result{index}.txt"),
                    *sim_tee,
                    verbose=verbose,
                )
                for index in range(1, parties + 1)
            ]
            failed = False
            for index, proc in enumerate(clients, start=1):
                out = _finish_client(f"data_provider{index}", proc)
                if out is None:
                    failed = True
                    continue
                items = out.decode().split()
                data = SEED_DATA[f"data{index}.txt"]
                print(f"data_provider{index} {data} -> {', '.join(items)}")
        finally:
            server.terminate()
            server.wait(timeout=30)
        if failed:
            print(f"server log:\n{(workdir / 'server.log').read_text()}", file=sys.stderr)
            return 1
        return 0
