"""What a quote says about the enclave or TD that made it: parsed only, nothing verified."""

from __future__ import annotations

import hashlib
from typing import Any

import dcap_qvl

from teepsi.attestation.collateral import CollateralError, quote_platform
from teepsi.attestation.evidence import AttributeFlag, TdAttributeFlag
from teepsi.attestation.quote import (
    QUOTE_VERSION_PREFIXES,
    REPORT_BODY_SIZE,
    TD_REPORT_FIELDS,
    QuoteFormatError,
    ReportBody,
    sgx_report_body_offset,
)
from teepsi.attestation.sim import is_simulated_quote

__all__ = ["QUOTE_VERSION_PREFIXES", "embedded_quote_fields", "quote_fields"]


def _flag_names(flags: int) -> list[str]:
    return [flag.name for flag in AttributeFlag if flags & flag]


def quote_fields(quote: bytes) -> dict[str, Any]:
    """What a quote says about the enclave or TD (parsed only, nothing verified)."""
    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
    except (ValueError, TypeError) as exc:
        raise QuoteFormatError(f"not a DCAP quote: {' '.join(str(exc).split())}") from None
    version = int(parsed.header.version)
    fields: dict[str, Any] = {
        "tee_type": "TDX" if parsed.is_tdx() else "SGX",
        "quote_version": version,
    }
    if parsed.is_sgx():
        offset = sgx_report_body_offset(version)
        try:
            body = ReportBody.from_bytes(quote[offset : offset + REPORT_BODY_SIZE])
        except ValueError:
            raise QuoteFormatError("not a DCAP quote: SGX report body is truncated") from None
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


def embedded_quote_fields(quote: bytes) -> dict[str, Any]:
    """:func:`quote_fields` of a certificate's quote, with what its chain claims and its size.

    Unparsable fields become ``{"error": …}``; ``simulated`` is what the embedded chain
    claims, not what verification found.
    """
    try:
        fields = quote_fields(quote)
    except QuoteFormatError as exc:
        fields = {"error": str(exc)}
    fields["simulated"] = is_simulated_quote(quote)
    fields["quote_size"] = len(quote)
    fields["quote_sha256"] = hashlib.sha256(quote).hexdigest()
    return fields
