"""Deciding whether a peer is trusted: evidence, key binding, quote, policy.

Both directions use this: a data provider checking the server's RA-TLS certificate,
and the server checking a data provider's challenge evidence.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import datetime

from teepsi.attestation.collateral import CollateralFreshness
from teepsi.attestation.evidence import Role
from teepsi.attestation.policy import MeasurementEntry, Policy, PolicyViolation
from teepsi.attestation.ratls import ExtractedEvidence, RaTlsError, extract_evidence
from teepsi.attestation.verify import QuoteVerificationError, VerifiedQuote, verify_quote

log = logging.getLogger(__name__)


class PeerRejected(Exception):
    """The peer failed attestation or policy; the message is one line for users."""


@dataclass(frozen=True)
class TrustedPeer:
    verified: VerifiedQuote
    matched: MeasurementEntry

    def describe(self) -> str:
        ident = self.verified.identity
        assert ident is not None
        sim = " (SIMULATED)" if self.verified.simulated else ""
        return (
            f"MRENCLAVE {ident.mr_enclave.hex()} ISV_PROD_ID {ident.isv_prod_id} "
            f"ISV_SVN {ident.isv_svn} TCB {self.verified.tcb_status}{sim}"
        )


class PeerVerifier:
    """Applies one policy to peers' evidence; never uses the network."""

    def __init__(
        self,
        policy: Policy,
        *,
        allow_simulated: bool = False,
        freshness: CollateralFreshness | None = None,
    ) -> None:
        self.policy = policy
        self.allow_simulated = allow_simulated
        self.freshness = freshness if freshness is not None else CollateralFreshness()

    def _check(
        self, quote: bytes, collateral_json: str | None, what: str, role: Role | None
    ) -> TrustedPeer:
        try:
            verified = verify_quote(
                quote,
                collateral_json,
                allow_simulated=self.allow_simulated,
                freshness=self.freshness,
            )
        except QuoteVerificationError as exc:
            raise PeerRejected(f"{what}: {exc}") from None
        if verified.identity is None:
            raise PeerRejected(
                f"{what}: evidence is a {verified.tee_type} quote, not an SGX enclave"
            )
        if role is not None and verified.identity.isv_prod_id != role:
            # Roles are distinct enclave identities: a data provider must never pass
            # as the server (or the reverse), even under a policy that lists both.
            raise PeerRejected(
                f"{what}: enclave has ISV_PROD_ID {verified.identity.isv_prod_id}, which is not "
                f"the {role.name.lower().replace('_', ' ')} role ({int(role)})"
            )
        try:
            matched = self.policy.check(verified.identity, verified.tcb_status)
        except PolicyViolation as exc:
            raise PeerRejected(f"{what}: {exc}") from None
        return TrustedPeer(verified=verified, matched=matched)

    def verify_certificate(
        self,
        certificate_der: bytes,
        collateral_json: str | None,
        *,
        at: datetime,
        what: str = "server",
        role: Role | None = Role.SERVER,
    ) -> tuple[TrustedPeer, ExtractedEvidence]:
        """Verify an RA-TLS certificate: its evidence, key binding, validity at ``at``,
        quote and policy."""
        try:
            evidence = extract_evidence(certificate_der, at=at)
        except RaTlsError as exc:
            raise PeerRejected(f"{what} certificate: {exc}") from None
        return self._check(evidence.quote, collateral_json, what, role), evidence

    def verify_bound_quote(
        self,
        quote: bytes,
        collateral_json: str | None,
        expected_report_data: bytes,
        *,
        what: str,
        role: Role | None = Role.DATA_PROVIDER,
    ) -> TrustedPeer:
        """Verify a quote whose report_data must equal ``expected_report_data`` exactly."""
        peer = self._check(quote, collateral_json, what, role)
        if not hmac.compare_digest(peer.verified.report_data, expected_report_data):
            raise PeerRejected(
                f"{what}: quote report_data does not bind this join (nonce, server, job, "
                "party and key)"
            )
        return peer
