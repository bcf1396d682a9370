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
    from teepsi.server.app import ServerConfig, ServerConfigError, run_server, start_server
    from teepsi.server.jobs import Limits

    _setup_logging("server", args.verbose)
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
            upload_idle_timeout_seconds=args.upload_idle_timeout,
        ),
        spill_dir=args.spill_dir,
        max_workers=args.max_workers,
        audit_log=args.audit_log,
        pccs_url=args.pccs_url,
        qcnl_path=args.qcnl_config,
        insecure_pccs_tls=args.insecure_pccs_tls,
    )
    try:
        if args.announce:
            # The demo and tests learn the bound port from one JSON line on stdout.
            running = start_server(config)
            _serve_announced(running)
        else:
            run_server(config)
    except ServerConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    return EXIT_OK


def _serve_announced(running: object) -> None:
    import signal
    import threading

    from teepsi.server.app import RunningServer

    assert isinstance(running, RunningServer)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.stdout.write(json.dumps({"port": running.port, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    stop.wait()
    log.info("shutting down")
    running.stop()
    log.info("server stopped")


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


def parse_seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


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


#: Keys a --run-config file may set: per-run values only. What the client trusts (policy,
#: attestation, allow flags) and its files stay on the enclave's fixed command line.
RUN_CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "name": str,
    "parties": int,
    "job": str,
    "timeout": (int, float),
    "format": str,
    "key": list,
    "delimiter": str,
    "quote": str,
    "normalize": str,
}
CLIENT_DEFAULTS: dict[str, object] = {
    "job": "default",
    "timeout": 600.0,
    "quote": '"',
    "normalize": "trim",
}


def _apply_run_config(args: argparse.Namespace) -> None:
    """Merge ``--run-config`` (TOML) into ``args``; refuse anything else it tries to set."""
    import tomllib

    if args.run_config:
        path = Path(args.run_config)
        try:
            values: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"--run-config {path}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"--run-config {path}: not valid TOML: {exc}") from None
        for key, value in values.items():
            expected = RUN_CONFIG_KEYS.get(key)
            if expected is None:
                raise UsageError(
                    f"--run-config {path}: {key}: not a per-run setting (allowed: "
                    f"{', '.join(RUN_CONFIG_KEYS)})"
                )
            if isinstance(value, bool) or not isinstance(value, expected):
                raise UsageError(f"--run-config {path}: {key}: wrong type {type(value).__name__}")
            if isinstance(value, list) and not all(isinstance(k, str) for k in value):
                raise UsageError(f"--run-config {path}: key: must be a list of column names")
            if getattr(args, key) is not None:
                raise UsageError(
                    f"--run-config {path}: {key}: also given on the command line; give it once"
                )
            setattr(args, key, value)
    for key, default in CLIENT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    for key in ("host", "name", "parties"):
        if getattr(args, key) is None:
            raise UsageError(f"--{key} is required (on the command line or in --run-config)")


def _cmd_client(args: argparse.Namespace) -> int:
    from teepsi.attestation.policy import Policy
    from teepsi.client.party import PartyConfig, PsiClientError, run_party
    from teepsi.client.progress import Progress
    from teepsi.engine.tables import (
        TableError,
        TableFormat,
        TableSpec,
        read_table,
        text_lines,
        write_rows,
    )

    _setup_logging("client", args.verbose, args.quiet)
    job_spec, party_key = _client_contract(args)
    _apply_run_config(args)
    from teepsi.contract.spec import IDENTIFIER_PATTERN

    for flag, value in (("--name", args.name), ("--job", args.job)):
        if not IDENTIFIER_PATTERN.fullmatch(value):
            raise UsageError(
                f"{flag} {value[:40]!r} is invalid: use 1-128 letters, digits, '.', '_', '@' "
                "or '-', starting with a letter or digit"
            )
    loaded = _load_policy(args.config, args)
    assert isinstance(loaded, Policy)
    spec = _table_spec(args)
    assert isinstance(spec, TableSpec)
    progress = Progress(enabled=not args.quiet)
    try:
        with progress.phase(f"reading {spec.path.name}", total=None):
            table = read_table(spec)
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
    )
    if job_spec is None:
        log.warning(
            "no --spec: quick mode; parties are not authenticated, anyone who passes "
            "attestation can fill a slot"
        )
    try:
        result = run_party(config, table)
        if result.receipt is not None and args.receipt:
            Path(args.receipt).write_text(result.receipt.to_json() + "\n")
            Path(args.receipt + ".cert.pem").write_bytes(_pem(result.server_certificate_der))
        if args.output and result.status == "RELEASED":
            with progress.phase(f"writing {Path(args.output).name}", total=len(result.rows)):
                write_rows(result.rows, spec, args.output)
    except (PsiClientError, TableError) as exc:
        log.error("%s", exc)
        return EXIT_FAILED
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
        sys.stdout.buffer.write(text_lines(result.rows))
        sys.stdout.flush()
    else:
        print(
            f"{len(result.rows)} matching rows"
            + (f" written to {args.output}" if args.output else "")
        )
    log.info(
        "job %s: rows read %d, with a key %d, distinct keys %d, intersection %d, "
        "matching rows %d (result sha256 %s)",
        result.job_id,
        result.rows_read,
        result.rows_with_key,
        result.distinct_keys,
        result.intersection_size,
        len(result.rows),
        result.result_sha256.hex(),
    )
    return EXIT_OK


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

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; choose another --out or pass --force")
    key = generate_private_key()
    try:
        out.write_bytes(private_key_pem(key))
        out.chmod(0o600)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror}") from None
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
    """Signature, certificate binding, and (with --config) whose enclave signed it."""
    from teepsi.attestation.evidence import EnclaveIdentity, Role
    from teepsi.attestation.policy import Policy, PolicyError, PolicyViolation
    from teepsi.attestation.quote import QuoteFormatError, parse_quote
    from teepsi.attestation.ratls import RaTlsError, extract_evidence
    from teepsi.attestation.sim import is_simulated_quote
    from teepsi.contract.receipt import ReceiptError, SignedReceipt, verify_receipt

    def refuse(reason: str) -> int:
        print(json.dumps({"valid": False, "reason": reason}))
        return EXIT_FAILED

    try:
        signed = SignedReceipt.from_json(Path(args.receipt).read_bytes())
        cert = Path(args.cert).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except ReceiptError as exc:
        return refuse(str(exc))
    try:
        verify_receipt(signed, cert)
        evidence = extract_evidence(cert)
        body = parse_quote(evidence.quote).report_body
    except (ReceiptError, RaTlsError, QuoteFormatError) as exc:
        return refuse(str(exc))
    flags = int.from_bytes(body.attributes[:8], "little")
    signer = {
        "mr_enclave": body.mr_enclave.hex(),
        "mr_signer": body.mr_signer.hex(),
        "isv_prod_id": body.isv_prod_id,
        "isv_svn": body.isv_svn,
        "simulated": is_simulated_quote(evidence.quote),
    }
    if args.config:
        try:
            policy = Policy.load(args.config)
        except PolicyError as exc:
            raise UsageError(str(exc)) from None
        if signer["simulated"] and not args.allow_simulated:
            return refuse("the certificate's evidence is SIMULATED; pass --allow-simulated")
        if body.isv_prod_id != Role.SERVER:
            return refuse(f"the signing enclave has ISV_PROD_ID {body.isv_prod_id}, not a server")
        identity = EnclaveIdentity(
            mr_enclave=body.mr_enclave,
            mr_signer=body.mr_signer,
            isv_prod_id=body.isv_prod_id,
            isv_svn=body.isv_svn,
            attribute_flags=flags,
            xfrm=int.from_bytes(body.attributes[8:], "little"),
        )
        try:
            # The TCB status of the time is not re-judged: its collateral has expired.
            policy.check(identity, "UpToDate")
        except PolicyViolation as exc:
            return refuse(f"signing enclave refused by --config: {exc}")
    print(
        json.dumps(
            {"valid": True, "signer": signer, "receipt": signed.receipt.to_dict()},
            indent=2,
            default=str,
        )
    )
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
        type=float,
        default=600.0,
        help="seconds a job waits for all its parties (default 600)",
    )
    server.add_argument("--max-jobs", type=int, default=256, help="jobs at once (default 256)")
    server.add_argument(
        "--max-parties", type=int, default=256, help="parties per job (default 256)"
    )
    server.add_argument(
        "--max-items",
        type=int,
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
        "--upload-idle-timeout",
        type=parse_seconds,
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
        "--max-workers",
        type=int,
        default=16,
        help="threads for blocking work: attestation checks, uploads, intersections, receipts; "
        "parties waiting for a result hold none (default 16: with the server's own threads, "
        "within a Gramine enclave's default sgx.max_threads of 32)",
    )
    server.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    server.add_argument("-v", "--verbose", action="store_true")
    _add_trust_flags(server)
    server.set_defaults(func=_cmd_server)

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
    client.add_argument("--parties", type=int, help="number of parties in the job")
    client.add_argument("--name", help="this party's name, unique in the job")
    client.add_argument("--job", help="job id (default: default)")
    client.add_argument("--output", help="write the result here, in the input's format")
    client.add_argument("--attestation", choices=["sim", "gramine", "none"], default="gramine")
    client.add_argument("--timeout", type=float, help="seconds to wait in all (default 600)")
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
        help="save the server's signed receipt here (and its certificate as RECEIPT.cert.pem)",
    )
    client.add_argument(
        "--run-config",
        help="TOML file with per-run settings (host, name, parties, job, timeout, format, key, "
        "delimiter, quote, normalize); for enclaves whose command line is fixed",
    )
    client.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    client.add_argument("-v", "--verbose", action="store_true")
    _add_trust_flags(client)
    client.set_defaults(func=_cmd_client)

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

    verify_receipt = sub.add_parser("verify-receipt", help="re-check a job's signed receipt")
    verify_receipt.add_argument("receipt")
    verify_receipt.add_argument("--cert", required=True, help="the server's certificate")
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

    from teepsi.cli_evidence import register as register_evidence_tools

    register_evidence_tools(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before numpy loads: its BLAS is unused here, and would start a thread per core
    # (an enclave's sgx.max_threads is finite; the deploy manifests pin this too).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
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
