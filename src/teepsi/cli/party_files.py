"""What a ``teepsi client`` run reads and writes, decided and checked from its flags
before it joins a job: the input table, the job contract, and the output paths."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from teepsi.cli.errors import UsageError
from teepsi.cli.settings import ENV_PREFIX

if TYPE_CHECKING:
    from teepsi.contract.party_keys import PartyPrivateKey
    from teepsi.contract.spec import JobSpec
    from teepsi.engine.output import RowPieces
    from teepsi.engine.tables import TableFormat, TableSpec

#: A data provider's defaults where a flag has none (so the settings layers can tell a
#: flag that was not given from one given as its default).
CLIENT_DEFAULTS: dict[str, object] = {
    "job": "default",
    "timeout": 600.0,
    "quote": '"',
    "normalize": "trim",
    # A data provider's default budget (teepsi.engine.tables.DEFAULT_MEMORY_BUDGET), kept
    # here so that parsing arguments imports no polars.
    "memory_budget": 1024**3,
}


def client_defaults(args: argparse.Namespace) -> None:
    for key, default in CLIENT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    for key in ("host", "name", "parties", "data"):
        if getattr(args, key) is None:
            raise UsageError(
                f"--{key} is required (on the command line, as {ENV_PREFIX}{key.upper()} or "
                "in --run-config)"
            )


def table_spec(args: argparse.Namespace) -> TableSpec:
    """--data and how to read it: --format, --key-column, --delimiter, --quote, --normalize."""
    from teepsi.contract.normalization import Normalization, NormalizationError
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
    if fmt is TableFormat.TEXT and args.key_column:
        raise UsageError(
            f"--key-column applies to CSV and Parquet input, and --data {args.data} is read as "
            "text (one item per line, the line is the key)"
            + ("" if args.format else "; if it is a table, pass --format csv or --format parquet")
        )
    if fmt is not TableFormat.TEXT and not args.key_column:
        raise UsageError(f"{args.data}: name the key column(s) with --key-column COLUMN")
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
        key_columns=tuple(args.key_column or ()),
        delimiter=delimiter,
        quote_char=quote,
        normalization=normalization,
    )


def client_contract(
    args: argparse.Namespace,
) -> tuple[JobSpec, PartyPrivateKey] | tuple[None, None]:
    """--spec and --key-file: the job spec fixes job id, parties and normalisation."""
    if args.spec is None:
        if args.key_file is not None:
            raise UsageError("--key-file goes with --spec (a job spec lists the party keys)")
        return None, None
    from teepsi.contract.party_keys import load_private_key, public_key_der
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


@dataclass(frozen=True)
class ClientOutputs:
    """Where a client run puts what it gets; every path checked before the run starts."""

    #: The rows: a file, or "-" for standard output; None when no rows can come.
    rows: str | None
    receipt: str | None
    #: Quick mode's resume file (the session, for a restarted client); None if not kept.
    resume: str | None


def client_outputs(
    args: argparse.Namespace, fmt: TableFormat, job_spec: JobSpec | None
) -> ClientOutputs:
    """Decide and check the run's output paths (a usage error, exit 2, before joining)."""
    from teepsi.contract.outputs import OutputKind
    from teepsi.contract.receipt_files import RECEIPT_CERT_SUFFIX, RECEIPT_COLLATERAL_SUFFIX
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
    return ClientOutputs(rows=rows if rows_may_come else None, receipt=args.receipt, resume=resume)


def rescue_rows(rows: RowPieces, spec: TableSpec, job: str, name: str) -> str | None:
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
