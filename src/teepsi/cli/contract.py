"""Job-contract commands: ``keygen``, ``spec check``, ``verify-receipt`` and
``audit verify`` (the checks themselves are :mod:`teepsi.contract.offline`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from teepsi.cli.common import add_signer_flags
from teepsi.cli.errors import EXIT_FAILED, EXIT_OK, UsageError

if TYPE_CHECKING:
    from teepsi.contract.offline import Judge
    from teepsi.contract.receipt_files import ReceiptFiles


def _keygen(args: argparse.Namespace) -> int:
    from teepsi.contract.party_keys import (
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


def _spec_check(args: argparse.Namespace) -> int:
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


def _signer_judge(args: argparse.Namespace) -> Judge:
    """How this command judges a signing server: --config and --allow-simulated, with a
    loud warning for simulated evidence and a note when no policy was applied."""
    from teepsi.attestation.policy import Policy, PolicyError
    from teepsi.attestation.verify import SIMULATED_WARNING
    from teepsi.cli.evidence import SIMULATED_REMEDY
    from teepsi.contract.offline import judge_signing_server

    def judge(certificate: bytes, collateral: str | None, at: int) -> dict[str, object]:
        # Loaded when a signer is judged, not before: a document that is refused first
        # is refused (exit 1) whatever the policy file holds.
        policy: Policy | None = None
        if args.config:
            try:
                policy = Policy.load(args.config)
            except PolicyError as exc:
                raise UsageError(str(exc)) from None
        judged = judge_signing_server(
            certificate,
            collateral,
            at,
            policy=policy,
            allow_simulated=args.allow_simulated,
            simulated_remedy=SIMULATED_REMEDY,
        )
        signer = judged["signer"]
        if isinstance(signer, dict) and signer["simulated"]:
            # Anyone can make simulated evidence: trusted only because it was asked for, loudly.
            print(f"teepsi {args.command}: WARNING {SIMULATED_WARNING}", file=sys.stderr)
        judged["policy"] = str(args.config) if args.config else None
        if policy is None:
            judged["note"] = (
                "no --config: quote, key binding and server role verified, but no policy was "
                "applied (measurements, attributes and TCB status not judged)"
            )
        return judged

    return judge


def _refuse(reason: str) -> int:
    print(json.dumps({"valid": False, "reason": reason}))
    return EXIT_FAILED


def _receipt_files(args: argparse.Namespace) -> ReceiptFiles:
    """RECEIPT and its evidence (--cert, --collateral); unreadable files are usage errors,
    a receipt that does not parse raises ReceiptError."""
    from teepsi.attestation.collateral import CollateralError
    from teepsi.contract.receipt_files import (
        RECEIPT_CERT_SUFFIX,
        RECEIPT_COLLATERAL_SUFFIX,
        ReceiptFilesError,
        load_receipt_files,
    )

    try:
        return load_receipt_files(args.receipt, certificate=args.cert, collateral=args.collateral)
    except ReceiptFilesError as exc:
        raise UsageError(
            f"{exc} (the client saves RECEIPT, RECEIPT{RECEIPT_CERT_SUFFIX} and "
            f"RECEIPT{RECEIPT_COLLATERAL_SUFFIX})"
        ) from None
    except CollateralError as exc:
        raise UsageError(
            f"{exc} (the collateral the server was verified with: pass --collateral FILE)"
        ) from None


def _verify_receipt(args: argparse.Namespace) -> int:
    """The receipt's signature, and the attestation of the certificate that signed it,
    as of the receipt's issue time (the verdict a live client had then)."""
    from teepsi.contract.offline import SignedRefused, check_receipt
    from teepsi.contract.receipt import ReceiptError
    from teepsi.contract.receipt_files import RECEIPT_COLLATERAL_SUFFIX

    judge = _signer_judge(args)
    try:
        files = _receipt_files(args)
        if files.collateral is None:
            raise UsageError(
                f"cannot read {args.receipt}{RECEIPT_COLLATERAL_SUFFIX}: the collateral the "
                "server was verified with (the client saves it beside the receipt; or pass "
                "--collateral FILE)"
            )
        judged = check_receipt(files, at=args.at, judge=judge)
    except (ReceiptError, SignedRefused) as exc:
        return _refuse(str(exc))
    out: dict[str, object] = {"valid": True, **judged, "receipt": files.signed.receipt.to_dict()}
    print(json.dumps(out, indent=2, default=str))
    return EXIT_OK


def _audit_verify(args: argparse.Namespace) -> int:
    """The chain, every signed head (and its signer's evidence, through the one path), and
    with --receipt that the log holds, unchanged, everything up to the receipt's release."""
    from teepsi.contract.offline import SignedRefused, check_audit_log
    from teepsi.contract.receipt import ReceiptError

    if (args.cert or args.collateral) and not args.receipt:
        raise UsageError("--cert and --collateral belong to a --receipt; pass the receipt too")
    judge = _signer_judge(args)
    try:
        receipt = _receipt_files(args) if args.receipt else None
        verdict = check_audit_log(args.log, head=args.head, receipt=receipt, judge=judge)
    except (ReceiptError, SignedRefused) as exc:
        return _refuse(str(exc))
    summary = verdict.summary
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
        "signers": verdict.signers,
    }
    if summary.unsigned_tail:
        report["warning"] = (
            f"the last {summary.unsigned_tail} line(s) follow the newest signed head: nothing "
            "authenticates them (the server is running or crashed, or later heads were cut)"
        )
    if verdict.receipt_head is not None:
        report["receipt_head"] = verdict.receipt_head.to_dict()
    print(json.dumps(report))
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from teepsi.cli.evidence import unix_seconds

    keygen = subparsers.add_parser("keygen", help="make a party key pair for job specs")
    keygen.add_argument("--out", required=True, help="where to write the private key (PEM)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(func=_keygen)

    spec = subparsers.add_parser("spec", help="job specs")
    spec_sub = spec.add_subparsers(dest="spec_command", required=True)
    check = spec_sub.add_parser("check", help="validate a job spec and print its digest")
    check.add_argument("file")
    check.set_defaults(func=_spec_check)

    verify_receipt = subparsers.add_parser("verify-receipt", help="re-check a job's signed receipt")
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
    add_signer_flags(verify_receipt)
    verify_receipt.set_defaults(func=_verify_receipt)

    audit = subparsers.add_parser("audit", help="the server's audit log")
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
    add_signer_flags(audit_verify)
    audit_verify.set_defaults(func=_audit_verify)
