"""One settings mechanism for `teepsi server` and `teepsi client`: flags, TEEPSI_* variables
and the --run-config TOML file, with the precedence flag > environment > file > default."""

from __future__ import annotations

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
        "TEEPSI_KEY_COLUMN": "email, country",  # a repeatable flag: comma-separated
        "TEEPSI_QUIET": "yes",
        "TEEPSI_TIMEOUT": "12.5",
        "TEEPSI_DATA": str(tmp_path / "in.csv"),
        # Not this command's settings: the deploy scripts' own, and a server key.
        "TEEPSI_PORT": "9",
        "TEEPSI_MAX_JOBS": "4",
    }
    args = parse_settings(["client", "--config", "p.json"], environ)
    assert (args.host, args.name, args.parties) == ("127.0.0.1:7000", "alice", 3)
    assert args.key_column == ["email", "country"] and args.quiet is True
    assert args.timeout == 12.5
    assert args.data == str(tmp_path / "in.csv")


def test_the_settings_file_can_come_from_the_environment(tmp_path: Path) -> None:
    run = tmp_path / "run.toml"
    run.write_text("max_parties = 5\nspill_dir = '/tmp/spill'\nverbose = true\n")
    args = parse_settings(_server(), {"TEEPSI_RUN_CONFIG": str(run)})
    assert (args.max_parties, args.spill_dir, args.verbose) == (5, "/tmp/spill", True)


def _client(*extra: str) -> list[str]:
    return ["client", "--config", "p.json", *extra]


@pytest.mark.parametrize(
    ("argv", "environ", "toml"),
    [
        (_client("--key-column", "email", "--key-column", "country"), {}, None),
        (_client("--key", "email", "--key", "country"), {}, None),  # the old name
        (_client("--key-column", "email", "--key", "country"), {}, None),  # mixed: one flag
        (_client(), {"TEEPSI_KEY_COLUMN": "email,country"}, None),
        (_client(), {"TEEPSI_KEY": "email,country"}, None),
        (_client(), {}, 'key_column = ["email", "country"]\n'),
        (_client(), {}, 'key = ["email", "country"]\n'),
    ],
)
def test_key_column_has_key_as_its_old_name_everywhere(
    argv: list[str], environ: dict[str, str], toml: str | None, tmp_path: Path
) -> None:
    if toml is not None:
        run = tmp_path / "run.toml"
        run.write_text(toml)
        argv = [*argv, "--run-config", str(run)]
    args = parse_settings(argv, environ)
    assert args.key_column == ["email", "country"]
    assert not hasattr(args, "key")


def test_the_key_column_flag_beats_the_old_names_in_the_environment_and_file(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run.toml"
    run.write_text('key = ["from_file"]\n')
    argv = _client("--run-config", str(run))
    assert parse_settings(argv, {"TEEPSI_KEY": "from_env"}).key_column == ["from_env"]
    assert parse_settings([*argv, "--key-column", "flag"], {"TEEPSI_KEY": "e"}).key_column == [
        "flag"
    ]


def test_a_setting_and_its_old_name_together_are_refused(tmp_path: Path) -> None:
    run = tmp_path / "run.toml"
    run.write_text('key = ["a"]\nkey_column = ["b"]\n')
    with pytest.raises(UsageError) as refused:
        parse_settings(_client("--run-config", str(run)), {})
    assert str(refused.value) == (
        f"--run-config {run}: key and key_column are the same setting: give only one"
    )
    with pytest.raises(UsageError) as refused:
        parse_settings(_client(), {"TEEPSI_KEY": "a", "TEEPSI_KEY_COLUMN": "b"})
    assert str(refused.value) == (
        "environment: TEEPSI_KEY and TEEPSI_KEY_COLUMN are the same setting: give only one"
    )
