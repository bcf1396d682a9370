"""teepsi server --attestation tdx without configfs-tsm: one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.processes import teepsi_cmd


def test_server_attestation_tdx_without_configfs_is_one_line() -> None:
    run = subprocess.run(
        teepsi_cmd(
            "server",
            "--attestation",
            "tdx",
            "--no-client-attestation",
            "--host",
            "127.0.0.1:0",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if Path("/sys/kernel/config/tsm/report").is_dir():
        pytest.skip("this machine has configfs-tsm")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert "--attestation tdx: cannot make this server's quote" in lines[0]
    assert "configfs-tsm needs a TDX guest with Linux 6.7" in lines[0]
