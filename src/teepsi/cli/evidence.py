"""Evidence tools for operators: ``verify-quote``, ``inspect-cert``, ``fetch-collateral``.

Each prints one JSON object on stdout and says what went wrong in one line on stderr.
Exit codes, as for every teepsi command: 0 success; 1 the evidence was rejected (or the
PCCS failed); 2 bad usage or unreadable input.

Nothing here is special-cased for known quotes: every verdict comes from
:func:`teepsi.attestation.verify.verify_quote` (dcap-qvl) and
:class:`teepsi.attestation.policy.TcbAllowances`, as on the PSI path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from teepsi.attestation.certinspect import (
    CertificateInspectionError,
    certificate_bytes,
    describe_certificate,
    load_certificate,
    quote_from_extensions,
)
from teepsi.attestation.collateral import (
    DEFAULT_QCNL_PATH,
    CollateralError,
    PccsCertificateError,
    PccsUrlMissing,
    describe_collateral,
    fetch_collateral,
    load_collateral_file,
    pccs_settings,
    quote_platform,
)
from teepsi.attestation.peer import PeerRejected, PeerVerifier
from teepsi.attestation.policy import Policy, PolicyError, PolicyViolation, TcbAllowances
from teepsi.attestation.quote import QuoteFormatError
from teepsi.attestation.quoteinfo import QUOTE_VERSION_PREFIXES, embedded_quote_fields, quote_fields
from teepsi.attestation.ratls import RaTlsError, extract_evidence
from teepsi.attestation.sim import is_simulated_quote
from teepsi.attestation.tcb import (
    ALLOW_HW_CONFIG_NEEDED,
    ALLOW_OUTDATED,
    ALLOW_SW_HARDENING_NEEDED,
    ALLOWANCES_NEEDED,
)
from teepsi.attestation.trust import verify_trusted_quote
from teepsi.attestation.verify import QuoteVerificationError, SimulatedEvidenceRefused
from teepsi.errors import TeepsiError
from teepsi.privatefile import write_private
from teepsi.timefmt import iso_utc

__all__ = ["quote_fields", "register", "unix_seconds"]

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2

#: The policy's TCB allowances as this command's flags (the table is in attestation.tcb).
_FLAG_FOR_ALLOWANCE = {
    ALLOW_SW_HARDENING_NEEDED: "--allow-sw-hardening",
    ALLOW_HW_CONFIG_NEEDED: "--allow-hw-config",
    ALLOW_OUTDATED: "--allow-outdated",
}
#: What the reason of refused simulated evidence tells this command's user.
SIMULATED_REMEDY = "pass --allow-simulated to accept simulated evidence (test runs only)"


class _InputError(TeepsiError):
    """Unreadable or malformed input: exit 2."""


def _fail(command: str, message: object) -> None:
    print(f"teepsi {command}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def _read(path: str, what: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as exc:
        raise _InputError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


# --- quotes ---------------------------------------------------------------------------


def _read_quote(path: str) -> bytes:
    """A quote file: raw bytes (as Gramine's /dev/attestation/quote gives it) or hex text."""
    data = _read(path, "quote")
    if not data:
        raise _InputError(f"quote {path}: file is empty")
    if data[:2] in QUOTE_VERSION_PREFIXES:
        return data
    stripped = data.strip()
    if re.fullmatch(rb"(?:[0-9a-fA-F]{2}|\s)+", stripped):
        return bytes.fromhex(stripped.decode("ascii"))
    # Checked after the version: raw quotes embed their PCK chain as PEM text.
    if b"-----BEGIN CERTIFICATE-----" in data or data.startswith(b"\x30\x82"):
        raise _InputError(
            f"quote {path}: this is a certificate, not a quote (use `teepsi inspect-cert`)"
        )
    return data


# --- verify-quote ---------------------------------------------------------------------


def unix_seconds(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", text.strip()):
        raise argparse.ArgumentTypeError(
            f"expected UNIX seconds (a non-negative integer): {text!r}"
        )
    return int(text.strip())


def _not_allowed(status: str, exc: PolicyViolation) -> str:
    needed = ALLOWANCES_NEEDED.get(status)
    flags = [_FLAG_FOR_ALLOWANCE[key] for key in needed or ()]
    if not flags:
        return str(exc)  # Revoked or unknown: no flag accepts it
    return f"TCB status {status} is not allowed (pass {' and '.join(flags)} to accept it)"


def _cmd_verify_quote(args: argparse.Namespace) -> int:
    command = "verify-quote"
    try:
        quote = _read_quote(args.quote)
        fields = quote_fields(quote)
        collateral = load_collateral_file(args.collateral)
    except (_InputError, QuoteFormatError, CollateralError) as exc:
        _fail(command, exc)
        return EXIT_USAGE
    at = int(time.time()) if args.at is None else int(args.at)
    allowances = TcbAllowances(
        outdated=args.allow_outdated,
        hw_config_needed=args.allow_hw_config,
        sw_hardening_needed=args.allow_sw_hardening,
    )
    policy: Policy | None = None
    if args.config:
        try:
            policy = Policy.load(args.config)
        except PolicyError as exc:
            _fail(command, exc)
            return EXIT_USAGE
        # The file's allow_* flags count, as on the PSI path; the command's flags widen.
        allowances = allowances.union(policy.tcb)
        policy = policy.with_tcb(allowances)
    out: dict[str, Any] = {"status": None, "advisory_ids": [], **fields}
    out.update(
        simulated=is_simulated_quote(quote),
        verified=False,
        accepted=False,
        verified_at=at,
        verified_at_iso=iso_utc(at),
    )
    try:
        verified = verify_trusted_quote(
            quote, collateral, allow_simulated=args.allow_simulated, now=at
        )
    except QuoteVerificationError as exc:
        # The reason names expired collateral documents and their dates (verify_quote).
        reason = str(exc)
        if isinstance(exc, SimulatedEvidenceRefused):
            reason += f"; {SIMULATED_REMEDY}"
        out["reason"] = reason
        _emit(out)
        return EXIT_REJECTED
    out.update(
        status=verified.tcb_status,
        advisory_ids=list(verified.advisory_ids),
        simulated=verified.simulated,
        verified=True,
    )
    try:
        allowances.check(verified.tcb_status)
    except PolicyViolation as exc:
        out["reason"] = _not_allowed(verified.tcb_status, exc)
        _emit(out)
        return EXIT_REJECTED
    if policy is not None:
        # Measurements (sgx_mrs or tdx_mrs), attributes and collateral rules, through
        # the one verification path; a bare quote binds no key or role.
        out["policy"] = str(args.config)
        try:
            verifier = PeerVerifier(
                policy, allow_simulated=args.allow_simulated, simulated_remedy=SIMULATED_REMEDY
            )
            peer = verifier.verify_unbound_quote(quote, collateral, at=at)
        except PeerRejected as exc:
            out["reason"] = str(exc)
            _emit(out)
            return EXIT_REJECTED
        out["matched"] = peer.matched.name if peer.matched is not None else None
    out["accepted"] = True
    _emit(out)
    return EXIT_OK


# --- inspect-cert ---------------------------------------------------------------------


def _cmd_inspect_cert(args: argparse.Namespace) -> int:
    command = "inspect-cert"
    try:
        data = _read(args.cert, "certificate")
        der = certificate_bytes(data)
        cert, reencoded = load_certificate(der)
        # Extensions that do not parse are unreadable input, as the certificate is.
        out = describe_certificate(cert, der, reencoded=reencoded)
    except (_InputError, CertificateInspectionError, ValueError) as exc:
        _fail(command, f"{args.cert}: {exc}")
        return EXIT_USAGE
    try:
        collateral = load_collateral_file(args.collateral) if args.collateral else None
    except CollateralError as exc:
        _fail(command, exc)
        return EXIT_USAGE

    binding: dict[str, Any]
    quote: bytes | None
    try:
        when = int(time.time()) if args.at is None else int(args.at)
        evidence = extract_evidence(der, at=dt.datetime.fromtimestamp(when, dt.UTC))
    except RaTlsError as exc:
        quote, source = quote_from_extensions(cert)
        binding = {"holds": False, "evidence": source, "reason": str(exc)}
    else:
        quote = evidence.quote
        binding = {
            "holds": True,
            "evidence": evidence.source,
            "public_key_sha256": evidence.public_key_sha256.hex(),
        }
    out["key_binding"] = binding
    out["quote"] = embedded_quote_fields(quote) if quote is not None else None
    verification = _verify_certificate_quote(der, binding, collateral, args)
    out["quote_verification"] = verification
    _emit(out)
    if not binding["holds"] or (collateral is not None and not verification["verified"]):
        return EXIT_REJECTED
    return EXIT_OK


def _verify_certificate_quote(
    der: bytes, binding: dict[str, Any], collateral: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    """The certificate through the one verification path, without a policy or a role."""
    at = int(time.time()) if args.at is None else int(args.at)
    result: dict[str, Any] = {"verified": False, "root": None}
    if not binding["holds"]:
        result["reason"] = f"not verified: the quote does not bind the key ({binding['reason']})"
        return result
    if collateral is None:
        result["reason"] = (
            "not verified: no --collateral given, so the quote's signatures, QE report and "
            "PCK chain were not checked"
        )
        return result
    verifier = PeerVerifier(
        None, allow_simulated=args.allow_simulated, simulated_remedy=SIMULATED_REMEDY
    )
    try:
        peer, _ = verifier.verify_certificate(
            der, collateral, what="certificate", role=None, at=at, record=False
        )
    except PeerRejected as exc:
        result["reason"] = f"not verified: {exc}"
        result["verified_at"] = iso_utc(at)
        return result
    verified = peer.verified
    result.update(
        tee=verified.tee_type,
        verified=True,
        root=verified.root,
        tcb_status=verified.tcb_status,
        advisory_ids=list(verified.advisory_ids),
        verified_at=iso_utc(at),
        role=peer.role_name(),
        note="no policy applied: measurements, attributes and TCB status are not judged",
    )
    return result


# --- fetch-collateral -----------------------------------------------------------------


def _cmd_fetch_collateral(args: argparse.Namespace) -> int:
    command = "fetch-collateral"
    try:
        quote = _read_quote(args.quote)
        platform = quote_platform(quote)
        settings = pccs_settings(
            args.pccs_url,
            args.qcnl_config,
            verify_tls=False if args.insecure_pccs_tls else None,
        )
    except PccsUrlMissing as exc:
        _fail(command, f"{exc}; or pass --pccs-url")
        return EXIT_USAGE
    except (_InputError, CollateralError) as exc:
        _fail(command, exc)
        return EXIT_USAGE
    try:
        collateral = fetch_collateral(
            quote, settings.url, verify_tls=settings.verify_tls, timeout=args.timeout
        )
    except PccsCertificateError as exc:
        _fail(command, f"{exc} (or pass --insecure-pccs-tls)")
        return EXIT_REJECTED
    except CollateralError as exc:
        _fail(command, exc)
        return EXIT_REJECTED
    if args.output == "-":
        sys.stdout.write(collateral + "\n")
        return EXIT_OK
    try:
        write_private(args.output, (collateral + "\n").encode("utf-8"))
    except OSError as exc:
        _fail(command, f"cannot write {args.output}: {exc.strerror or exc}")
        return EXIT_REJECTED
    info = describe_collateral(collateral)
    summary: dict[str, Any] = {
        "output": args.output,
        "pccs_url": settings.url,
        "tls_verified": settings.verify_tls,
        "tee_type": platform.tee_type,
        "fmspc": platform.fmspc,
        "pck_ca": platform.ca,
        "valid_until": iso_utc(info.next_update),
        "documents": [
            {
                "document": item.label,
                "issued": iso_utc(item.issued),
                "next_update": iso_utc(item.next_update),
            }
            for item in info.items
        ],
    }
    # Tell the operator now, not at verification time, if it does not fit the quote.
    try:
        verified = verify_trusted_quote(quote, collateral, allow_simulated=True)
        summary["verifies_now"] = True
        summary["status_now"] = verified.tcb_status
    except QuoteVerificationError as exc:
        summary["verifies_now"] = False
        summary["reason_now"] = str(exc)
    _emit(summary)
    return EXIT_OK


# --- registration ---------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``verify-quote``, ``inspect-cert`` and ``fetch-collateral`` to a parser."""
    verify = subparsers.add_parser(
        "verify-quote",
        help="verify a DCAP quote offline against collateral and print the verdict",
        description="Verify a DCAP quote against collateral (dcap-qvl JSON) without network "
        "access and print one JSON object. Exit 0 only when the quote verifies and its TCB "
        "status is allowed; 1 when rejected; 2 on bad usage or unreadable input.",
    )
    verify.add_argument("quote", metavar="QUOTE", help="quote file (raw bytes or hex text)")
    verify.add_argument(
        "--collateral", metavar="FILE", required=True, help="collateral in dcap-qvl's JSON form"
    )
    verify.add_argument(
        "--at",
        metavar="UNIX_SECONDS",
        type=unix_seconds,
        help="verify as of this time (default: now)",
    )
    verify.add_argument(
        "--allow-outdated",
        "--allow-outdated-tcb",
        dest="allow_outdated",
        action="store_true",
        help="accept TCB status OutOfDate",
    )
    verify.add_argument(
        "--allow-hw-config",
        action="store_true",
        help="accept TCB statuses that need platform configuration",
    )
    verify.add_argument(
        "--allow-sw-hardening",
        action="store_true",
        help="accept TCB statuses that need software hardening",
    )
    verify.add_argument(
        "--allow-simulated",
        action="store_true",
        help="verify simulated quotes under teepsi's simulated root (proves nothing)",
    )
    verify.add_argument(
        "--config",
        metavar="POLICY",
        help="also judge the quote by this policy (dynamic_config.json): sgx_mrs for an "
        "SGX enclave, tdx_mrs for a TDX VM; a bare quote binds no key or role",
    )
    verify.set_defaults(func=_cmd_verify_quote)

    inspect = subparsers.add_parser(
        "inspect-cert",
        help="show what an RA-TLS certificate carries and check its key binding",
        description="Print the extensions, key, key binding and quote measurements of an "
        "RA-TLS certificate (PEM or DER), and whether its quote verifies (with --collateral, "
        "through the same path as a live peer, without a policy). Exit 0 when the quote "
        "binds the key and, with --collateral, verifies; 1 when not; 2 when the input is "
        "unreadable.",
    )
    inspect.add_argument("cert", metavar="CERT", help="certificate file, PEM or DER")
    inspect.add_argument(
        "--collateral",
        metavar="FILE",
        help="collateral (dcap-qvl JSON) to verify the quote with; without it the quote's "
        "signatures are not checked, and the output says so",
    )
    inspect.add_argument(
        "--at",
        metavar="UNIX_SECONDS",
        type=unix_seconds,
        help="verify as of this time (default: now)",
    )
    inspect.add_argument(
        "--allow-simulated",
        action="store_true",
        help="verify simulated quotes under teepsi's simulated root (proves nothing)",
    )
    inspect.set_defaults(func=_cmd_inspect_cert)

    fetch = subparsers.add_parser(
        "fetch-collateral",
        help="fetch collateral for a quote from a PCCS, for offline verification",
        description="Fetch TCB info, QE identity and CRLs for a quote from a PCCS (Intel PCS "
        "API v3/v4) and save them in dcap-qvl's JSON form. Without --pccs-url the URL and "
        f"USE_SECURE_CERT come from {DEFAULT_QCNL_PATH}.",
    )
    fetch.add_argument("quote", metavar="QUOTE", help="quote file (raw bytes or hex text)")
    fetch.add_argument(
        "--pccs-url",
        metavar="URL",
        help="PCCS URL, e.g. https://pccs:8081/sgx/certification/v4/ "
        f"(default: PCCS_URL from {DEFAULT_QCNL_PATH})",
    )
    fetch.add_argument(
        "-o", "--output", metavar="FILE", required=True, help="where to save it ('-': stdout)"
    )
    fetch.add_argument(
        "--insecure-pccs-tls",
        action="store_true",
        help="do not verify the PCCS's TLS certificate (self-signed PCCS; collateral is "
        "Intel-signed either way)",
    )
    fetch.add_argument(
        "--qcnl-config",
        metavar="PATH",
        type=Path,
        help=f"QCNL configuration to read (default {DEFAULT_QCNL_PATH})",
    )
    fetch.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per PCCS request (default 30)"
    )
    fetch.set_defaults(func=_cmd_fetch_collateral)
