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
    args = ["server", "--host", "127.0.0.1:0", "--attestation", "sim", "--announce"]
    if policy is not None:
        args += ["--config", str(policy), "--allow-simulated"]
    log = (workdir / "server.log").open("ab")
    proc = subprocess.Popen(_teepsi(*args, *extra), stdout=subprocess.PIPE, stderr=log)
    log.close()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start; see {workdir / 'server.log'}")
    return proc, int(json.loads(line)["port"])


def run_demo(*, parties: int = 3, verbose: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="teepsi-demo-") as tmp:
        workdir = Path(tmp)
        policy = workdir / "dynamic_config.json"
        subprocess.run(_teepsi("measure", "--attestation", "sim", "-o", str(policy)), check=True)
        for name, items in SEED_DATA.items():
            (workdir / name).write_text("\n".join(items) + "\n")
        print(
            f"teepsi demo: {parties} data providers and a server, each its own process, "
            "SIMULATED attestation (no hardware guarantee)"
        )
        server, port = start_server_process(workdir, policy)
        try:
            clients = []
            for index in range(1, parties + 1):
                cmd = _teepsi(
                    "client",
                    "--host",
                    f"127.0.0.1:{port}",
                    "--config",
                    str(policy),
                    "--data",
                    str(workdir / f"data{index}.txt"),
                    "--parties",
                    str(parties),
                    "--name",
                    f"data_provider{index}",
                    "--attestation",
                    "sim",
                    "--allow-simulated",
                    "--timeout",
                    "120",
                    "--quiet",
                    "--output",
                    str(workdir / f"result{index}.txt"),
                )
                clients.append(
                    subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE
                    )
                )
            failed = False
            for index, proc in enumerate(clients, start=1):
                out, err = proc.communicate(timeout=180)
                if proc.returncode != 0:
                    failed = True
                    reason = (err or b"").decode(errors="replace").strip().splitlines()
                    print(
                        f"data_provider{index}: FAILED: {reason[-1] if reason else proc.returncode}"
                    )
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
