"""Shared fixtures and the per-folder timeouts (docs/testing.md).

Plain helpers (commands, policies, fake servers) are in ``tests.support``; this file holds
only fixtures and hooks, and nothing imports it.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.policy import Policy, policy_for
from teepsi.demo import start_server_process
from tests.support.policy import stable_policy_dict
from tests.support.processes import ServerProcess, teepsi_cmd

# CLI servers and clients keep collateral rollback state under $XDG_STATE_HOME by
# default: this session's processes keep theirs in a directory of their own.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="teepsi-test-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)

#: Seconds a test may take before pytest-timeout fails it, by folder. The slowest unit test
#: takes about 15 s on 2 busy cores and twice that under coverage: a hanging one reports
#: in 90 s. Integration tests start processes (the slowest about a minute under load);
#: a deploy test pip-installs teepsi (about two minutes under load).
TIMEOUT_SECONDS = {"unit": 90, "integration": 300, "deploy": 600}
TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test its folder's timeout unless it sets one itself."""
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        folder = item.path.resolve().relative_to(TESTS_DIR).parts[0]
        seconds = TIMEOUT_SECONDS.get(folder)
        if seconds is not None:
            item.add_marker(pytest.mark.timeout(seconds))


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


@pytest.fixture
def policy_dict() -> dict[str, object]:
    """A fresh ``stable_policy_dict`` for a test to change."""
    return stable_policy_dict()


@pytest.fixture
def start_server(tmp_path: Path, sim_policy_file: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts ``teepsi server`` processes on loopback; each is stopped after the test."""
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
