"""The ``teepsi`` command line: a thin layer over :mod:`teepsi.server` and :mod:`teepsi.client`.

Exit codes: 0 success; 1 the run failed or a peer was refused; 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from teepsi import __version__

log = logging.getLogger("teepsi")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad flags or input files; exit code 2."""


def _setup_logging(role: str, verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(
        level=level,
        format=f"teepsi {role}: %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
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
    from teepsi.server.app import ServerConfig, ServerConfigError, run_server, start_server
    from teepsi.server.jobs import Limits

    _setup_logging("server", args.verbose)
    _apply_run_config(args)
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
    )
    try:
        if args.announce:
            # The demo and tests learn the bound port from one JSON line on stdout.
            running = start_server(config)
            expired = _serve_announced(running)
        else:
            expired = run_server(config)
    except ServerConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    return EXIT_FAILED if expired else EXIT_OK


def _serve_announced(running: object) -> bool:
    import signal
    import threading

    from teepsi.server.app import RunningServer

    assert isinstance(running, RunningServer)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.stdout.write(json.dumps({"port": running.port, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    expired = running.serve_until(stop)
    log.info("shutting down")
    running.stop()
    log.info("server stopped")
    return expired


def parse_size(text: str) -> int:
    """Bytes from "256MiB", "1GiB", "512M", "1000000"."""
    units = {
        "": 1,
        "k": 1000,
        "kb": 1000,
        "kib": 1024,
        "m": 1000**2,
        "mb": 1000**2,
        "mib": 1024**2,
        "g": 1000**3,
        "gb": 1000**3,
        "gib": 1024**3,
    }
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256MiB or 1GiB") from None
    if unit not in units or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256MiB or 1GiB")
    return int(value * units[unit])


def positive_int(text: str) -> int:
    """A count of at least 1 (a limit of 0 or less would refuse everything, or nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """A count of 0 or more (0 where a limit may be turned off)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def positive_seconds(text: str) -> float:
    """Seconds, finite and above 0 (float() would take nan, inf and negatives)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds above 0")
    return value


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
    from teepsi.engine.tables import TableError, TableFormat, TableSpec, detect_format

    try:
        fmt = detect_format(args.data, args.format)
        normalization = Normalization.parse(args.normalize)
    except (TableError, NormalizationError) as exc:
        raise UsageError(str(exc)) from None
    if fmt is TableFormat.TEXT and args.key:
        raise UsageError("--key applies to CSV and Parquet input; a text file's key is the line")
    delimiter = args.delimiter
    if delimiter is None:
        delimiter = "\t" if str(args.data).lower().endswith(".tsv") else ","
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


#: What a ``--run-config`` TOML file may set: its key -> the flag it stands for. Only
#: per-run values that decide nothing about whom the process trusts; the policy, the
#: attestation mode and the allow flags stay on the (under Gramine, measured) command line.
#: The flag's own argparse type and choices check the value, so adding a key is one line.
CLIENT_RUN_KEYS: dict[str, str] = {
    "host": "--host",
    "name": "--name",
    "parties": "--parties",
    "job": "--job",
    "timeout": "--timeout",
    "format": "--format",
    "key": "--key",
    "delimiter": "--delimiter",
    "quote": "--quote",
    "normalize": "--normalize",
    "memory_budget": "--memory-budget",
    # Paths: under Gramine only the manifest's allowed files can be opened at all.
    "spec": "--spec",
    "key_file": "--key-file",
}
SERVER_RUN_KEYS: dict[str, str] = {
    "max_jobs": "--max-jobs",
    "max_parties": "--max-parties",
    "max_items": "--max-items",
    "job_timeout": "--job-timeout",
    "memory_budget": "--memory-budget",
    "max_workers": "--max-workers",
    "join_timeout": "--join-timeout",
    "max_jobs_per_party": "--max-jobs-per-party",
    "max_jobs_per_address": "--max-jobs-per-address",
    "max_connections": "--max-connections",
    "connection_idle_timeout": "--connection-idle-timeout",
    "handshake_timeout": "--handshake-timeout",
}
CLIENT_DEFAULTS: dict[str, object] = {
    "job": "default",
    "timeout": 600.0,
    "quote": '"',
    "normalize": "trim",
    # A data provider's default budget (teepsi.engine.tables.DEFAULT_MEMORY_BUDGET), kept
    # here so that parsing arguments imports no polars.
    "memory_budget": 1024**3,
}


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


def _run_config_values(
    path: Path, keys: dict[str, str], parser: argparse.ArgumentParser
) -> dict[str, tuple[str, object]]:
    """``key -> (dest, value)`` from a run file, each value checked as its flag checks it."""
    import tomllib

    try:
        values: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--run-config {path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--run-config {path}: not valid TOML: {exc}") from None
    actions = {option: a for a in parser._actions for option in a.option_strings}
    merged: dict[str, tuple[str, object]] = {}
    for key, value in values.items():
        flag = keys.get(key)
        if flag is None:
            raise UsageError(
                f"--run-config {path}: {key}: not a per-run setting (allowed: {', '.join(keys)})"
            )
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
                    f"--run-config {path}: {key}: wrong type {type(item).__name__} "
                    f"(expected {f'a list of {kinds}' if many else kinds}, as for {flag})"
                )
        converter = action.type if callable(action.type) else None
        converted: list[object] = []
        for item in items:
            try:
                result = item if converter is None else converter(str(item))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                raise UsageError(f"--run-config {path}: {key}: {exc}") from None
            if action.choices is not None and result not in action.choices:
                raise UsageError(
                    f"--run-config {path}: {key}: {item!r} is not one of "
                    f"{', '.join(map(str, action.choices))}"
                )
            converted.append(result)
        merged[key] = (action.dest, converted if many else converted[0])
    return merged


def _apply_run_config(args: argparse.Namespace) -> None:
    """Merge ``--run-config`` (TOML) into ``args``; refuse anything else it tries to set.

    A value may come from the command line or the file, never both (``args.explicit`` holds
    the dests given on the command line).
    """
    if not args.run_config:
        return
    path = Path(args.run_config)
    for key, (dest, value) in _run_config_values(path, args.run_keys, args.subparser).items():
        if dest in args.explicit:
            raise UsageError(
                f"--run-config {path}: {key}: also given on the command line; give it once"
            )
        setattr(args, dest, value)


def _client_defaults(args: argparse.Namespace) -> None:
    for key, default in CLIENT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    for key in ("host", "name", "parties"):
        if getattr(args, key) is None:
            raise UsageError(f"--{key} is required (on the command line or in --run-config)")


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

    _setup_logging("client", args.verbose, args.quiet)
    _apply_run_config(args)
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
    progress = Progress(enabled=not args.quiet)
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


def _cmd_measure(args: argparse.Namespace) -> int:
    from teepsi.attestation.evidence import Role
    from teepsi.attestation.measure import sim_identity
    from teepsi.attestation.policy import policy_for

    if args.attestation != "sim":
        raise UsageError(
            "--attestation gramine: real measurements come from gramine-sgx-sign "
            "(see deploy/); `teepsi measure` computes simulated ones"
        )
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


def _cmd_verify_receipt(args: argparse.Namespace) -> int:
    """The receipt's signature, and the attestation of the certificate that signed it.

    The certificate goes through the same verification path as a live server's
    (:class:`teepsi.attestation.peer.PeerVerifier`), as of the receipt's issue time.
    """
    from teepsi.attestation.collateral import CollateralError, iso_utc, load_collateral_file
    from teepsi.attestation.evidence import Role
    from teepsi.attestation.peer import PeerRejected, PeerVerifier
    from teepsi.attestation.policy import Policy, PolicyError
    from teepsi.contract.receipt import ReceiptError, SignedReceipt, verify_receipt

    def refuse(reason: str) -> int:
        print(json.dumps({"valid": False, "reason": reason}))
        return EXIT_FAILED

    cert_path = args.cert or args.receipt + RECEIPT_CERT_SUFFIX
    collateral_path = args.collateral or args.receipt + RECEIPT_COLLATERAL_SUFFIX
    policy: Policy | None = None
    if args.config:
        try:
            policy = Policy.load(args.config)
        except PolicyError as exc:
            raise UsageError(str(exc)) from None
    try:
        receipt_bytes = Path(args.receipt).read_bytes()
        cert = Path(cert_path).read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read {exc.filename}: {exc.strerror} (the client saves RECEIPT, "
            f"RECEIPT{RECEIPT_CERT_SUFFIX} and RECEIPT{RECEIPT_COLLATERAL_SUFFIX})"
        ) from None
    try:
        collateral = load_collateral_file(collateral_path)
    except CollateralError as exc:
        raise UsageError(
            f"{exc} (the collateral the server was verified with: pass --collateral FILE)"
        ) from None
    try:
        signed = SignedReceipt.from_json(receipt_bytes)
        verify_receipt(signed, cert)
    except ReceiptError as exc:
        return refuse(str(exc))
    # As of the receipt's issue time by default: the verdict a live client had then.
    at = signed.receipt.issued_at if args.at is None else args.at
    verifier = PeerVerifier(policy, allow_simulated=args.allow_simulated)
    try:
        peer, _ = verifier.verify_certificate(
            cert, collateral, what="signing server", role=Role.SERVER, at=at, record=False
        )
    except PeerRejected as exc:
        return refuse(str(exc))
    verified = peer.verified
    identity = verified.identity
    assert identity is not None
    out: dict[str, object] = {
        "valid": True,
        "signer": {
            "mr_enclave": identity.mr_enclave.hex(),
            "mr_signer": identity.mr_signer.hex(),
            "isv_prod_id": identity.isv_prod_id,
            "isv_svn": identity.isv_svn,
            "simulated": verified.simulated,
        },
        "quote_verified": True,
        "root": verified.root,
        "tcb_status": verified.tcb_status,
        "advisory_ids": list(verified.advisory_ids),
        "verified_at": at,
        "verified_at_iso": iso_utc(at),
        "policy": str(args.config) if args.config else None,
    }
    if policy is None:
        out["note"] = (
            "no --config: quote, key binding and server role verified, but no policy was "
            "applied (measurements, attributes and TCB status not judged)"
        )
    out["receipt"] = signed.receipt.to_dict()
    print(json.dumps(out, indent=2, default=str))
    return EXIT_OK


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from teepsi.contract.audit import AuditError, verify_audit_log

    try:
        summary = verify_audit_log(args.log, expect_head=args.head)
    except AuditError as exc:
        print(json.dumps({"valid": False, "reason": str(exc)}))
        return EXIT_FAILED
    print(json.dumps({"valid": True, "entries": summary.entries, "head": summary.head}))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from teepsi.demo import run_contract_demo, run_demo

    _setup_logging("demo", args.verbose)
    if args.contract:
        return run_contract_demo(verbose=args.verbose)
    return run_demo(parties=args.parties, verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teepsi",
        description="Multi-party private set intersection inside attested enclaves.",
    )
    parser.add_argument("--version", action="version", version=f"teepsi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="run the PSI server")
    server.add_argument("--host", default="0.0.0.0:50051", help="listen address HOST:PORT")
    server.add_argument("--config", help="policy for data providers (dynamic_config.json)")
    server.add_argument("--attestation", choices=["sim", "gramine"], default="gramine")
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
        help=f"TOML file with this run's limits ({', '.join(SERVER_RUN_KEYS)}); "
        "for enclaves whose command line is fixed",
    )
    server.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    _add_collateral_state_flag(server, "server", "data provider's")
    server.add_argument("-v", "--verbose", action="store_true")
    _add_trust_flags(server)
    server.set_defaults(func=_cmd_server, run_keys=SERVER_RUN_KEYS, subparser=server)

    client = sub.add_parser("client", help="run a data provider")
    client.add_argument("--host", help="server address HOST:PORT")
    client.add_argument(
        "--config", required=True, help="policy for the server (dynamic_config.json)"
    )
    client.add_argument(
        "--data", required=True, help="input: text (one item per line), CSV or Parquet"
    )
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
    client.add_argument(
        "--memory-budget",
        type=parse_size,
        help="memory for this party's keys and records; beyond it they spill to disk, "
        "encrypted (default 1GiB: fits a 2 GiB enclave)",
    )
    client.add_argument("--parties", type=int, help="number of parties in the job")
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
    client.add_argument("--attestation", choices=["sim", "gramine", "none"], default="gramine")
    client.add_argument(
        "--timeout", type=positive_seconds, help="seconds to wait in all (default 600)"
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
        help=f"TOML file with per-run settings ({', '.join(CLIENT_RUN_KEYS)}); "
        "for enclaves whose command line is fixed",
    )
    client.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    client.add_argument("-v", "--verbose", action="store_true")
    _add_trust_flags(client)
    client.set_defaults(func=_cmd_client, run_keys=CLIENT_RUN_KEYS, subparser=client)

    measure = sub.add_parser("measure", help="print a dynamic_config.json for this installation")
    measure.add_argument("--attestation", choices=["sim", "gramine"], default="sim")
    measure.add_argument("--output", "-o", help="write to this file instead of stdout")
    measure.set_defaults(func=_cmd_measure)

    demo = sub.add_parser("demo", help="run the seed's toy PSI locally in sim mode")
    demo.add_argument("--parties", type=int, choices=[2, 3], default=3)
    demo.add_argument(
        "--contract",
        action="store_true",
        help="the job-contract example: three parties under a spec, one not a recipient",
    )
    demo.add_argument("-v", "--verbose", action="store_true")
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
    verify_receipt.add_argument(
        "--config", help="policy the signing server enclave must satisfy (dynamic_config.json)"
    )
    verify_receipt.add_argument(
        "--allow-simulated", action="store_true", help="accept a simulated server enclave"
    )
    verify_receipt.set_defaults(func=_cmd_verify_receipt)

    audit = sub.add_parser("audit", help="the server's audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser("verify", help="check the log's hash chain")
    audit_verify.add_argument("log")
    audit_verify.add_argument("--head", help="expected last hash (detects truncation)")
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


def main(argv: Sequence[str] | None = None) -> int:
    # Before numpy loads: its BLAS is unused here, and would start a thread per core
    # (an enclave's sgx.max_threads is finite; the deploy manifests pin this too).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = _explicit_dests(argv)
    try:
        code: int = args.func(args)
    except UsageError as exc:
        print(f"teepsi {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
