"""``teepsi client``: run a data provider (quick mode, or a party under a job spec)."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from teepsi.attestation.providers import PROVIDER_NAMES
from teepsi.cli.common import (
    add_collateral_state_flag,
    add_log_flags,
    add_run_config_flag,
    add_sim_tee_flag,
    add_trust_flags,
    collateral_file,
    collateral_state,
    load_policy,
    setup_logging,
    sim_tee,
)
from teepsi.cli.errors import EXIT_FAILED, EXIT_OK, UsageError
from teepsi.cli.party_files import (
    client_contract,
    client_defaults,
    client_outputs,
    rescue_rows,
    table_spec,
)
from teepsi.cli.values import client_address, parse_size, positive_int, positive_seconds

if TYPE_CHECKING:
    from teepsi.cli.party_files import ClientOutputs
    from teepsi.client.party import PartyResult, ResumeToken
    from teepsi.client.progress import Progress
    from teepsi.engine.tables import TableSpec

log = logging.getLogger("teepsi")
#: Bytes per read when the written text output is copied to standard output.
_COPY_BYTES = 1 << 20


def _resume_token(outputs: ClientOutputs) -> ResumeToken:
    """Quick mode's --resume: the session the earlier run saved."""
    from teepsi.client.party import ResumeToken, ResumeTokenError

    assert outputs.resume is not None  # client_outputs refuses --resume without one
    try:
        text = Path(outputs.resume).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--resume-file {outputs.resume}: cannot read: {exc.strerror}") from None
    try:
        return ResumeToken.from_json(text, f"--resume-file {outputs.resume}")
    except ResumeTokenError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from teepsi.client.party import PartyConfig, PsiClientError, run_party
    from teepsi.client.progress import Progress
    from teepsi.contract.identifiers import IDENTIFIER_RULE, is_identifier
    from teepsi.engine.tables import TableError, read_table
    from teepsi.privatefile import write_private

    setup_logging("client", args.verbose, args.quiet, log_format=args.log_format)
    job_spec, party_key = client_contract(args)
    client_defaults(args)
    for flag, value in (("--name", args.name), ("--job", args.job)):
        if not is_identifier(value):
            raise UsageError(f"{flag} {value[:40]!r} is invalid: {IDENTIFIER_RULE}")
    policy = load_policy(args.config, args)
    state = collateral_state(args, "client")
    spec = table_spec(args)
    # Before anything is read or sent: a result is never computed for a place it cannot go.
    outputs = client_outputs(args, spec.format, job_spec)
    resume_token = _resume_token(outputs) if args.resume and job_spec is None else None
    # A log shipper reads stderr line by line as JSON: no progress bars there.
    progress = Progress(enabled=not args.quiet and args.log_format == "text")
    try:
        with progress.phase(f"reading {spec.path.name}", total=None):
            table = read_table(spec, memory_budget=args.memory_budget)
    except TableError as exc:
        raise UsageError(str(exc)) from None
    config = PartyConfig(
        host=args.host,
        policy=policy,
        name=args.name,
        party_count=args.parties,
        job_id=args.job,
        attestation=args.attestation,
        sim_tee=sim_tee(args),
        allow_simulated=args.allow_simulated,
        timeout=args.timeout,
        progress=progress.enabled,
        spec=job_spec,
        party_key=party_key,
        server_collateral_json=collateral_file(args.collateral),
        pccs_url=args.pccs_url,
        insecure_pccs_tls=args.insecure_pccs_tls,
        resume=args.resume,
        resume_token=resume_token,
        collateral_state=state,
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
    rows_file, saved = _save_results(result, spec, outputs, progress)
    failed = not saved
    if outputs.resume is not None and not failed:
        Path(outputs.resume).unlink(missing_ok=True)  # the result is saved: nothing to resume
    _print_outcome(result, spec, outputs, failed, rows_file)
    return EXIT_FAILED if failed else EXIT_OK


def _save_results(
    result: PartyResult, spec: TableSpec, outputs: ClientOutputs, progress: Progress
) -> tuple[Path | None, bool]:
    """The rows to --output, then the receipt to --receipt: (the file the rows are now
    in, if any; True if both succeeded)."""
    from teepsi.contract.receipt_files import save_receipt_files
    from teepsi.engine.tables import STDOUT_PATH, TableError, write_rows

    saved = rows_saved = True
    # The rows first: they are what the run was for.
    if outputs.rows is not None and result.status == "RELEASED":
        where = "standard output" if outputs.rows == STDOUT_PATH else outputs.rows
        try:
            with progress.phase(f"writing {where}", total=len(result.matching)):
                write_rows(result.matching, spec, outputs.rows)
        except TableError as exc:
            rows_saved = False
            rescued = rescue_rows(result.matching, spec, result.job_id, result.party_name)
            kept = f"the rows were saved to {rescued} instead" if rescued else "rows LOST"
            log.error("%s; %s", exc, kept)
            saved = False
    if result.receipt is not None and outputs.receipt is not None:
        try:
            save_receipt_files(
                outputs.receipt,
                result.receipt.to_json(),
                result.server_certificate_der,
                result.server_collateral_json,
            )
        except OSError as exc:
            # The rows are already saved; the run fails at the end.
            log.error("--receipt: %s", exc)
            saved = False
    in_file = rows_saved and outputs.rows is not None and outputs.rows != STDOUT_PATH
    return (Path(outputs.rows) if in_file and outputs.rows is not None else None), saved


def _print_outcome(
    result: PartyResult,
    spec: TableSpec,
    outputs: ClientOutputs,
    failed: bool,
    rows_file: Path | None,
) -> None:
    """What the run came to, on stdout (stderr when the rows are on stdout), and the
    counts in the log. ``rows_file``: the --output file the rows were written to."""
    from teepsi.engine.output import text_pieces
    from teepsi.engine.tables import STDOUT_PATH, TableFormat

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
                if rows_file is not None:  # the lines as written: not formatted twice
                    with rows_file.open("rb") as lines_written:
                        shutil.copyfileobj(lines_written, sys.stdout.buffer, _COPY_BYTES)
                else:
                    for lines in text_pieces(result.matching):
                        sys.stdout.buffer.write(lines)
                sys.stdout.flush()
            except OSError as exc:  # a closed pipe: the --output file has them
                log.warning("cannot print the result: %s", exc.strerror or exc)
    elif not failed:
        # With --output - the rows are on stdout: the summary goes to stderr.
        summary = sys.stderr if outputs.rows == STDOUT_PATH else sys.stdout
        written = "" if outputs.rows == STDOUT_PATH else f" written to {outputs.rows}"
        print(f"{len(result.matching)} matching rows{written}", file=summary)
    log.info(
        "job %s: rows read %d, with a key %d, distinct keys %d, intersection %s, "
        "matching rows %d (result sha256 %s)",
        result.job_id,
        result.rows_read,
        result.rows_with_key,
        result.distinct_keys,
        "withheld" if result.intersection_size is None else result.intersection_size,
        len(result.matching),
        result.result_sha256.hex() or "withheld",
        extra={
            "intersection_size": result.intersection_size,
            "matching_rows": len(result.matching),
        },
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    client = subparsers.add_parser("client", help="run a data provider")
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
        "--key-column",
        "--key",
        action="append",
        metavar="COLUMN",
        help="key column of CSV/Parquet input; repeat for a composite key (--key: the "
        "same, its old name)",
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
    add_sim_tee_flag(client, "for this data provider's evidence")
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
    add_collateral_state_flag(client, "client", "server")
    add_run_config_flag(client, 'parties = 3, key_column = ["email"]')
    client.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    add_log_flags(client)
    add_trust_flags(client)
    client.set_defaults(func=run, subparser=client)
