"""Which roots a verifier trusts, and verifying a quote under them.

Intel's root always; the simulated root only for a verifier that allows simulated
evidence, and then only for quotes whose embedded chain ends in it. This is the one
place that hands the simulated root to :func:`teepsi.attestation.verify.verify_quote`.
"""

from __future__ import annotations

import logging

from teepsi.attestation.collateral.documents import describe_expired_at
from teepsi.attestation.sim import SIM_ROOT_CA_DER, is_simulated_quote
from teepsi.attestation.verify import (
    SIMULATED_ROOT_NAME,
    SIMULATED_WARNING,
    QuoteRejected,
    SimulatedEvidenceRefused,
    TrustRoot,
    VerifiedQuote,
    checked_verification_time,
    intel_root,
    verify_quote,
)

log = logging.getLogger(__name__)

#: The simulated root: trusting it means trusting forgeries.
SIMULATED_ROOT = TrustRoot(SIMULATED_ROOT_NAME, SIM_ROOT_CA_DER, simulated=True)


def root_for(quote: bytes, *, allow_simulated: bool) -> TrustRoot:
    """The root ``quote`` is judged under: the simulated one only when allowed and named."""
    if allow_simulated and is_simulated_quote(quote):
        return SIMULATED_ROOT
    return intel_root()


def verify_trusted_quote(
    quote: bytes,
    collateral_json: str | None,
    *,
    allow_simulated: bool = False,
    now: int | None = None,
) -> VerifiedQuote:
    """:func:`verify_quote` under :func:`root_for`'s root, with reasons an operator can act on.

    A refusal names expired collateral documents and their dates; refused simulated
    evidence raises :class:`SimulatedEvidenceRefused` (the caller names its remedy).
    """
    root = root_for(quote, allow_simulated=allow_simulated)
    try:
        verified = verify_quote(quote, collateral_json, root=root, now=now)
    except QuoteRejected as exc:
        if not allow_simulated and is_simulated_quote(quote):
            raise SimulatedEvidenceRefused(
                "evidence is SIMULATED (not hardware-backed) and does not verify under Intel's root"
            ) from None
        assert collateral_json  # verify_quote refuses a quote without collateral first
        expired = describe_expired_at(collateral_json, checked_verification_time(now))
        raise QuoteRejected(f"{exc}{expired}") from None
    if root.simulated:
        log.warning("%s (peer quote accepted under the simulated root)", SIMULATED_WARNING)
    return verified
