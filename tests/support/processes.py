"""Commands and processes for the tests: ``teepsi`` CLI processes on loopback."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def teepsi_cmd(*args: str) -> list[str]:
    """``python -m teepsi ARGS`` with this interpreter (the installed teepsi)."""
    return [sys.executable, "-m", "teepsi", *args]


@dataclass
class ServerProcess:
    """A ``teepsi server`` process started by the ``start_server`` fixture."""

    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> list[str]:
    """Read a starting ``teepsi server``'s stderr (a pipe) up to its "listening on" line.

    Returns its log lines so far; a thread keeps appending the rest, so a chatty server
    never blocks on a full pipe.
    """
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
