"""Deciding whether a peer is trusted: the one verification path for all evidence.

Every place that judges evidence goes through :class:`PeerVerifier`: a data provider
checking the server's RA-TLS certificate, the server checking a data provider's
challenge evidence, ``teepsi verify-receipt`` checking the certificate that signed a
receipt (as of the receipt's issue time) and ``teepsi inspect-cert``. The stages, in
order, cheapest first:

1. binding: the quote's report_data binds the certificate's key (RA-TLS) or equals
   the expected value exactly (a join), checked on the quote's bytes before anything
   expensive, so a mismatch costs nothing;
2. quote: signature, QE report, attestation key and PCK chain to Intel's root (or,
   only when allowed, the simulated root), against collateral, at a given time
   (:func:`teepsi.attestation.verify.verify_quote`, dcap-qvl);
3. role: the enclave's ISV_PROD_ID (server 1, data provider 2);
4. policy: measurements, attributes, TCB status and the collateral rules (when a
   policy is given; offline tools may verify without one and say so);
5. rollback: only now, with the peer fully accepted, its collateral is checked against
   and recorded in the per-platform rollback state (:class:`CollateralFreshness`).
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from teepsi.attestation.collateral import CollateralError, CollateralFreshness, describe_collateral
from teepsi.attestation.evidence import Role
from teepsi.attestation.policy import MeasurementEntry, Policy, PolicyViolation, TcbStatusRefused
from teepsi.attestation.ratls import (
    ExtractedEvidence,
    RaTlsError,
    extract_evidence,
    quote_report_data,
)
from teepsi.attestation.verify import (
    QuoteVerificationError,
    VerifiedQuote,
    checked_verification_time,
    verify_quote,
)

log = logging.getLogger(__name__)


class RejectedBy(Enum):
    """Which check refused a peer: its evidence, the policy, or its platform's TCB."""

    ATTESTATION = "attestation"
    POLICY = "policy"
    TCB_STATUS = "tcb_status"


class PeerRejected(Exception):
    """The peer failed attestation or policy; the message is one line for users."""

    def __init__(self, message: str, by: RejectedBy = RejectedBy.ATTESTATION) -> None:
        super().__init__(message)
        self.by = by


@dataclass(frozen=True)
class TrustedPeer:
    verified: VerifiedQuote
    #: The policy entry the peer matched; None when no policy was applied.
    matched: MeasurementEntry | None

    def describe(self) -> str:
        ident = self.verified.identity
        assert ident is not None
        sim = " (SIMULATED)" if self.verified.simulated else ""
        return (
            f"MRENCLAVE {ident.mr_enclave.hex()} ISV_PROD_ID {ident.isv_prod_id} "
            f"ISV_SVN {ident.isv_svn} TCB {self.verified.tcb_status}{sim}"
        )


_NOT_BOUND = "quote report_data does not bind this join (nonce, server, job, party and key)"


def _role_name(role: Role) -> str:
    return role.name.lower().replace("_", " ")


class PeerVerifier:
    """Applies one policy to peers' evidence; never uses the network.

    ``policy`` None verifies everything but measurements, attributes, TCB status and
    collateral rules: for offline tools, which must say so. ``freshness`` None keeps
    the rollback state in memory for this verifier's life.
    """

    def __init__(
        self,
        policy: Policy | None,
        *,
        allow_simulated: bool = False,
        freshness: CollateralFreshness | None = None,
    ) -> None:
        self.policy = policy
        self.allow_simulated = allow_simulated
        self.freshness = freshness if freshness is not None else CollateralFreshness()

    def _check(
        self,
        quote: bytes,
        collateral_json: str | None,
        what: str,
        role: Role | None,
        at: int | None,
        record: bool,
        expected_report_data: bytes | None = None,
    ) -> TrustedPeer:
        when = int(time.time()) if at is None else at
        try:
            verified = verify_quote(
                quote, collateral_json, allow_simulated=self.allow_simulated, now=when
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
                f"the {_role_name(role)} role ({int(role)})"
            )
        if expected_report_data is not None and not hmac.compare_digest(
            verified.report_data, expected_report_data
        ):
            # The signed value decides; the byte check before was an early exit.
            raise PeerRejected(f"{what}: {_NOT_BOUND}")
        assert collateral_json  # verify_quote refuses a quote without collateral
        matched: MeasurementEntry | None = None
        try:
            info = describe_collateral(collateral_json)
            if self.policy is not None:
                matched = self.policy.check(verified.identity, verified.tcb_status)
                self.policy.check_collateral(info, when)
        except TcbStatusRefused as exc:
            raise PeerRejected(f"{what}: {exc}", RejectedBy.TCB_STATUS) from None
        except (PolicyViolation, CollateralError) as exc:
            raise PeerRejected(f"{what}: {exc}", RejectedBy.POLICY) from None
        if record:
            if not verified.ppid:
                raise PeerRejected(f"{what}: the verified quote names no platform (PPID)")
            try:
                # Last: only a fully accepted peer moves its platform's rollback state.
                self.freshness.record(info, source=f"ppid:{verified.ppid}")
            except CollateralError as exc:
                raise PeerRejected(f"{what}: {exc}") from None
        return TrustedPeer(verified=verified, matched=matched)

    def verify_certificate(
        self,
        certificate_der: bytes,
        collateral_json: str | None,
        *,
        what: str = "server",
        role: Role | None = Role.SERVER,
        at: int | None = None,
        record: bool = True,
    ) -> tuple[TrustedPeer, ExtractedEvidence]:
        """Verify an RA-TLS certificate: key binding, validity, quote, role, policy, rollback.

        ``at`` (UNIX seconds) verifies as of that time, the certificate's validity period
        included (default now); ``record=False`` leaves the rollback state alone (offline
        checks of old evidence).
        """
        try:
            when = checked_verification_time(at)
        except QuoteVerificationError as exc:
            raise PeerRejected(f"{what}: {exc}") from None
        try:
            # Binding first: it reads the quote's bytes only.
            evidence = extract_evidence(certificate_der, at=datetime.fromtimestamp(when, tz=UTC))
        except RaTlsError as exc:
            raise PeerRejected(f"{what} certificate: {exc}") from None
        peer = self._check(evidence.quote, collateral_json, what, role, when, record)
        return peer, evidence

    def verify_bound_quote(
        self,
        quote: bytes,
        collateral_json: str | None,
        expected_report_data: bytes,
        *,
        what: str,
        role: Role | None = Role.DATA_PROVIDER,
        at: int | None = None,
        record: bool = True,
    ) -> TrustedPeer:
        """Verify a quote whose report_data must equal ``expected_report_data`` exactly."""
        try:
            claimed = quote_report_data(quote)
        except RaTlsError as exc:
            raise PeerRejected(f"{what}: {exc}") from None
        # The cheap check before the expensive one: a replayed or foreign quote is
        # refused without running dcap-qvl.
        if not hmac.compare_digest(claimed, expected_report_data):
            raise PeerRejected(f"{what}: {_NOT_BOUND}")
        return self._check(quote, collateral_json, what, role, at, record, expected_report_data)
