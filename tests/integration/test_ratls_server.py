"""A teepsi server process and the lifetime of its RA-TLS certificate."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_server_stops_when_its_certificate_ends(tmp_path: Path) -> None:
    """Past its end no verifier accepts the certificate: the server says so and exits 1."""
    import subprocess
    import sys
    import time

    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "teepsi",
            "server",
            "--host",
            "127.0.0.1:0",
            "--attestation",
            "sim",
            "--no-client-attestation",
            "--certificate-lifetime",
            "2s",
            "--job-timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "server certificate expired at" in errors[0], result.stderr
    assert "start the server again" in errors[0]
    assert time.monotonic() - started < 50


@pytest.mark.parametrize(
    ("lifetime", "problem"),
    [
        ("91d", "out of range"),
        ("5m", "must be longer than --job-timeout 600s"),
        ("0s", "is not a duration"),
        ("soon", "is not a duration"),
        ("-5m", "is not a duration"),
    ],
)
def test_server_certificate_lifetime_is_checked(lifetime: str, problem: str) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "teepsi",
            "server",
            "--attestation",
            "sim",
            "--no-client-attestation",
            "--host",
            "127.0.0.1:0",
            f"--certificate-lifetime={lifetime}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and problem in errors[0], result.stderr
