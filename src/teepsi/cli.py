"""The ``teepsi`` command line: a thin layer over :mod:`teepsi.server` and :mod:`teepsi.client`.

Exit codes: 0 success; 1 the run failed or a peer was refused; 2 bad usage or input;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from teepsi import __version__
from teepsi.attestation.providers import PROVIDER_NAMES, SIM_TEES

if TYPE_CHECKING:
    from teepsi.contract.receipt import SignedReceipt

log = logging.getLogger("teepsi")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UsageError(Exception):
    """Bad flags or input files; exit code 2."""


def _setup_logging(role: str, verbose: bool, quiet: bool = False, log_format: str = "text") -> None:
    from teepsi.logformat import setup_logging

    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    setup_logging(role, level, log_format)


def _add_log_flags(parser: argparse.ArgumentParser) -> None:
    from teepsi.logformat import LOG_FORMATS

    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default): a UTC timestamp, then the line; json: one object per line "
        "(ts, level, logger, msg, role, and structured fields) for log shippers; "
        "a client then draws no progress bars",
    )


def _load_policy(path: str | None, args: argparse.Namespace) -> object:
    from teepsi.attestation.policy import Policy, PolicyError, TcbAllowances

    if path is None:
        return None
    try:
        policy = Policy.load(path)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    widened = TcbAllowances(
        outdated=policy.tcb.outdated or args.allow_outdated_tcb,
        hw_config_needed=policy.tcb.hw_config_needed or args.allow_hw_config,
        sw_hardening_needed=policy.tcb.sw_hardening_needed or args.allow_sw_hardening,
    )
    return policy.with_tcb(widened)


def _add_trust_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-simulated",
        action="store_true",
        help="accept SIMULATED peer evidence (no hardware guarantee; for tests and demos only)",
    )
    parser.add_argument(
        "--allow-outdated-tcb",
        action="store_true",
        help="accept peers whose TCB status is OutOfDate",
    )
    parser.add_argument(
        "--allow-hw-config",
        action="store_true",
        help="accept peers whose TCB status needs platform configuration",
    )
    parser.add_argument(
        "--allow-sw-hardening",
        action="store_true",
        help="accept peers whose TCB status needs software hardening",
    )


def _cmd_server(args: argparse.Namespace) -> int:
    from teepsi.attestation.policy import Policy
    from teepsi.attestation.ratls import DEFAULT_LIFETIME
    from teepsi.server.app import (
        RunningServer,
        ServerConfig,
        ServerConfigError,
        ServerEnd,
        run_server,
    )
    from teepsi.server.jobs import Limits

    _setup_logging("server", args.verbose, log_format=args.log_format)
    if args.no_client_attestation and args.config is None:
        policy = None
    else:
        if args.config is None:
            raise UsageError(
                "--config: a policy for data providers is required "
                "(or pass --no-client-attestation)"
            )
        loaded = _load_policy(args.config, args)
        assert isinstance(loaded, Policy)
        policy = loaded
    config = ServerConfig(
        host=args.host,
        attestation=args.attestation,
        sim_tee=_sim_tee(args),
        client_policy=policy,
        require_client_attestation=not args.no_client_attestation,
        allow_simulated=args.allow_simulated,
        limits=Limits(
            job_timeout_seconds=args.job_timeout,
            max_jobs=args.max_jobs,
            max_parties_per_job=args.max_parties,
            max_items_per_party=args.max_items,
            memory_budget_bytes=args.memory_budget,
            join_timeout_seconds=args.join_timeout,
            max_jobs_per_party=args.max_jobs_per_party,
            max_jobs_per_address=args.max_jobs_per_address,
            upload_idle_timeout_seconds=args.upload_idle_timeout,
        ),
        max_connections=args.max_connections,
        connection_idle_seconds=args.connection_idle_timeout,
        handshake_timeout_seconds=args.handshake_timeout,
        spill_dir=args.spill_dir,
        max_workers=args.max_workers,
        audit_log=args.audit_log,
        certificate_lifetime=args.certificate_lifetime or DEFAULT_LIFETIME,
        collateral_state=_collateral_state(args, "server"),
        pccs_url=args.pccs_url,
        qcnl_path=args.qcnl_config,
        insecure_pccs_tls=args.insecure_pccs_tls,
        metrics_host=args.metrics_host,
        metrics_public=args.metrics_public,
    )

    def announce(running: RunningServer) -> None:
        # The demo and tests learn the bound port from one JSON line on stdout.
        sys.stdout.write(json.dumps({"port": running.port, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()

    try:
        end = run_server(config, on_ready=announce if args.announce else None)
    except ServerConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    return {
        ServerEnd.STOPPED: EXIT_OK,
        ServerEnd.INTERRUPTED: EXIT_INTERRUPTED,
        ServerEnd.CERTIFICATE_ENDED: EXIT_FAILED,
    }[end]


def parse_size(text: str) -> int:
    """An argparse type over :func:`teepsi.sizes.parse_size`."""
    from teepsi.sizes import parse_size as parse_byte_size

    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole_number_from(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {minimum}")
        return value

    return parse


#: A count of at least 1 (a limit of 0 or less would refuse everything, or nothing).
positive_int = _whole_number_from(1)
#: A count of 0 or more (0 where a limit may be turned off).
non_negative_int = _whole_number_from(0)


def positive_seconds(text: str) -> float:
    """Seconds, finite and above 0 (float() would take nan, inf and negatives)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds above 0")
    return value


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


def _address(text: str, lowest_port: int) -> str:
    """HOST:PORT or [IPv6]:PORT, the port in lowest_port..65535 (gRPC itself would pick
    443 for a missing port and wrap an out-of-range one)."""
    example = "HOST:PORT, e.g. 127.0.0.1:50051 or [::1]:50051"
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} has no port: give {example}")
    if host.startswith("[") and host.endswith("]"):
        import ipaddress

        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {host} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise argparse.ArgumentTypeError(
            f"{text!r}: {host!r} is not a host name or address (an IPv6 address goes in "
            f"brackets): give {example}"
        )
    if not port.isdigit() or not lowest_port <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r}: port {port!r} is not a number {lowest_port}..65535"
        )
    return text


def server_address(text: str) -> str:
    """The address the server listens on; port 0 picks a free port."""
    return _address(text, 0)


def client_address(text: str) -> str:
    """The server's address as a client dials it."""
    return _address(text, 1)


def parse_duration(text: str) -> timedelta:
    """A duration from "30d", "12h", "90m", "45s" or plain seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number = text.strip()
    scale = units.get(number[-1:].lower()) if number else None
    if scale is not None:
        number = number[:-1]
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h or 90s")
    return timedelta(seconds=value)


def _table_spec(args: argparse.Namespace) -> object:
    from teepsi.engine.keys import Normalization, NormalizationError
    from teepsi.engine.tables import (
        TableError,
        TableFormat,
        TableSpec,
        detect_format,
        directory_error,
    )

    try:
        fmt = detect_format(args.data, args.format)
        normalization = Normalization.parse(args.normalize)
    except (TableError, NormalizationError) as exc:
        raise UsageError(str(exc)) from None
    if fmt is not TableFormat.PARQUET and Path(args.data).is_dir():
        raise UsageError(str(directory_error(Path(args.data))))
    if fmt is TableFormat.TEXT and args.key:
        raise UsageError(
            f"--key applies to CSV and Parquet input, and --data {args.data} is read as text "
            "(one item per line, the line is the key)"
            + ("" if args.format else "; if it is a table, pass --format csv or --format parquet")
        )
    delimiter = args.delimiter
    if delimiter is None:
        tsv = str(args.data).lower().removesuffix(".gz").endswith(".tsv")
        delimiter = "\t" if tsv else ","
    if len(delimiter.encode()) != 1:
        raise UsageError(f"--delimiter {delimiter!r}: use a single one-byte character")
    quote = None if args.quote == "none" else args.quote
    if quote is not None and len(quote.encode()) != 1:
        raise UsageError(f"--quote {quote!r}: use a single one-byte character, or none")
    return TableSpec(
        path=Path(args.data),
        format=fmt,
        key_columns=tuple(args.key or ()),
        delimiter=delimiter,
        quote_char=quote,
        normalization=normalization,
    )


def _collateral_file(path: str | None) -> str | None:
    if path is None:
        return None
    from teepsi.attestation.collateral import CollateralError, load_collateral_file

    try:
        return load_collateral_file(path)
    except CollateralError as exc:
        raise UsageError(str(exc)) from None


def _collateral_state(args: argparse.Namespace, role: str) -> Path:
    """--collateral-state, or the CLI's default file for ``role``; checked readable now."""
    from teepsi.attestation.collateral import (
        CollateralError,
        CollateralFreshness,
        default_state_path,
    )

    try:
        path = (
            Path(args.collateral_state)
            if args.collateral_state is not None
            else default_state_path(role)
        )
        CollateralFreshness(path)  # a bad file is a usage error before anything runs
    except CollateralError as exc:
        raise UsageError(f"--collateral-state: {exc}") from None
    return path


def _add_collateral_state_flag(parser: argparse.ArgumentParser, role: str, whose: str) -> None:
    parser.add_argument(
        "--collateral-state",
        metavar="FILE",
        help=f"remembers the newest collateral each {whose} platform showed, so older "
        "collateral is refused after a restart too (default "
        f"$XDG_STATE_HOME/teepsi/{role}-collateral-state.json; under Gramine a file on "
        "an encrypted mount)",
    )


RECEIPT_CERT_SUFFIX = ".cert.pem"
RECEIPT_COLLATERAL_SUFFIX = ".collateral.json"


def _save_receipt(path: str, receipt_json: str, certificate_der: bytes, collateral: str) -> None:
    """The receipt and the evidence to verify it offline: RECEIPT, .cert.pem, .collateral.json.

    All 0600, each written atomically; the collateral is what this client verified the
    server with, so ``verify-receipt`` can verify the quote as of the receipt's time.
    """
    from teepsi.privatefile import write_private

    for target, data in (
        (path + RECEIPT_CERT_SUFFIX, _pem(certificate_der)),
        (path + RECEIPT_COLLATERAL_SUFFIX, (collateral + "\n").encode()),
        (path, (receipt_json + "\n").encode()),
    ):
        try:
            write_private(target, data)
        except OSError as exc:
            raise OSError(f"cannot write {target}: {exc.strerror or exc}") from None


def _pem(der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _client_contract(args: argparse.Namespace) -> tuple[Any, Any]:
    """--spec and --key-file: the job spec fixes job id, parties and normalisation."""
    if args.spec is None:
        if args.key_file is not None:
            raise UsageError("--key-file goes with --spec (a job spec lists the party keys)")
        return None, None
    from teepsi.contract.keys import load_private_key, public_key_der
    from teepsi.contract.spec import JobSpec, SpecError

    try:
        spec = JobSpec.load(args.spec)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    if args.key_file is None:
        raise UsageError("--spec needs this party's private key: --key-file FILE")
    try:
        key = load_private_key(args.key_file)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.name is None:
        # The party whose key this is.
        mine = [p.name for p in spec.parties if p.public_key == public_key_der(key)]
        if mine:
            args.name = mine[0]
    listed = spec.party(args.name) if args.name else None
    if listed is None:
        raise UsageError(f"--spec {args.spec}: no party {args.name!r} in the spec")
    if listed.public_key != public_key_der(key):
        raise UsageError(f"--key-file {args.key_file}: not the key the spec lists for {args.name}")
    for flag, value, expected in (
        ("--job", args.job, spec.job_id),
        ("--parties", args.parties, len(spec.parties)),
        ("--normalize", args.normalize, spec.normalize),
    ):
        if value is not None and value != expected:
            raise UsageError(f"{flag} {value} contradicts the job spec ({expected})")
    args.job, args.parties, args.normalize = spec.job_id, len(spec.parties), spec.normalize
    return spec, key


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
CLIENT_DEFAULTS: dict[str, object] = {
    "job": "default",
    "timeout": 600.0,
    "quote": '"',
    "normalize": "trim",
    # A data provider's default budget (teepsi.engine.tables.DEFAULT_MEMORY_BUDGET), kept
    # here so that parsing arguments imports no polars.
    "memory_budget": 1024**3,
}


def _long_option(action: argparse.Action) -> str | None:
    return next((o for o in action.option_strings if o.startswith("--")), None)


def setting_key(flag: str) -> str:
    """The settings-file key of a flag: ``--max-jobs`` -> ``max_jobs``."""
    return flag.removeprefix("--").replace("-", "_")


def run_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``key -> flag`` for every setting of a command a file or the environment may give:
    each of its long options except the trust flags (so a new flag is a setting at once)."""
    keys: dict[str, str] = {}
    for action in parser._actions:
        flag = _long_option(action)
        if flag is None or flag in TRUST_FLAGS or flag in _NOT_SETTINGS:
            continue
        keys[setting_key(flag)] = flag
    return keys


def trust_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``key -> flag`` of the command's trust flags (named in refusals)."""
    flags = (_long_option(a) for a in parser._actions)
    return {setting_key(f): f for f in flags if f is not None and f in TRUST_FLAGS}


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
        raise UsageError(f"{where}: {exc}") from None
    if action.choices is not None and result not in action.choices:
        raise UsageError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
    return result


def _refuse_key(where: str, key: str, parser: argparse.ArgumentParser) -> UsageError:
    trust = trust_keys(parser)
    if key in trust:
        return UsageError(
            f"{where}: not a per-run setting: it decides whom this process trusts, so only "
            f"the command line sets it ({trust[key]})"
        )
    import difflib

    command = parser.prog.split()[-1]
    close = difflib.get_close_matches(key, run_keys(parser), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    example = next((k for k, flag in run_keys(parser).items() if "_" in k), "host")
    return UsageError(
        f"{where}: not a per-run setting of teepsi {command} ({hint}the keys are the long "
        f"flags of teepsi {command} --help with _ for -, e.g. {example} for "
        f"{run_keys(parser)[example]})"
    )


def _run_config_values(
    path: Path, parser: argparse.ArgumentParser
) -> dict[str, tuple[str, object]]:
    """``key -> (dest, value)`` from a settings file, each value checked as its flag checks it."""
    import tomllib

    try:
        values: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--run-config {path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--run-config {path}: not valid TOML: {exc}") from None
    keys = run_keys(parser)
    actions = {option: a for a in parser._actions for option in a.option_strings}
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
                    f"(expected {f'a list of {kinds}' if many else kinds}, as for {flag})"
                )
        converted = [_convert(action, item, where) for item in items]
        merged[key] = (action.dest, converted if many else converted[0])
    return merged


def _environment_values(
    environ: Mapping[str, str], parser: argparse.ArgumentParser
) -> dict[str, tuple[str, object]]:
    """``key -> (dest, value)`` from ``TEEPSI_<KEY>`` variables, checked as the flags check.

    A flag that takes no value reads 1/true/yes/on or 0/false/no/off; a repeatable one
    (``--key``) a comma-separated list. A variable naming a trust flag is refused; other
    ``TEEPSI_*`` names (the deploy scripts' own, another command's keys) are not settings
    of this command and are left alone.
    """
    actions = {option: a for a in parser._actions for option in a.option_strings}
    trust = trust_keys(parser)
    merged: dict[str, tuple[str, object]] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == RUN_CONFIG_ENV:
            continue
        key = name.removeprefix(ENV_PREFIX).lower()
        text = environ[name]
        where = f"environment {name}"
        if key in trust:
            raise _refuse_key(where, key, parser)
        flag = run_keys(parser).get(key)
        if flag is None:
            continue
        action = actions[flag]
        value: object
        if action.nargs == 0:
            word = text.strip().lower()
            if word not in _ENV_TRUE | _ENV_FALSE:
                raise UsageError(
                    f"{where}: {text!r}: expected 1, true, yes, on, 0, false, no or off"
                )
            value = word in _ENV_TRUE
        elif isinstance(action, argparse._AppendAction):
            value = [_convert(action, part.strip(), where) for part in text.split(",")]
        else:
            value = _convert(action, text, where)
        merged[key] = (action.dest, value)
    return merged


def _apply_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
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


def _client_defaults(args: argparse.Namespace) -> None:
    for key, default in CLIENT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    for key in ("host", "name", "parties", "data"):
        if getattr(args, key) is None:
            raise UsageError(
                f"--{key} is required (on the command line, as {ENV_PREFIX}{key.upper()} or "
                "in --run-config)"
            )


@dataclass(frozen=True)
class _ClientOutputs:
    """Where a client run puts what it gets; every path checked before the run starts."""

    #: The rows: a file, or "-" for standard output; None when no rows can come.
    rows: str | None
    receipt: str | None
    #: Quick mode's resume file (the session, for a restarted client); None if not kept.
    resume: str | None

    def receipt_files(self) -> list[str]:
        if self.receipt is None:
            return []
        suffixes = ("", RECEIPT_CERT_SUFFIX, RECEIPT_COLLATERAL_SUFFIX)
        return [self.receipt + suffix for suffix in suffixes]


def _client_outputs(args: argparse.Namespace, fmt: object, job_spec: Any) -> _ClientOutputs:
    """Decide and check the run's output paths (a usage error, exit 2, before joining)."""
    from teepsi.contract.spec import OutputKind
    from teepsi.engine.tables import STDOUT_PATH, TableFormat
    from teepsi.privatefile import OutputPathError, check_output_path

    rows_may_come = job_spec is None or (
        job_spec.output is OutputKind.INTERSECTION and job_spec.is_recipient(args.name)
    )
    rows = args.output
    if rows is None and fmt is TableFormat.TEXT:
        rows = STDOUT_PATH  # text results are printed
    if rows is None and rows_may_come:
        raise UsageError(
            f"--data {args.data}: CSV and Parquet results are tables: pass --output FILE "
            "(or --output - to write them to standard output)"
        )
    resume = args.resume_file
    if resume is None and job_spec is None and rows not in (None, STDOUT_PATH):
        resume = f"{rows}.resume"  # beside the result
    if args.resume and job_spec is None and resume is None:
        raise UsageError(
            "--resume in quick mode needs the earlier run's --resume-file (it is written "
            "beside --output FILE by default)"
        )
    inputs = [
        p
        for p in (args.data, args.spec, args.key_file, args.config, args.collateral)
        if p is not None
    ]
    if args.run_config:
        inputs.append(args.run_config)
    flagged = [("--output", rows), ("--receipt", args.receipt)]
    if args.receipt:
        flagged.append(("--receipt (its certificate)", args.receipt + RECEIPT_CERT_SUFFIX))
        flagged.append(("--receipt (its collateral)", args.receipt + RECEIPT_COLLATERAL_SUFFIX))
    if resume is not None:
        flagged.append(("--resume-file", resume))
    seen: dict[str, str] = {}
    for flag, path in flagged:
        if path is None or path == STDOUT_PATH:
            continue
        try:
            check_output_path(path, flag=flag, inputs=inputs)
        except OutputPathError as exc:
            raise UsageError(str(exc)) from None
        key = os.path.realpath(path)
        if key in seen:
            raise UsageError(f"{flag} {path} is also the file of {seen[key]}: name another")
        seen[key] = flag
    return _ClientOutputs(rows=rows if rows_may_come else None, receipt=args.receipt, resume=resume)


def _rescue_rows(rows: Any, spec: Any, job: str, name: str) -> str | None:
    """Rows that could not go to --output: a private file in the temp directory."""
    import tempfile

    from teepsi.engine.tables import TableError, write_rows

    suffix = spec.path.suffix if spec.path.suffix else ".txt"
    rescue = Path(tempfile.gettempdir()) / f"teepsi-{job}-{name}-rescued-{os.getpid()}{suffix}"
    try:
        write_rows(rows, spec, rescue)
    except TableError:
        return None
    return str(rescue)


def _cmd_client(args: argparse.Namespace) -> int:
    from teepsi.attestation.policy import Policy
    from teepsi.client.party import (
        PartyConfig,
        PsiClientError,
        ResumeToken,
        ResumeTokenError,
        run_party,
    )
    from teepsi.client.progress import Progress
    from teepsi.engine.tables import (
        STDOUT_PATH,
        TableError,
        TableFormat,
        TableSpec,
        read_table,
        text_lines,
        write_rows,
    )
    from teepsi.privatefile import write_private

    _setup_logging("client", args.verbose, args.quiet, log_format=args.log_format)
    job_spec, party_key = _client_contract(args)
    _client_defaults(args)
    from teepsi.contract.spec import IDENTIFIER_PATTERN

    for flag, value in (("--name", args.name), ("--job", args.job)):
        if not IDENTIFIER_PATTERN.fullmatch(value):
            raise UsageError(
                f"{flag} {value[:40]!r} is invalid: use 1-128 letters, digits, '.', '_', '@' "
                "or '-', starting with a letter or digit"
            )
    loaded = _load_policy(args.config, args)
    assert isinstance(loaded, Policy)
    collateral_state = _collateral_state(args, "client")
    spec = _table_spec(args)
    assert isinstance(spec, TableSpec)
    # Before anything is read or sent: a result is never computed for a place it cannot go.
    outputs = _client_outputs(args, spec.format, job_spec)
    resume_token = None
    if args.resume and job_spec is None:
        assert outputs.resume is not None
        try:
            text = Path(outputs.resume).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"--resume-file {outputs.resume}: cannot read: {exc.strerror}"
            ) from None
        try:
            resume_token = ResumeToken.from_json(text, f"--resume-file {outputs.resume}")
        except ResumeTokenError as exc:
            raise UsageError(str(exc)) from None
    # A log shipper reads stderr line by line as JSON: no progress bars there.
    progress = Progress(enabled=not args.quiet and args.log_format == "text")
    try:
        with progress.phase(f"reading {spec.path.name}", total=None):
            table = read_table(spec, memory_budget=args.memory_budget)
    except TableError as exc:
        raise UsageError(str(exc)) from None
    config = PartyConfig(
        host=args.host,
        policy=loaded,
        name=args.name,
        party_count=args.parties,
        job_id=args.job,
        attestation=args.attestation,
        sim_tee=_sim_tee(args),
        allow_simulated=args.allow_simulated,
        timeout=args.timeout,
        progress=progress.enabled,
        spec=job_spec,
        party_key=party_key,
        server_collateral_json=_collateral_file(args.collateral),
        pccs_url=args.pccs_url,
        insecure_pccs_tls=args.insecure_pccs_tls,
        resume=args.resume,
        resume_token=resume_token,
        collateral_state=collateral_state,
    )
    if job_spec is None:
        log.warning(
            "no --spec: quick mode; parties are not authenticated, anyone who passes "
            "attestation can fill a slot"
        )

    def save_resume(token: ResumeToken) -> None:
        if outputs.resume is not None:
            try:
                write_private(outputs.resume, (token.to_json() + "\n").encode())
            except OSError as exc:
                # Not fatal: the run goes on; only a restart could not resume.
                log.warning("cannot save --resume-file %s: %s", outputs.resume, exc.strerror)

    try:
        result = run_party(config, table, save_resume=save_resume)
    except KeyboardInterrupt:
        if outputs.resume is not None and Path(outputs.resume).exists():
            raise KeyboardInterrupt(
                f"while the job lives, --resume with --resume-file {outputs.resume} fetches "
                "the result"
            ) from None
        raise
    except (PsiClientError, TableError) as exc:
        hint = ""
        if outputs.resume is not None and Path(outputs.resume).exists():
            hint = (
                f" (while the job lives, --resume with --resume-file {outputs.resume} fetches it)"
            )
        log.error("%s%s", exc, hint)
        return EXIT_FAILED
    finally:
        if table.spilled:
            log.info("over --memory-budget: keys and records spilled to disk, encrypted")
        table.close()  # its spill files, if any, go now
    failed = False
    # The rows first: they are what the run was for.
    if outputs.rows is not None and result.status == "RELEASED":
        where = "standard output" if outputs.rows == STDOUT_PATH else outputs.rows
        try:
            with progress.phase(f"writing {where}", total=len(result.rows)):
                write_rows(result.rows, spec, outputs.rows)
        except TableError as exc:
            rescued = _rescue_rows(result.rows, spec, result.job_id, result.party_name)
            kept = f"the rows were saved to {rescued} instead" if rescued else "rows LOST"
            log.error("%s; %s", exc, kept)
            failed = True
    if result.receipt is not None and outputs.receipt is not None:
        try:
            _save_receipt(
                outputs.receipt,
                result.receipt.to_json(),
                result.server_certificate_der,
                result.server_collateral_json,
            )
        except OSError as exc:
            # The rows are already saved; the run fails at the end.
            log.error("--receipt: %s", exc)
            failed = True
    if outputs.resume is not None and not failed:
        Path(outputs.resume).unlink(missing_ok=True)  # the result is saved: nothing to resume
    outcome = {
        "COUNT_ONLY": f"count-only job: the intersection has {result.intersection_size} keys",
        "NOT_RECIPIENT": "this party is not a result recipient: no items received "
        f"(intersection size {result.intersection_size})",
        "BELOW_THRESHOLD": "the intersection is below the job's min_intersection: "
        "no items released",
    }.get(result.status)
    if outcome is not None:
        print(outcome)
    elif spec.format is TableFormat.TEXT:
        if outputs.rows != STDOUT_PATH:
            # Text results are printed as well as written (as they always were).
            try:
                sys.stdout.buffer.write(text_lines(result.rows))
                sys.stdout.flush()
            except OSError as exc:  # a closed pipe: the --output file has them
                log.warning("cannot print the result: %s", exc.strerror or exc)
    elif not failed:
        # With --output - the rows are on stdout: the summary goes to stderr.
        summary = sys.stderr if outputs.rows == STDOUT_PATH else sys.stdout
        written = "" if outputs.rows == STDOUT_PATH else f" written to {outputs.rows}"
        print(f"{len(result.rows)} matching rows{written}", file=summary)
    log.info(
        "job %s: rows read %d, with a key %d, distinct keys %d, intersection %s, "
        "matching rows %d (result sha256 %s)",
        result.job_id,
        result.rows_read,
        result.rows_with_key,
        result.distinct_keys,
        "withheld" if result.intersection_size is None else result.intersection_size,
        len(result.rows),
        result.result_sha256.hex() or "withheld",
    )
    return EXIT_FAILED if failed else EXIT_OK


def _sim_tee(args: argparse.Namespace) -> str:
    """``--sim-tee``, which only means something with ``--attestation sim``."""
    sim_tee: str | None = args.sim_tee
    if sim_tee is not None and args.attestation != "sim":
        raise UsageError(
            f"--sim-tee {sim_tee}: only with --attestation sim (--attestation "
            f"{args.attestation} uses the real TEE it names)"
        )
    return sim_tee or "sgx"


def _add_sim_tee_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--sim-tee",
        choices=list(SIM_TEES),
        help=f"with --attestation sim: the TEE to simulate, {what} (default sgx)",
    )


def _cmd_measure(args: argparse.Namespace) -> int:
    from teepsi.attestation.evidence import Role
    from teepsi.attestation.measure import sim_identity, sim_td_identity
    from teepsi.attestation.policy import policy_for

    if args.attestation != "sim":
        raise UsageError(
            "--attestation gramine: real measurements come from gramine-sgx-sign "
            "(see deploy/); for a TDX VM image see docs/deploy.md (TDX confidential VM); "
            "`teepsi measure` computes simulated ones"
        )
    sim_tee = _sim_tee(args)
    if sim_tee == "tdx":
        # One VM image for both roles: its role is bound in the evidence, not measured.
        policy = policy_for(
            [], [("teepsi VM, server and data provider (simulated)", sim_td_identity())]
        )
    else:
        policy = policy_for(
            [
                ("teepsi server (simulated)", sim_identity(Role.SERVER)),
                ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
            ]
        )
    text = json.dumps(policy.to_dict(), indent=4) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_keygen(args: argparse.Namespace) -> int:
    from teepsi.contract.keys import (
        generate_private_key,
        private_key_pem,
        public_key_der,
        public_key_text,
    )
    from teepsi.privatefile import write_private

    out = Path(args.out)
    if os.path.lexists(out) and not args.force:
        raise UsageError(f"--out {out} exists; choose another --out or pass --force")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; name a file")
    key = generate_private_key()
    try:
        # Created 0600 under a temporary name, then renamed: never readable by others,
        # and with --force a symlink at --out is replaced, its target left alone.
        write_private(out, private_key_pem(key), replace=args.force)
    except FileExistsError:
        raise UsageError(f"--out {out} exists; choose another --out or pass --force") from None
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    print(public_key_text(public_key_der(key)))
    print(f"private key written to {out}; put the line above in the job spec", file=sys.stderr)
    return EXIT_OK


def _cmd_spec_check(args: argparse.Namespace) -> int:
    from teepsi.contract.spec import JobSpec, SpecError

    try:
        spec = JobSpec.load(args.file)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    import time

    if spec.deadline is not None and spec.deadline <= time.time():
        # Valid, but no server will run it: every party would be refused at join.
        print(
            f"teepsi spec: warning: {args.file}: deadline {spec.deadline_text()} has already "
            "passed: a server refuses this job; agree on a new deadline with the other parties",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "job_id": spec.job_id,
                "sha256": spec.digest().hex(),
                "parties": [p.name for p in spec.parties],
                "recipients": list(spec.recipients),
                "output": spec.output.value,
                "min_intersection": spec.min_intersection,
                "max_items_per_party": spec.max_items_per_party,
                "normalize": spec.normalize,
                "deadline": spec.deadline_text(),
            },
            indent=2,
        )
    )
    return EXIT_OK


class _Refused(Exception):
    """Evidence or a signed document does not check out; the message is one line."""


def _judge_signing_enclave(
    certificate: bytes, collateral: str | None, at: int, args: argparse.Namespace
) -> dict[str, object]:
    """The server enclave whose certificate signed a receipt or audit heads, judged through
    the one verification path (:class:`teepsi.attestation.peer.PeerVerifier`: quote
    signatures and PCK chain to Intel's root, or the simulated root only with
    --allow-simulated; key binding; server role; with --config the policy) as of ``at``.
    Every offline check of a server certificate (verify-receipt, audit verify) comes here;
    raises _Refused with one line."""
    from teepsi.attestation.evidence import Role
    from teepsi.attestation.peer import PeerRejected, PeerVerifier
    from teepsi.attestation.policy import Policy, PolicyError
    from teepsi.attestation.verify import SIMULATED_WARNING
    from teepsi.cli_evidence import SIMULATED_REMEDY
    from teepsi.timefmt import iso_utc

    policy: Policy | None = None
    if args.config:
        try:
            policy = Policy.load(args.config)
        except PolicyError as exc:
            raise UsageError(str(exc)) from None
    verifier = PeerVerifier(
        policy, allow_simulated=args.allow_simulated, simulated_remedy=SIMULATED_REMEDY
    )
    try:
        peer, _ = verifier.verify_certificate(
            certificate, collateral, what="signing server", role=Role.SERVER, at=at, record=False
        )
    except PeerRejected as exc:
        raise _Refused(str(exc)) from None
    verified = peer.verified
    if verified.simulated:
        # Anyone can make simulated evidence: trusted only because it was asked for, loudly.
        print(f"teepsi {args.command}: WARNING {SIMULATED_WARNING}", file=sys.stderr)
    judged: dict[str, object] = {
        # Which TEE signed ("tee": SGX or TDX) and its measurements.
        "signer": {**verified.identity_fields(), "simulated": verified.simulated},
        "quote_verified": True,
        "root": verified.root,
        "tcb_status": verified.tcb_status,
        "advisory_ids": list(verified.advisory_ids),
        "verified_at": at,
        "verified_at_iso": iso_utc(at),
        "policy": str(args.config) if args.config else None,
    }
    if policy is None:
        judged["note"] = (
            "no --config: quote, key binding and server role verified, but no policy was "
            "applied (measurements, attributes and TCB status not judged)"
        )
    return judged


def _refuse(reason: str) -> int:
    print(json.dumps({"valid": False, "reason": reason}))
    return EXIT_FAILED


def _receipt_files(args: argparse.Namespace) -> tuple[SignedReceipt, bytes, str | None]:
    """The receipt, its server certificate and its collateral (None if there is none).

    Unreadable files are usage errors; a receipt that does not parse raises ReceiptError.
    """
    from teepsi.attestation.collateral import CollateralError, load_collateral_file
    from teepsi.contract.receipt import SignedReceipt

    cert_path = args.cert or args.receipt + RECEIPT_CERT_SUFFIX
    collateral_path = args.collateral or args.receipt + RECEIPT_COLLATERAL_SUFFIX
    try:
        receipt_bytes = Path(args.receipt).read_bytes()
        cert = Path(cert_path).read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read {exc.filename}: {exc.strerror} (the client saves RECEIPT, "
            f"RECEIPT{RECEIPT_CERT_SUFFIX} and RECEIPT{RECEIPT_COLLATERAL_SUFFIX})"
        ) from None
    collateral: str | None = None
    if args.collateral or Path(collateral_path).exists():
        try:
            collateral = load_collateral_file(collateral_path)
        except CollateralError as exc:
            raise UsageError(
                f"{exc} (the collateral the server was verified with: pass --collateral FILE)"
            ) from None
    return SignedReceipt.from_json(receipt_bytes), cert, collateral


def _cmd_verify_receipt(args: argparse.Namespace) -> int:
    """The receipt's signature, and the attestation of the certificate that signed it,
    as of the receipt's issue time (the verdict a live client had then)."""
    from teepsi.contract.receipt import ReceiptError, verify_receipt

    try:
        signed, cert, collateral = _receipt_files(args)
        if collateral is None:
            raise UsageError(
                f"cannot read {args.receipt}{RECEIPT_COLLATERAL_SUFFIX}: the collateral the "
                "server was verified with (the client saves it beside the receipt; or pass "
                "--collateral FILE)"
            )
        verify_receipt(signed, cert)
        at = signed.receipt.issued_at if args.at is None else args.at
        judged = _judge_signing_enclave(cert, collateral, at, args)
        signer = judged["signer"]
        tee = signer.get("tee") if isinstance(signer, dict) else None
        if tee != signed.receipt.tee:
            raise _Refused(
                f"the receipt says an {signed.receipt.tee} TEE signed it; its certificate "
                f"holds {tee} evidence"
            )
    except (ReceiptError, _Refused) as exc:
        return _refuse(str(exc))
    out: dict[str, object] = {"valid": True, **judged, "receipt": signed.receipt.to_dict()}
    print(json.dumps(out, indent=2, default=str))
    return EXIT_OK


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    """The chain, every signed head (and its signer's evidence, through the one path), and
    with --receipt that the log holds, unchanged, everything up to the receipt's release."""
    from teepsi.contract.audit import AuditError, verify_audit_log
    from teepsi.contract.receipt import ReceiptError, verify_receipt

    expect_entry = None
    receipt_cert = b""
    receipt_collateral: str | None = None
    if (args.cert or args.collateral) and not args.receipt:
        raise UsageError("--cert and --collateral belong to a --receipt; pass the receipt too")
    if args.receipt:
        try:
            signed, receipt_cert, receipt_collateral = _receipt_files(args)
            verify_receipt(signed, receipt_cert)
        except ReceiptError as exc:
            return _refuse(str(exc))
        expect_entry = signed.receipt.audit_head
        if expect_entry is None:
            return _refuse("the receipt carries no audit head (its server kept no audit log)")
    try:
        summary = verify_audit_log(args.log, expect_head=args.head, expect_entry=expect_entry)
    except AuditError as exc:
        return _refuse(str(exc))
    if summary.signed_entries == 0:
        return _refuse(
            f"{args.log}: no signed head: nothing in the log is authenticated by a server key"
        )
    receipt_key = _certificate_key_sha256(receipt_cert) if args.receipt else None
    signers = []
    for signing in summary.signers:
        # The collateral the server recorded beside its certificate at start; for the
        # receipt's own server, the collateral its client verified it with also serves.
        collateral = signing.collateral_json or None
        same_as_receipt = _certificate_key_sha256(signing.der) == receipt_key
        if collateral is None and same_as_receipt:
            collateral = receipt_collateral
        try:
            judged = _judge_signing_enclave(signing.der, collateral, signing.recorded_at, args)
        except _Refused as exc:
            return _refuse(f"{args.log}: a certificate that signs heads is refused: {exc}")
        signers.append(judged)
    if args.receipt and not any(
        _certificate_key_sha256(s.der) == receipt_key for s in summary.signers
    ):
        return _refuse(
            f"{args.log}: the receipt's server certificate signs no head in this log (another log)"
        )
    report: dict[str, object] = {
        "valid": True,
        "entries": summary.entries,
        "head": summary.head,
        "signed_entries": summary.signed_entries,
        # Lines after the newest signed head: a cut or rewrite there shows only against a
        # head held elsewhere (a later receipt, --head).
        "unsigned_tail": summary.unsigned_tail,
        # Lines a starting server found unsigned: it vouches only that they chained.
        "found_unsigned": summary.found_unsigned,
        "signers": signers,
    }
    if summary.unsigned_tail:
        report["warning"] = (
            f"the last {summary.unsigned_tail} line(s) follow the newest signed head: nothing "
            "authenticates them (the server is running or crashed, or later heads were cut)"
        )
    if expect_entry is not None:
        report["receipt_head"] = expect_entry.to_dict()
    print(json.dumps(report))
    return EXIT_OK


def _certificate_key_sha256(certificate: bytes) -> bytes | None:
    """SHA-256 of a certificate's public key (PEM or DER); None if it cannot be read."""
    from teepsi.contract.signing import SignatureError, certificate_public_key

    try:
        return certificate_public_key(certificate)[0]
    except SignatureError:
        return None


def _cmd_health(args: argparse.Namespace) -> int:
    """One line on stdout (SERVING) or stderr (why not): a probe's exit code says it."""
    from teepsi.protocol.connect import PsiClientError, split_host
    from teepsi.server.health import HealthCheckError, check_health

    try:
        split_host(args.host)
    except PsiClientError as exc:
        raise UsageError(str(exc)) from None
    try:
        status = check_health(args.host, service=args.service, timeout=args.timeout)
    except HealthCheckError as exc:
        print(f"teepsi health: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(status)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from teepsi.demo import run_contract_demo, run_demo

    _setup_logging("demo", args.verbose, log_format=args.log_format)
    if args.contract:
        return run_contract_demo(verbose=args.verbose)
    return run_demo(parties=args.parties, verbose=args.verbose, tee=args.tee)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what, and where to look), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_signer_flags(parser: argparse.ArgumentParser) -> None:
    """How an offline check judges the server enclave that signed (see _judge_signing_enclave)."""
    parser.add_argument(
        "--config", help="policy the signing server enclave must satisfy (dynamic_config.json)"
    )
    parser.add_argument(
        "--allow-simulated", action="store_true", help="accept a simulated server enclave"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="teepsi",
        description="Multi-party private set intersection inside attested enclaves.",
    )
    parser.add_argument("--version", action="version", version=f"teepsi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    server = sub.add_parser("server", help="run the PSI server")
    server.add_argument(
        "--host",
        type=server_address,
        default="0.0.0.0:50051",
        help="listen address HOST:PORT (port 0: any free port)",
    )
    server.add_argument("--config", help="policy for data providers (dynamic_config.json)")
    server.add_argument(
        "--attestation",
        choices=list(PROVIDER_NAMES),
        default="gramine",
        help="where this server's evidence comes from: gramine (SGX enclave), tdx (TDX "
        "VM, configfs-tsm) or sim (simulated; see --sim-tee)",
    )
    _add_sim_tee_flag(server, "for this server's evidence")
    server.add_argument(
        "--no-client-attestation",
        action="store_true",
        help="let data providers join without attesting (they run outside enclaves)",
    )
    server.add_argument(
        "--job-timeout",
        type=positive_seconds,
        default=600.0,
        help="seconds a job waits for all its parties (default 600)",
    )
    server.add_argument(
        "--max-jobs", type=positive_int, default=256, help="jobs at once (default 256)"
    )
    server.add_argument(
        "--max-parties", type=positive_int, default=256, help="parties per job (default 256)"
    )
    server.add_argument(
        "--max-items",
        type=positive_int,
        default=100_000_000,
        help="items per party (default 100000000)",
    )
    server.add_argument(
        "--memory-budget",
        type=parse_size,
        default=1024**3,
        help="key records held in memory; beyond it they spill to disk, encrypted (default 1GiB)",
    )
    server.add_argument("--spill-dir", help="where encrypted spill files go (default: temp dir)")
    server.add_argument(
        "--join-timeout",
        type=positive_seconds,
        default=120.0,
        help="seconds a job may go without any party starting its upload before it is "
        "dropped and its --max-jobs slot freed (default 120)",
    )
    server.add_argument(
        "--max-jobs-per-party",
        type=positive_int,
        help="live jobs one party key may create (default: --max-jobs / 16, at least 1)",
    )
    server.add_argument(
        "--max-jobs-per-address",
        type=non_negative_int,
        help="live jobs that may be created from one network address (default: "
        "--max-jobs / 2; 0 = no limit, for parties behind one proxy or NAT)",
    )
    server.add_argument(
        "--max-connections",
        type=positive_int,
        default=512,
        help="client connections open at once; more are refused (default 512)",
    )
    server.add_argument(
        "--connection-idle-timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds a connection may carry no call before the server closes it (default 30)",
    )
    server.add_argument(
        "--handshake-timeout",
        type=positive_seconds,
        default=10.0,
        help="seconds a new connection has to finish its TLS handshake (default 10)",
    )
    server.add_argument(
        "--upload-idle-timeout",
        type=positive_seconds,
        default=60.0,
        metavar="S",
        help="end an upload stream that sends nothing for S seconds (default 60)",
    )
    server.add_argument(
        "--pccs-url",
        help="PCCS for the server's own collateral (default: PCCS_URL of the QCNL config)",
    )
    server.add_argument(
        "--qcnl-config", type=Path, help="QCNL config (default /etc/sgx_default_qcnl.conf)"
    )
    server.add_argument(
        "--insecure-pccs-tls",
        action="store_true",
        help="do not verify the PCCS's TLS certificate (self-signed PCCS)",
    )
    server.add_argument(
        "--audit-log",
        type=Path,
        help="append-only, hash-chained JSON-lines log of job events (never items)",
    )
    server.add_argument(
        "--certificate-lifetime",
        type=parse_duration,
        help="how long the server's RA-TLS certificate is valid, at most 90d; the server "
        "stops when it ends, and a restart makes a new one (default 30d)",
    )
    server.add_argument(
        "--max-workers",
        type=positive_int,
        default=16,
        help="threads for blocking work: attestation checks, uploads, intersections, receipts; "
        "parties waiting for a result hold none (default 16: with the server's own threads, "
        "within a Gramine enclave's default sgx.max_threads of 32)",
    )
    server.add_argument(
        "--run-config",
        help="TOML settings file: any flag but the trust flags, as key = value with _ for - "
        "(max_jobs = 64); TEEPSI_<KEY> variables override it and flags override both "
        "(docs/configuration.md). Default $TEEPSI_RUN_CONFIG",
    )
    server.add_argument(
        "--metrics-host",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics "
        "(off by default; loopback only unless --metrics-public)",
    )
    server.add_argument(
        "--metrics-public",
        action="store_true",
        help="allow a non-loopback --metrics-host: the endpoint has no TLS and no "
        "authentication, so firewall it to the scraper",
    )
    server.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    _add_collateral_state_flag(server, "server", "data provider's")
    _add_log_flags(server)
    _add_trust_flags(server)
    server.set_defaults(func=_cmd_server, subparser=server)

    client = sub.add_parser("client", help="run a data provider")
    client.add_argument("--host", type=client_address, help="server address HOST:PORT")
    client.add_argument(
        "--config", required=True, help="policy for the server (dynamic_config.json)"
    )
    client.add_argument("--data", help="input: text (one item per line), CSV or Parquet")
    client.add_argument(
        "--format",
        choices=["text", "csv", "parquet"],
        help="input format (default: from the extension; text otherwise)",
    )
    client.add_argument(
        "--key",
        action="append",
        metavar="COLUMN",
        help="key column of CSV/Parquet input; repeat for a composite key",
    )
    client.add_argument("--delimiter", help="CSV delimiter (default , or tab for .tsv)")
    client.add_argument("--quote", help='CSV quote character, or none (default ")')
    client.add_argument(
        "--normalize",
        help="key normalisation: a subset of trim,casefold,nfc, or none "
        "(default trim); every party must use the same",
    )
    client.add_argument("--parties", type=positive_int, help="number of parties in the job")
    client.add_argument("--name", help="this party's name, unique in the job")
    client.add_argument("--job", help="job id (default: default)")
    client.add_argument(
        "--output",
        help="write the result here, in the input's format (0600, atomically; checked "
        "before joining); - for standard output. Required for CSV/Parquet input; text "
        "results are printed when it is not given",
    )
    client.add_argument(
        "--resume-file",
        help="quick mode: where the session is saved (0600) so a restarted client can "
        "fetch the result with --resume (default: OUTPUT.resume beside --output FILE)",
    )
    client.add_argument(
        "--resume",
        action="store_true",
        help="fetch the result of this party's earlier run (its client died after "
        "uploading) while the job lives: under --spec the key proves it is the same party; "
        "in quick mode the --resume-file is used",
    )
    client.add_argument(
        "--attestation",
        choices=[*PROVIDER_NAMES, "none"],
        default="gramine",
        help="where this data provider's evidence comes from: gramine (SGX enclave), tdx "
        "(TDX VM, configfs-tsm), sim (simulated; see --sim-tee) or none",
    )
    _add_sim_tee_flag(client, "for this data provider's evidence")
    client.add_argument(
        "--timeout", type=positive_seconds, help="seconds to wait in all (default 600)"
    )
    client.add_argument(
        "--memory-budget",
        type=parse_size,
        help="memory for this party's keys and records; beyond it they spill to disk, "
        "encrypted (default 1GiB: fits a 2 GiB enclave)",
    )
    client.add_argument(
        "--collateral",
        help="collateral for the server's quote (dcap-qvl JSON); default: what the server staples",
    )
    client.add_argument(
        "--pccs-url",
        help="fetch collateral from this PCCS (for the server's quote, and this party's own)",
    )
    client.add_argument(
        "--insecure-pccs-tls",
        action="store_true",
        help="do not verify the PCCS's TLS certificate (self-signed PCCS)",
    )
    client.add_argument("--spec", help="the agreed job spec (TOML or JSON); see docs/contracts.md")
    client.add_argument("--key-file", help="this party's private key, listed in the spec")
    client.add_argument(
        "--receipt",
        help="save the server's signed receipt here, with the evidence to verify it offline: "
        "the server's certificate (RECEIPT.cert.pem) and the collateral it was verified "
        "with (RECEIPT.collateral.json)",
    )
    _add_collateral_state_flag(client, "client", "server")
    client.add_argument(
        "--run-config",
        help="TOML settings file: any flag but the trust flags, as key = value with _ for - "
        '(parties = 3, key = ["email"]); TEEPSI_<KEY> variables override it and flags '
        "override both (docs/configuration.md). Default $TEEPSI_RUN_CONFIG",
    )
    client.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    _add_log_flags(client)
    _add_trust_flags(client)
    client.set_defaults(func=_cmd_client, subparser=client)

    health = sub.add_parser(
        "health",
        help="ask a server's gRPC health service (exit 0 when SERVING); for health checks",
    )
    health.add_argument("--host", required=True, help="server address HOST:PORT")
    health.add_argument(
        "--service",
        default="",
        help='the service to ask about: "" (default) the whole server, or teepsi.v1.Psi',
    )
    health.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    health.set_defaults(func=_cmd_health)

    measure = sub.add_parser("measure", help="print a dynamic_config.json for this installation")
    measure.add_argument("--attestation", choices=["sim", "gramine"], default="sim")
    _add_sim_tee_flag(measure, "whose identities the policy lists (tdx: in tdx_mrs)")
    measure.add_argument("--output", "-o", help="write to this file instead of stdout")
    measure.set_defaults(func=_cmd_measure)

    demo = sub.add_parser("demo", help="run the seed's toy PSI locally in sim mode")
    demo.add_argument("--parties", type=int, choices=[2, 3], default=3)
    demo.add_argument(
        "--tee",
        choices=["sgx", "tdx"],
        default="sgx",
        help="the simulated TEE every role runs in (default sgx)",
    )
    demo.add_argument(
        "--contract",
        action="store_true",
        help="the job-contract example: three parties under a spec, one not a recipient",
    )
    _add_log_flags(demo)
    demo.set_defaults(func=_cmd_demo)

    keygen = sub.add_parser("keygen", help="make a party key pair for job specs")
    keygen.add_argument("--out", required=True, help="where to write the private key (PEM)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(func=_cmd_keygen)

    spec = sub.add_parser("spec", help="job specs")
    spec_sub = spec.add_subparsers(dest="spec_command", required=True)
    check = spec_sub.add_parser("check", help="validate a job spec and print its digest")
    check.add_argument("file")
    check.set_defaults(func=_cmd_spec_check)

    from teepsi.cli_evidence import register as register_evidence_tools
    from teepsi.cli_evidence import unix_seconds

    verify_receipt = sub.add_parser("verify-receipt", help="re-check a job's signed receipt")
    verify_receipt.add_argument("receipt")
    verify_receipt.add_argument(
        "--cert", help="the server's certificate (default RECEIPT.cert.pem, as the client saves it)"
    )
    verify_receipt.add_argument(
        "--collateral",
        metavar="FILE",
        help="the collateral the server was verified with (default RECEIPT.collateral.json)",
    )
    verify_receipt.add_argument(
        "--at",
        metavar="UNIX_SECONDS",
        type=unix_seconds,
        help="verify the certificate as of this time instead of the receipt's issued_at "
        "(e.g. now, with current collateral, to refuse a platform revoked since)",
    )
    _add_signer_flags(verify_receipt)
    verify_receipt.set_defaults(func=_cmd_verify_receipt)

    audit = sub.add_parser("audit", help="the server's audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser(
        "verify", help="check the log's hash chain, its signed heads and (--receipt) a receipt"
    )
    audit_verify.add_argument("log")
    audit_verify.add_argument("--head", help="expected last hash (detects truncation)")
    audit_verify.add_argument(
        "--receipt",
        help="a receipt of a job of this log: the log must hold, unchanged, every line up to "
        "its release",
    )
    audit_verify.add_argument(
        "--cert", help="the receipt's server certificate (default: RECEIPT.cert.pem)"
    )
    audit_verify.add_argument(
        "--collateral",
        help="collateral for the receipt's server certificate (default: "
        "RECEIPT.collateral.json if present; the log records each server's own)",
    )
    _add_signer_flags(audit_verify)
    audit_verify.set_defaults(func=_cmd_audit_verify)

    register_evidence_tools(sub)
    return parser


def _explicit_dests(argv: Sequence[str] | None) -> set[str]:
    """The dests the command line itself sets: the same parse with every default left out."""
    parser = build_parser()
    pending = [parser]
    while pending:
        current = pending.pop()
        for action in current._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return set(vars(parser.parse_args(argv)))


def parse_settings(
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    *,
    parsed: argparse.Namespace | None = None,
) -> argparse.Namespace:
    """The command line, with ``server`` and ``client`` settings from the environment and the
    settings file merged in (flag > environment > file > default)."""
    args = parsed if parsed is not None else build_parser().parse_args(argv)
    args.explicit = _explicit_dests(argv)
    if getattr(args, "subparser", None) is not None:
        _apply_settings(args, environ)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # Before numpy loads: its BLAS is unused here, and would start a thread per core
    # (an enclave's sgx.max_threads is finite; the deploy manifests pin this too).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    try:
        args = parse_settings(argv, os.environ, parsed=args)
        code: int = args.func(args)
    except UsageError as exc:
        if getattr(args, "log_format", "text") == "json":
            # The command set up JSON logging first: its error is one more JSON line.
            log.error("error: %s", exc, extra={"exit_code": EXIT_USAGE})
        else:
            print(f"teepsi {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        # The exception's text, if any, is what the interrupted step left to pick up.
        detail = f"; {exc}" if str(exc) else ""
        print(f"teepsi {args.command}: interrupted (Ctrl-C){detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
