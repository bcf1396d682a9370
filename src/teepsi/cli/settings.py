"""One settings mechanism for ``teepsi server`` and ``teepsi client``: a flag beats a
``TEEPSI_<KEY>`` variable, which beats the ``--run-config`` TOML file, which beats the
default. The keys are the commands' long flags with ``_`` for ``-`` (so a new flag is a
setting at once), except the trust flags, which only the command line may set.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from teepsi.cli.errors import UsageError
from teepsi.cli.values import non_negative_int, parse_size, positive_int, positive_seconds

#: Flags only the command line may set (under Gramine: the measured ``loader.argv``). They
#: decide whom this process trusts (the policy, the attestation mode, the allow flags, where
#: collateral comes from) or hold its rollback state, so neither a settings file (an allowed,
#: host-written file in an enclave) nor an environment variable may set them.
TRUST_FLAGS: frozenset[str] = frozenset(
    {
        "--config",
        "--attestation",
        "--sim-tee",
        "--allow-simulated",
        "--allow-outdated-tcb",
        "--allow-hw-config",
        "--allow-sw-hardening",
        "--no-client-attestation",
        "--insecure-pccs-tls",
        "--pccs-url",
        "--qcnl-config",
        "--collateral",
        "--collateral-state",
    }
)
#: Options that are not settings: the settings file itself, help, internal switches.
_NOT_SETTINGS = frozenset({"--run-config", "--announce", "--help", "--version"})
#: Environment variables of the settings: TEEPSI_ and the key in capitals (TEEPSI_MAX_JOBS).
ENV_PREFIX = "TEEPSI_"
RUN_CONFIG_ENV = ENV_PREFIX + "RUN_CONFIG"
_ENV_TRUE = frozenset({"1", "true", "yes", "on"})
_ENV_FALSE = frozenset({"0", "false", "no", "off", ""})


def _long_options(action: argparse.Action) -> list[str]:
    return [o for o in action.option_strings if o.startswith("--")]


def setting_key(flag: str) -> str:
    """The settings-file key of a flag: ``--max-jobs`` -> ``max_jobs``."""
    return flag.removeprefix("--").replace("-", "_")


def run_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``key -> flag`` for every setting of a command a file or the environment may give:
    each of its long options except the trust flags, an alias too (``key`` for
    ``--key``, the old name of ``--key-column``)."""
    keys: dict[str, str] = {}
    for action in parser._actions:
        for flag in _long_options(action):
            if flag not in TRUST_FLAGS and flag not in _NOT_SETTINGS:
                keys[setting_key(flag)] = flag
    return keys


def trust_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``key -> flag`` of the command's trust flags (named in refusals)."""
    flags = (f for a in parser._actions for f in _long_options(a))
    return {setting_key(f): f for f in flags if f in TRUST_FLAGS}


def _actions_by_option(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: a for a in parser._actions for option in a.option_strings}


def _toml_types(action: argparse.Action) -> tuple[type, ...]:
    """The TOML value types a flag takes: what its command-line type can mean, no more."""
    if action.nargs == 0:
        return (bool,)
    if action.type in (int, positive_int, non_negative_int):
        return (int,)
    if action.type in (float, positive_seconds):
        return (int, float)
    if action.type is parse_size:
        return (int, str)
    return (str,)


def _convert(action: argparse.Action, item: object, where: str) -> object:
    """One value as the flag's own type and choices check it (``where`` names its source)."""
    converter = action.type if callable(action.type) else None
    try:
        result = item if converter is None else converter(str(item))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise UsageError(f"{where}: {exc}", in_cli_terms=True) from None
    if action.choices is not None and result not in action.choices:
        raise UsageError(
            f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}",
            in_cli_terms=True,
        )
    return result


def _refuse_key(where: str, key: str, parser: argparse.ArgumentParser) -> UsageError:
    trust = trust_keys(parser)
    if key in trust:
        return UsageError(
            f"{where}: not a per-run setting: it decides whom this process trusts, so only "
            f"the command line sets it ({trust[key]})",
            in_cli_terms=True,
        )
    from teepsi.jsontext import did_you_mean

    command = parser.prog.split()[-1]
    keys = run_keys(parser)
    hint = did_you_mean(key, keys)
    example = next((k for k in keys if "_" in k), "host")
    return UsageError(
        f"{where}: not a per-run setting of teepsi {command}{hint}; the keys are the long "
        f"flags of teepsi {command} --help with _ for -, e.g. {example} for {keys[example]}",
        in_cli_terms=True,
    )


def _one_per_setting(layer: dict[str, tuple[str, object]], source: str) -> None:
    """A flag and its alias (key_column and key) are one setting: one source gives one."""
    seen: dict[str, str] = {}
    for key, (dest, _) in layer.items():
        if dest in seen:
            raise UsageError(
                f"{source}: {seen[dest]} and {key} are the same setting: give only one",
                in_cli_terms=True,
            )
        seen[dest] = key


def _run_config_values(
    path: Path, parser: argparse.ArgumentParser
) -> dict[str, tuple[str, object]]:
    """``key -> (dest, value)`` from a settings file, each value checked as its flag checks it."""
    import tomllib

    try:
        values: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(
            f"--run-config {path}: cannot read: {exc.strerror}", in_cli_terms=True
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--run-config {path}: not valid TOML: {exc}", in_cli_terms=True) from None
    keys = run_keys(parser)
    actions = _actions_by_option(parser)
    merged: dict[str, tuple[str, object]] = {}
    for key, value in values.items():
        where = f"--run-config {path}: {key}"
        flag = keys.get(key)
        if flag is None:
            raise _refuse_key(where, key, parser)
        action = actions[flag]
        many = isinstance(action, argparse._AppendAction)  # a repeatable flag: a TOML list
        wanted = _toml_types(action)
        kinds = " or ".join(t.__name__ for t in wanted)
        items = value if many and isinstance(value, list) else [value]
        for item in items:
            # bool is an int subclass: true must not pass for a number.
            if (
                (many and not isinstance(value, list))
                or not isinstance(item, wanted)
                or (isinstance(item, bool) and bool not in wanted)
            ):
                raise UsageError(
                    f"{where}: wrong type {type(item).__name__} "
                    f"(expected {f'a list of {kinds}' if many else kinds}, as for {flag})",
                    in_cli_terms=True,
                )
        converted = [_convert(action, item, where) for item in items]
        merged[key] = (action.dest, converted if many else converted[0])
    _one_per_setting(merged, f"--run-config {path}")
    return merged


def _environment_values(
    environ: Mapping[str, str], parser: argparse.ArgumentParser
) -> dict[str, tuple[str, object]]:
    """``key -> (dest, value)`` from ``TEEPSI_<KEY>`` variables, checked as the flags check.

    A flag that takes no value reads 1/true/yes/on or 0/false/no/off; a repeatable one
    (``--key-column``) a comma-separated list. A variable naming a trust flag is refused;
    other ``TEEPSI_*`` names (the deploy scripts' own, another command's keys) are not
    settings of this command and are left alone.
    """
    actions = _actions_by_option(parser)
    trust = trust_keys(parser)
    keys = run_keys(parser)
    merged: dict[str, tuple[str, object]] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == RUN_CONFIG_ENV:
            continue
        key = name.removeprefix(ENV_PREFIX).lower()
        text = environ[name]
        where = f"environment {name}"
        if key in trust:
            raise _refuse_key(where, key, parser)
        flag = keys.get(key)
        if flag is None:
            continue
        action = actions[flag]
        value: object
        if action.nargs == 0:
            word = text.strip().lower()
            if word not in _ENV_TRUE | _ENV_FALSE:
                raise UsageError(
                    f"{where}: {text!r}: expected 1, true, yes, on, 0, false, no or off",
                    in_cli_terms=True,
                )
            value = word in _ENV_TRUE
        elif isinstance(action, argparse._AppendAction):
            value = [_convert(action, part.strip(), where) for part in text.split(",")]
        else:
            value = _convert(action, text, where)
        merged[key] = (action.dest, value)
    _one_per_setting({ENV_PREFIX + k.upper(): v for k, v in merged.items()}, "environment")
    return merged


def apply_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Merge the settings file (``--run-config`` or ``$TEEPSI_RUN_CONFIG``) and the
    ``TEEPSI_*`` variables into ``args``: a flag beats a variable, which beats the file,
    which beats the default. ``args.explicit`` holds the dests given on the command line.
    """
    parser = args.subparser
    if not args.run_config and environ.get(RUN_CONFIG_ENV):
        args.run_config = environ[RUN_CONFIG_ENV]
    layers = [_environment_values(environ, parser)]
    if args.run_config:
        layers.append(_run_config_values(Path(args.run_config), parser))
    for layer in reversed(layers):  # the file first, so the environment overrides it
        for dest, value in layer.values():
            if dest not in args.explicit:
                setattr(args, dest, value)


def parser_tree(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's parser under it."""
    pending = [parser]
    while pending:
        current = pending.pop()
        yield current
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())


def explicit_dests(fresh_parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests the command line itself sets: the same parse with every default left out
    (``fresh_parser`` is changed for that: pass one built for this alone)."""
    for current in parser_tree(fresh_parser):
        for action in current._actions:
            action.default = argparse.SUPPRESS
    return set(vars(fresh_parser.parse_args(argv)))
