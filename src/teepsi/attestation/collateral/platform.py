"""Which collateral a quote needs: its TEE, its platform's FMSPC and its PCK CA."""

from __future__ import annotations

import re
from dataclasses import dataclass

import dcap_qvl

from teepsi.attestation.collateral.errors import CollateralError, one_line


@dataclass(frozen=True)
class QuotePlatform:
    """Which collateral a quote needs: its TEE, its platform's FMSPC and its PCK CA."""

    tee_type: str  # "SGX" or "TDX"
    fmspc: str  # 12 upper-case hex digits
    ca: str  # "processor" or "platform"


def quote_platform(quote: bytes) -> QuotePlatform:
    """Read TEE type, FMSPC and PCK CA from the PCK certificate embedded in ``quote``."""
    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
    except (ValueError, TypeError) as exc:
        raise CollateralError(f"quote cannot be parsed: {one_line(exc)}") from None
    try:
        fmspc = str(parsed.fmspc()).upper()
        ca = str(parsed.ca())
    except (ValueError, TypeError) as exc:
        raise CollateralError(
            "quote does not carry its PCK certificate chain (FMSPC and CA unknown): "
            f"{one_line(exc)}"
        ) from None
    if not re.fullmatch(r"[0-9A-F]{12}", fmspc) or ca not in ("processor", "platform"):
        raise CollateralError(f"quote has an unexpected FMSPC {fmspc!r} or CA {ca!r}")
    return QuotePlatform("TDX" if parsed.is_tdx() else "SGX", fmspc, ca)
