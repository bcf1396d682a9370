"""Environment variables a teepsi process refuses, in one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from teepsi.cli import UsageError, parse_settings
from tests.unit.test_settings import (
    _server,
)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("TEEPSI_ALLOW_SIMULATED", "1", "decides whom this process trusts"),
        ("TEEPSI_CONFIG", "/tmp/p.json", "only the command line sets it (--config)"),
        ("TEEPSI_ATTESTATION", "sim", "only the command line sets it (--attestation)"),
        ("TEEPSI_ALLOW_OUTDATED_TCB", "true", "(--allow-outdated-tcb)"),
        ("TEEPSI_COLLATERAL_STATE", "/tmp/s.json", "(--collateral-state)"),
        ("TEEPSI_MAX_JOBS", "many", "'many' is not a whole number"),
        ("TEEPSI_MAX_JOBS", "0", "'0': must be at least 1"),
        ("TEEPSI_MEMORY_BUDGET", "lots", "'lots' is not a size"),
        ("TEEPSI_VERBOSE", "maybe", "expected 1, true, yes, on, 0, false, no or off"),
        ("TEEPSI_HOST", "0.0.0.0", "has no port"),
    ],
)
def test_bad_or_trust_deciding_variables_are_one_line_exit_2(
    name: str, value: str, problem: str
) -> None:
    with pytest.raises(UsageError) as refused:
        parse_settings(_server(), {name: value})
    assert str(refused.value).startswith(f"environment {name}: "), refused.value
    assert problem in str(refused.value)
    # The same from a real process: one line, exit 2.
    result = subprocess.run(
        [sys.executable, "-m", "teepsi", *_server("--host", "127.0.0.1:0")],
        env={"PATH": "/usr/bin:/bin", name: value},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if name == "TEEPSI_HOST":
        return  # the flag given here beats the variable
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"teepsi server: error: environment {name}: {str(refused.value).split(': ', 1)[1]}"
    ]


def test_client_help_names_key_column_and_its_old_name() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "teepsi", "client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "[--key-column COLUMN]" in result.stdout
    assert "--key-column COLUMN, --key COLUMN" in result.stdout
