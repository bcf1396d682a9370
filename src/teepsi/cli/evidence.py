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
import base64
import binascii
import datetime as dt
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import cbor2
import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from teepsi.attestation.collateral import (
    DEFAULT_QCNL_PATH,
    CollateralError,
    describe_collateral,
    fetch_collateral,
    iso_utc,
    load_collateral_file,
    pccs_settings,
    quote_platform,
)
from teepsi.attestation.evidence import AttributeFlag, Role, TdAttributeFlag
from teepsi.attestation.peer import SIMULATED_REMEDY, PeerRejected, PeerVerifier
from teepsi.attestation.policy import Policy, PolicyError, PolicyViolation, TcbAllowances
from teepsi.attestation.quote import REPORT_BODY_SIZE, TD_REPORT_FIELDS, ReportBody
from teepsi.attestation.ratls import (
    LEGACY_QUOTE_OID,
    LEGACY_QUOTE_OID_GRAMINE,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    TEE_QUOTE_CBOR_TAG,
    RaTlsError,
    extract_evidence,
)
from teepsi.attestation.sim import is_simulated_quote
from teepsi.attestation.verify import QuoteVerificationError, SimulatedEvidenceRefused, verify_quote
from teepsi.privatefile import write_private

__all__ = ["quote_fields", "register", "unix_seconds"]

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2

_HEADER_SIZE = 48
#: The first two bytes (u16 version, little-endian) of DCAP quotes v3, v4 and v5.
_QUOTE_VERSIONS = (b"\x03\x00", b"\x04\x00", b"\x05\x00")
# Quote v5 puts a body descriptor (u16 type, u32 size) between header and body.
_V5_BODY_DESCRIPTOR_SIZE = 6

# TCB status -> the flags of this command that accept it (mirrors the policy's needs).
_FLAGS_FOR_STATUS = {
    "SWHardeningNeeded": ("--allow-sw-hardening",),
    "ConfigurationNeeded": ("--allow-hw-config",),
    "ConfigurationAndSWHardeningNeeded": ("--allow-hw-config", "--allow-sw-hardening"),
    "OutOfDate": ("--allow-outdated",),
    "OutOfDateConfigurationNeeded": ("--allow-outdated", "--allow-hw-config"),
}

_EXTENSION_NAMES = {
    TCG_DICE_TAGGED_EVIDENCE_OID.dotted_string: "TCG DICE tagged evidence (RA-TLS)",
    LEGACY_QUOTE_OID_GRAMINE.dotted_string: "SGX quote, Gramine legacy RA-TLS (OID as Gramine "
    "writes it)",
    LEGACY_QUOTE_OID.dotted_string: "SGX quote, legacy RA-TLS",
    "2.5.29.19": "basic constraints",
    "2.5.29.14": "subject key identifier",
    "2.5.29.35": "authority key identifier",
    "2.5.29.15": "key usage",
    "2.5.29.37": "extended key usage",
    "2.5.29.17": "subject alternative name",
}

_SIGNATURE_NAMES = {
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.3.101.112": "Ed25519",
}


class _InputError(Exception):
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
    if data[:2] in _QUOTE_VERSIONS:
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


def _flag_names(flags: int) -> list[str]:
    return [flag.name for flag in AttributeFlag if flags & flag]


def quote_fields(quote: bytes) -> dict[str, Any]:
    """What a quote says about the enclave or TD (parsed only, nothing verified)."""
    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
    except (ValueError, TypeError) as exc:
        raise _InputError(f"not a DCAP quote: {' '.join(str(exc).split())}") from None
    version = int(parsed.header.version)
    fields: dict[str, Any] = {
        "tee_type": "TDX" if parsed.is_tdx() else "SGX",
        "quote_version": version,
    }
    if parsed.is_sgx():
        offset = _HEADER_SIZE + (_V5_BODY_DESCRIPTOR_SIZE if version >= 5 else 0)
        try:
            body = ReportBody.from_bytes(quote[offset : offset + REPORT_BODY_SIZE])
        except ValueError:
            raise _InputError("not a DCAP quote: SGX report body is truncated") from None
        flags = int.from_bytes(body.attributes[:8], "little")
        fields.update(
            mr_enclave=body.mr_enclave.hex(),
            mr_signer=body.mr_signer.hex(),
            isv_prod_id=body.isv_prod_id,
            isv_svn=body.isv_svn,
            attributes=body.attributes.hex(),
            attribute_flags=_flag_names(flags),
            debug=bool(flags & AttributeFlag.DEBUG),
            report_data=body.report_data.hex(),
        )
    else:
        report = parsed.report
        fields.update(
            mr_enclave=None,
            mr_signer=None,
            isv_prod_id=None,
            isv_svn=None,
            attributes=None,
            **{name: bytes(getattr(report, name)).hex() for name, _ in TD_REPORT_FIELDS},
        )
        td_flags = int.from_bytes(bytes(report.td_attributes), "little")
        fields.update(
            td_attribute_flags=[flag.name for flag in TdAttributeFlag if td_flags & flag],
            debug=bool(td_flags & TdAttributeFlag.DEBUG),
        )
    try:
        platform = quote_platform(quote)
        fields.update(fmspc=platform.fmspc, pck_ca=platform.ca)
    except CollateralError:
        fields.update(fmspc=None, pck_ca=None)
    return fields


# --- verify-quote ---------------------------------------------------------------------


def unix_seconds(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", text.strip()):
        raise argparse.ArgumentTypeError(
            f"expected UNIX seconds (a non-negative integer): {text!r}"
        )
    return int(text.strip())


def _not_allowed(status: str, exc: PolicyViolation) -> str:
    flags = _FLAGS_FOR_STATUS.get(status)
    if not flags:
        return str(exc)  # Revoked or unknown: no flag accepts it
    return f"TCB status {status} is not allowed (pass {' and '.join(flags)} to accept it)"


def _cmd_verify_quote(args: argparse.Namespace) -> int:
    command = "verify-quote"
    try:
        quote = _read_quote(args.quote)
        fields = quote_fields(quote)
        collateral = load_collateral_file(args.collateral)
    except (_InputError, CollateralError) as exc:
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
        verified = verify_quote(quote, collateral, allow_simulated=args.allow_simulated, now=at)
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
            peer = PeerVerifier(policy, allow_simulated=args.allow_simulated).verify_unbound_quote(
                quote, collateral, at=at
            )
        except PeerRejected as exc:
            out["reason"] = str(exc)
            _emit(out)
            return EXIT_REJECTED
        out["matched"] = peer.matched.name if peer.matched is not None else None
    out["accepted"] = True
    _emit(out)
    return EXIT_OK


# --- inspect-cert ---------------------------------------------------------------------


def _der_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """One DER TLV at ``pos``: (tag, content start, end)."""
    if pos + 2 > len(data):
        raise _InputError("not a DER certificate (truncated)")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise _InputError("not a DER certificate (bad length)")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise _InputError("not a DER certificate (truncated)")
    return tag, pos, pos + length


def _der_children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, content, stop = _der_tlv(data, pos)
        out.append((tag, pos, content, stop))
        pos = stop
    return out


def _der_encode(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


_ECDSA_OID_PREFIX = bytes.fromhex("06082a8648ce3d0403")  # ecdsa-with-SHA256/384/512


def _drop_ecdsa_null(der: bytes, start: int, end: int) -> bytes:
    """An AlgorithmIdentifier without the NULL parameters mbedTLS < 3.5 wrote for ECDSA."""
    element = der[start:end]
    tag, content, stop = _der_tlv(der, start)
    inner = der[content:stop]
    if tag == 0x30 and inner.startswith(_ECDSA_OID_PREFIX) and inner.endswith(b"\x05\x00"):
        return _der_encode(0x30, inner[:-2])
    return element


def _split_certificate(der: bytes) -> tuple[bytes, bytes, bytes]:
    """(TBSCertificate, signatureAlgorithm, signature BIT STRING content) as encoded."""
    tag, start, end = _der_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise _InputError("not a DER X.509 certificate")
    parts = _der_children(der, start, end)
    if [p[0] for p in parts] != [0x30, 0x30, 0x03]:
        raise _InputError("not a DER X.509 certificate")
    (_, tbs_at, _, tbs_end), (_, alg_at, _, alg_end), (_, _, sig_start, sig_end) = parts
    return der[tbs_at:tbs_end], der[alg_at:alg_end], der[sig_start:sig_end]


def _load_certificate(der: bytes) -> tuple[x509.Certificate, bool]:
    """Parse with ``cryptography``; re-encode Gramine/mbedTLS < 3.5 certificates if needed.

    Returns the certificate and whether it had to be re-encoded. Only the two
    signature AlgorithmIdentifiers change; everything shown comes from the original.
    """
    try:
        return x509.load_der_x509_certificate(der), False
    except ValueError:
        pass
    tbs, _, _ = _split_certificate(der)
    _, tbs_start, tbs_end = _der_tlv(tbs, 0)
    fields = _der_children(tbs, tbs_start, tbs_end)
    index = 2 if fields and fields[0][0] == 0xA0 else 1  # [version] serial signature …
    if len(fields) <= index:
        raise _InputError("not a DER X.509 certificate")
    rebuilt = b"".join(
        _drop_ecdsa_null(tbs, at, stop) if i == index else tbs[at:stop]
        for i, (_, at, _, stop) in enumerate(fields)
    )
    _, cert_start, cert_end = _der_tlv(der, 0)
    outer = _der_children(der, cert_start, cert_end)
    fixed = _der_encode(
        0x30,
        _der_encode(0x30, rebuilt)
        + _drop_ecdsa_null(der, outer[1][1], outer[1][3])
        + der[outer[2][1] : outer[2][3]],
    )
    try:
        return x509.load_der_x509_certificate(fixed), True
    except ValueError as exc:
        raise _InputError(f"not a usable X.509 certificate: {exc}") from None


def _certificate_bytes(data: bytes) -> bytes:
    if data.startswith(b"\x30"):
        return data
    match = re.search(
        rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data, re.DOTALL
    )
    if match is None:
        raise _InputError("neither a DER certificate nor PEM with a CERTIFICATE block")
    try:
        return base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except binascii.Error:
        raise _InputError("PEM certificate block is not valid base64") from None


def _key_type(cert: x509.Certificate) -> str:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown (cannot be parsed)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} ({key.curve.key_size} bits)"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def _self_signature(cert: x509.Certificate, der: bytes) -> str:
    """Check the signature over the original TBS bytes with the certificate's own key."""
    tbs, _, signature = _split_certificate(der)
    try:
        key = cert.public_key()
        algorithm = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return "not checked (unsupported key or algorithm)"
    if not isinstance(key, ec.EllipticCurvePublicKey) or algorithm is None:
        return "not checked (not an ECDSA certificate)"
    if not signature or signature[0] != 0:
        return "invalid"
    try:
        key.verify(signature[1:], tbs, ec.ECDSA(algorithm))
    except InvalidSignature:
        return "invalid"
    return "valid"


def _quote_from_extensions(cert: x509.Certificate) -> tuple[bytes | None, str | None]:
    """The quote an RA-TLS verifier would look at, without checking the binding."""
    values = {ext.oid.dotted_string: ext.value for ext in cert.extensions}

    def raw(oid: x509.ObjectIdentifier) -> bytes | None:
        value = values.get(oid.dotted_string)
        return value.value if isinstance(value, x509.UnrecognizedExtension) else None

    tcg = raw(TCG_DICE_TAGGED_EVIDENCE_OID)
    if tcg is not None:
        try:
            decoded = cbor2.loads(tcg)
        except Exception:  # cbor2 raises many types on garbage; none is useful here
            return None, "tcg-dice"
        if (
            isinstance(decoded, cbor2.CBORTag)
            and decoded.tag == TEE_QUOTE_CBOR_TAG
            and isinstance(decoded.value, list | tuple)
            and decoded.value
            and isinstance(decoded.value[0], bytes)
        ):
            return bytes(decoded.value[0]), "tcg-dice"
        return None, "tcg-dice"
    for oid in (LEGACY_QUOTE_OID_GRAMINE, LEGACY_QUOTE_OID):
        quote = raw(oid)
        if quote is not None:
            return quote, "legacy"
    return None, None


def _cmd_inspect_cert(args: argparse.Namespace) -> int:
    command = "inspect-cert"
    try:
        data = _read(args.cert, "certificate")
        der = _certificate_bytes(data)
        cert, reencoded = _load_certificate(der)
        extensions = list(cert.extensions)
    except (_InputError, ValueError) as exc:
        _fail(command, f"{args.cert}: {exc}")
        return EXIT_USAGE
    try:
        collateral = load_collateral_file(args.collateral) if args.collateral else None
    except CollateralError as exc:
        _fail(command, exc)
        return EXIT_USAGE

    out: dict[str, Any] = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial_number": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key_type": _key_type(cert),
        "signature_algorithm": _SIGNATURE_NAMES.get(
            cert.signature_algorithm_oid.dotted_string, cert.signature_algorithm_oid.dotted_string
        ),
        "self_signature": _self_signature(cert, der),
        "certificate_sha256": hashlib.sha256(der).hexdigest(),
        "extensions": [
            {
                "oid": ext.oid.dotted_string,
                "name": _EXTENSION_NAMES.get(ext.oid.dotted_string, "unknown"),
                "critical": ext.critical,
            }
            for ext in extensions
        ],
    }
    if reencoded:
        out["note"] = (
            "signature AlgorithmIdentifier carries explicit NULL parameters (Gramine built "
            "with mbedTLS < 3.5); accepted, as Gramine's verifier accepts it"
        )
    binding: dict[str, Any]
    quote: bytes | None
    try:
        when = int(time.time()) if args.at is None else int(args.at)
        evidence = extract_evidence(der, at=dt.datetime.fromtimestamp(when, dt.UTC))
    except RaTlsError as exc:
        quote, source = _quote_from_extensions(cert)
        binding = {"holds": False, "evidence": source, "reason": str(exc)}
    else:
        quote = evidence.quote
        binding = {
            "holds": True,
            "evidence": evidence.source,
            "public_key_sha256": evidence.public_key_sha256.hex(),
        }
    out["key_binding"] = binding
    if quote is not None:
        try:
            quote_info: dict[str, Any] = quote_fields(quote)
        except _InputError as exc:
            quote_info = {"error": str(exc)}
        # What the embedded chain claims; quote_verification below says what holds.
        quote_info["simulated"] = is_simulated_quote(quote)
        quote_info["quote_size"] = len(quote)
        quote_info["quote_sha256"] = hashlib.sha256(quote).hexdigest()
        out["quote"] = quote_info
    else:
        out["quote"] = None
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
    verifier = PeerVerifier(None, allow_simulated=args.allow_simulated)
    try:
        peer, _ = verifier.verify_certificate(
            der, collateral, what="certificate", role=None, at=at, record=False
        )
    except PeerRejected as exc:
        result["reason"] = f"not verified: {exc}"
        result["verified_at"] = iso_utc(at)
        return result
    verified = peer.verified
    if peer.role is not None:
        role_name = peer.role.name.lower()
    else:
        assert verified.identity is not None
        prod_id = verified.identity.isv_prod_id
        roles = {int(role): role.name.lower() for role in Role}
        role_name = roles.get(prod_id, f"none (ISV_PROD_ID {prod_id})")
    result.update(
        tee=verified.tee_type,
        verified=True,
        root=verified.root,
        tcb_status=verified.tcb_status,
        advisory_ids=list(verified.advisory_ids),
        verified_at=iso_utc(at),
        role=role_name,
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
    except (_InputError, CollateralError) as exc:
        _fail(command, exc)
        return EXIT_USAGE
    try:
        collateral = fetch_collateral(
            quote, settings.url, verify_tls=settings.verify_tls, timeout=args.timeout
        )
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
        verified = verify_quote(quote, collateral, allow_simulated=True)
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
