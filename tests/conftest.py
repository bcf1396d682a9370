"""Shared fixtures: a teepsi server and data providers as separate processes on loopback."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.policy import Policy, policy_for
from teepsi.demo import start_server_process

# CLI servers and clients keep collateral rollback state under $XDG_STATE_HOME by
# default: this session's processes keep theirs in a directory of their own.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="teepsi-test-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)


def teepsi_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "teepsi", *args]


@pytest.fixture(scope="session")
def sim_policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The policy `teepsi measure --attestation sim` prints for this installation."""
    path = tmp_path_factory.mktemp("policy") / "dynamic_config.json"
    subprocess.run(teepsi_cmd("measure", "--attestation", "sim", "-o", str(path)), check=True)
    expected = policy_for(
        [
            ("teepsi server (simulated)", sim_identity(Role.SERVER)),
            ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
        ]
    )
    assert json.loads(path.read_text()) == expected.to_dict()
    return path


def stable_policy_dict() -> dict[str, object]:
    """This installation's simulated identities with MRENCLAVE not pinned.

    For the fault, bad-input, leakage and load tests: they start many processes, and a
    pinned MRENCLAVE (a digest of the installed files) would turn an edit made while they
    run into a policy mismatch instead of the failure under test.
    """
    data = policy_for(
        [
            ("teepsi server (simulated)", sim_identity(Role.SERVER)),
            ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
        ]
    ).to_dict()
    data["verify_mr_enclave"] = "off"
    return data


@pytest.fixture(scope="session")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``stable_policy_dict`` as a dynamic_config.json file."""
    path = tmp_path_factory.mktemp("stable-policy") / "dynamic_config.json"
    path.write_text(json.dumps(stable_policy_dict(), indent=2))
    return path


@pytest.fixture(scope="session")
def policy() -> Policy:
    """``stable_policy_dict`` as a Policy, for in-process servers and clients."""
    return Policy.from_dict(stable_policy_dict())


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")


@pytest.fixture
def start_server(tmp_path: Path, sim_policy_file: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def start(*extra: str, policy: Path | None = sim_policy_file) -> ServerProcess:
        workdir = tmp_path / f"server{len(started)}"
        workdir.mkdir()
        proc, port = start_server_process(workdir, policy, *extra)
        server = ServerProcess(proc, port, workdir)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.proc.kill()
        if server.proc.stdout is not None:
            server.proc.stdout.close()


def client_args(
    server: ServerProcess,
    data: Path,
    *,
    parties: int,
    name: str,
    policy: Path,
    job: str = "default",
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> list[str]:
    return teepsi_cmd(
        "client",
        "--host",
        server.host,
        "--config",
        str(policy),
        "--data",
        str(data),
        "--parties",
        str(parties),
        "--name",
        name,
        "--job",
        job,
        "--attestation",
        "sim",
        "--allow-simulated",
        "--timeout",
        str(timeout),
        "--quiet",
        *extra,
    )


def start_client(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def free_loopback_port() -> int:
    """A port nothing listens on now, for commands whose address is written out in full."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> list[str]:
    """Read a starting ``teepsi server``'s stderr (a pipe) up to its "listening on" line.

    Returns its log lines so far; a thread keeps appending the rest, so a chatty server
    never blocks on a full pipe.
    """
    import select
    import threading
    import time

    stream = proc.stderr
    assert stream is not None
    log: list[str] = []
    deadline = time.monotonic() + timeout
    while not any("listening on" in line for line in log):
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        line = stream.readline().decode(errors="replace") if ready else ""
        assert line, f"the server did not start within {timeout:.0f} s: {''.join(log)}"
        log.append(line)

    def drain() -> None:
        for rest in stream:
            log.append(rest.decode(errors="replace"))

    threading.Thread(target=drain, daemon=True).start()
    return log
