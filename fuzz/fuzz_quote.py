#!/usr/bin/env python3
"""Fuzz quote handling before and during verification.

Targets, on every input:

* :func:`teepsi.attestation.quote.parse_quote` (SGX v3 and TDX v4): only
  ``QuoteFormatError`` may escape, and a parsed report body must round-trip;
* :func:`teepsi.attestation.sim.is_simulated_quote`: must never raise and must return a
  bool (the verifier calls it on untrusted bytes to explain refusals);
* :func:`teepsi.attestation.verify.verify_quote` with ``allow_simulated=True``: only
  ``QuoteVerificationError`` may escape. Simulated-looking inputs are checked against
  collateral of the simulated platform (SGX or TDX, by the header's TEE type), the
  others against the collateral of the real Intel vector of their TEE type
  (``tests/vectors/sgx-dcap/sgx_quote`` or ``tdx_quote``) at its pinned time, so
  mutations of every seed get past the collateral checks and into the quote's own.

    python fuzz/fuzz_quote.py -max_total_time=3600 fuzz/work/quote fuzz/corpus/quote

See docs/fuzzing.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris
from _support import amplifying_mutator, guard, with_defaults

with atheris.instrument_imports(include=["teepsi"]):
    from teepsi.attestation.quote import (
        HEADER_SIZE,
        TEE_TYPE_TDX,
        QuoteFormatError,
        ReportBody,
        parse_quote,
    )
    from teepsi.attestation.sim import (
        SimPlatform,
        SimPlatformConfig,
        SimTdxPlatform,
        is_simulated_quote,
    )
    from teepsi.attestation.trust import verify_trusted_quote
    from teepsi.attestation.verify import QuoteVerificationError

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "sgx-dcap"
INTEL_COLLATERAL = (VECTORS / "sgx_quote_collateral.json").read_text()
INTEL_TDX_COLLATERAL = (VECTORS / "tdx_quote_collateral.json").read_text()
INTEL_NOW = 1750330631  # when the vector's collateral was valid (see its ORIGIN.md)

# Fixed dates, so that a crash reproduces whenever it is replayed.
SIM_ISSUED = 1767225600  # 2026-01-01
SIM_NOW = SIM_ISSUED + 3600
SIM_CONFIG = SimPlatformConfig(collateral_issued_at=SIM_ISSUED, collateral_validity_seconds=86400)
SIM_COLLATERAL = SimPlatform(SIM_CONFIG).collateral_json()
SIM_TDX_COLLATERAL = SimTdxPlatform(SIM_CONFIG).collateral_json()

# verify_quote logs "SIMULATED ATTESTATION" for every accepted simulated quote.
logging.disable(logging.CRITICAL)


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris expects)
    try:
        parsed = parse_quote(data)
    except QuoteFormatError:
        parsed = None
    else:
        assert parsed.header == data[:HEADER_SIZE]
        body = parsed.report_body
        assert type(body).from_bytes(body.to_bytes()) == body, "report body does not round-trip"
        # Not checked: parsed.signed_bytes == data[:HEADER_SIZE + REPORT_BODY_SIZE]. It is
        # false when reserved report-body bytes are non-zero (ReportBody drops them); see
        # tests/unit/test_fuzz_regressions.py and docs/fuzzing.md.

    simulated = is_simulated_quote(data)  # any exception here is a finding
    assert simulated is True or simulated is False
    assert parsed is not None or not simulated, "unparseable quote reported as simulated"

    tdx = len(data) >= 8 and int.from_bytes(data[4:8], "little") == TEE_TYPE_TDX
    if simulated:
        collateral, now = (SIM_TDX_COLLATERAL if tdx else SIM_COLLATERAL), SIM_NOW
    else:
        collateral, now = (INTEL_TDX_COLLATERAL if tdx else INTEL_COLLATERAL), INTEL_NOW
    try:
        verified = verify_trusted_quote(data, collateral, allow_simulated=True, now=now)
    except QuoteVerificationError as exc:
        assert "\n" not in str(exc), f"QuoteVerificationError is not one line: {exc!r}"
        return
    # Verified: it must agree with the layout parser about what was attested.
    assert parsed is not None, "dcap-qvl verified a quote teepsi cannot parse"
    assert verified.simulated == simulated
    body = parsed.report_body
    assert verified.report_data == body.report_data
    if isinstance(body, ReportBody):
        assert verified.tee_type == "SGX" and verified.identity is not None
        assert verified.identity.mr_enclave == body.mr_enclave
        assert verified.identity.mr_signer == body.mr_signer
    else:
        assert verified.tee_type == "TDX" and verified.td is not None
        assert verified.td.mr_td == body.mr_td and verified.td.rt_mr0 == body.rt_mr0


def main() -> None:
    argv = with_defaults(sys.argv, "quote", max_len=16384)
    atheris.Setup(argv, guard(TestOneInput), custom_mutator=amplifying_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
