"""One settings mechanism for `teepsi server` and `teepsi client`: flags, TEEPSI_* variables
and the --run-config TOML file, with the precedence flag > environment > file > default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from teepsi.cli import UsageError, parse_settings


def _server(*extra: str) -> list[str]:
    return ["server", "--attestation", "sim", "--no-client-attestation", *extra]


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        (None, None, None, 256),  # the default
        (None, None, 8, 8),  # the file beats the default
        (None, "16", 8, 16),  # the environment beats the file
        ("32", "16", 8, 32),  # the flag beats both
        ("32", None, 8, 32),
        ("32", "16", None, 32),
    ],
)
def test_precedence_is_flag_then_environment_then_file_then_default(
    tmp_path: Path, flag: str | None, env: str | None, file: int | None, expected: int
) -> None:
    run = tmp_path / "server.toml"
    run.write_text("" if file is None else f"max_jobs = {file}\n")
    argv = _server("--run-config", str(run), *(["--max-jobs", flag] if flag else []))
    environ = {} if env is None else {"TEEPSI_MAX_JOBS": env}
    assert parse_settings(argv, environ).max_jobs == expected


def test_every_kind_of_flag_comes_from_the_environment(tmp_path: Path) -> None:
    environ = {
        "TEEPSI_HOST": "127.0.0.1:7000",
        "TEEPSI_NAME": "alice",
        "TEEPSI_PARTIES": "3",
        "TEEPSI_KEY": "email, country",  # a repeatable flag: comma-separated
        "TEEPSI_QUIET": "yes",
        "TEEPSI_TIMEOUT": "12.5",
        "TEEPSI_DATA": str(tmp_path / "in.csv"),
        # Not this command's settings: the deploy scripts' own, and a server key.
        "TEEPSI_PORT": "9",
        "TEEPSI_MAX_JOBS": "4",
    }
    args = parse_settings(["client", "--config", "p.json"], environ)
    assert (args.host, args.name, args.parties) == ("127.0.0.1:7000", "alice", 3)
    assert args.key == ["email", "country"] and args.quiet is True and args.timeout == 12.5
    assert args.data == str(tmp_path / "in.csv")


def test_the_settings_file_can_come_from_the_environment(tmp_path: Path) -> None:
    run = tmp_path / "run.toml"
    run.write_text("max_parties = 5\nspill_dir = '/tmp/spill'\nverbose = true\n")
    args = parse_settings(_server(), {"TEEPSI_RUN_CONFIG": str(run)})
    assert (args.max_parties, args.spill_dir, args.verbose) == (5, "/tmp/spill", True)


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
