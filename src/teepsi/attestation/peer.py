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
   (:func:`teepsi.attestation.trust.verify_trusted_quote`, dcap-qvl);
3. role: an SGX enclave's ISV_PROD_ID (server 1, data provider 2); a TDX VM's role
   binding in report_data (:func:`teepsi.attestation.evidence.tdx_report_data`), since
   one VM image may serve both roles;
4. policy: measurements, attributes, TCB status and the collateral rules (when a
   policy is given; offline tools may verify without one and say so): ``sgx_mrs`` for
   enclaves, ``tdx_mrs`` for TDs;
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
from teepsi.attestation.evidence import REPORT_DATA_SIZE, Role, tdx_report_data
from teepsi.attestation.policy import (
    MeasurementEntry,
    Policy,
    PolicyViolation,
    TcbStatusRefused,
    TdxEntry,
)
from teepsi.attestation.quote import is_tdx_quote
from teepsi.attestation.ratls import (
    ExtractedEvidence,
    RaTlsError,
    extract_evidence,
    quote_report_data,
)
from teepsi.attestation.trust import verify_trusted_quote
from teepsi.attestation.verify import (
    QuoteVerificationError,
    SimulatedEvidenceRefused,
    VerifiedQuote,
    checked_verification_time,
)
from teepsi.errors import TeepsiError

log = logging.getLogger(__name__)


#: What a verifier says about refused simulated evidence unless its caller, who knows
#: the switch that allows it (a command-line flag, a config key), says better.
SIMULATED_REMEDY = "allow simulated evidence to accept it (test runs only)"


class RejectedBy(Enum):
    """Which check refused a peer: its evidence, the policy, or its platform's TCB."""

    ATTESTATION = "attestation"
    POLICY = "policy"
    TCB_STATUS = "tcb_status"


class PeerRejected(TeepsiError):
    """The peer failed attestation or policy; the message is one line for users."""

    def __init__(self, message: str, by: RejectedBy = RejectedBy.ATTESTATION) -> None:
        super().__init__(message)
        self.by = by


@dataclass(frozen=True)
class TrustedPeer:
    verified: VerifiedQuote
    #: The policy entry the peer matched; None when no policy was applied.
    matched: MeasurementEntry | TdxEntry | None
    #: The role the evidence proves (ISV_PROD_ID or a TD's role binding); None when
    #: an SGX enclave was checked without a role.
    role: Role | None = None

    def role_name(self) -> str:
        """The proven role in lower case; for an SGX enclave checked without a role, the
        role its ISV_PROD_ID names, or ``none (ISV_PROD_ID n)``."""
        if self.role is not None:
            return self.role.name.lower()
        assert self.verified.identity is not None
        prod_id = self.verified.identity.isv_prod_id
        roles = {int(role): role.name.lower() for role in Role}
        return roles.get(prod_id, f"none (ISV_PROD_ID {prod_id})")

    def canonical_line(self) -> str:
        """The peer in one canonical line (measurements, role, TCB): for logs."""
        sim = " (SIMULATED)" if self.verified.simulated else ""
        td = self.verified.td
        if td is not None:
            role = f" role {_role_name(self.role)}" if self.role is not None else ""
            return (
                f"TDX MRTD {td.mr_td.hex()} MRSEAM {td.mr_seam.hex()}{role} "
                f"TCB {self.verified.tcb_status}{sim}"
            )
        ident = self.verified.identity
        assert ident is not None
        return (
            f"MRENCLAVE {ident.mr_enclave.hex()} ISV_PROD_ID {ident.isv_prod_id} "
            f"ISV_SVN {ident.isv_svn} TCB {self.verified.tcb_status}{sim}"
        )


_NOT_BOUND = "quote report_data does not bind this join (nonce, server, job, party and key)"


def _role_name(role: Role) -> str:
    return role.name.lower().replace("_", " ")


def _tdx_role(report_data: bytes, requested: bytes, role: Role | None) -> Role | None:
    """The role (``role``, or any when None) whose TDX binding of ``requested`` is
    ``report_data``; None when none is."""
    for candidate in (role,) if role is not None else tuple(Role):
        if hmac.compare_digest(report_data, tdx_report_data(candidate, requested)):
            return candidate
    return None


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
        simulated_remedy: str = SIMULATED_REMEDY,
    ) -> None:
        self.policy = policy
        self.allow_simulated = allow_simulated
        #: What to do about refused simulated evidence, said from the refusing side: a
        #: server's refusal is read by the party, whose own flags cannot change it.
        self.simulated_remedy = simulated_remedy
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
        *,
        bound: bool = True,
    ) -> TrustedPeer:
        when = int(time.time()) if at is None else at
        try:
            verified = verify_trusted_quote(
                quote, collateral_json, allow_simulated=self.allow_simulated, now=when
            )
        except SimulatedEvidenceRefused as exc:
            raise PeerRejected(f"{what}: {exc}; {self.simulated_remedy}") from None
        except QuoteVerificationError as exc:
            raise PeerRejected(f"{what}: {exc}") from None
        if verified.td is not None:
            return self._check_td(
                verified, collateral_json, what, role, when, record, expected_report_data, bound
            )
        if verified.identity is None:
            raise PeerRejected(
                f"{what}: evidence is a {verified.tee_type} quote of a kind teepsi does not "
                "judge (TD 1.5 reports are not supported)"
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
        matched = self._apply_policy(verified, collateral_json, what, when, record)
        return TrustedPeer(verified=verified, matched=matched, role=role)

    def _check_td(
        self,
        verified: VerifiedQuote,
        collateral_json: str | None,
        what: str,
        role: Role | None,
        when: int,
        record: bool,
        expected_report_data: bytes | None,
        bound: bool,
    ) -> TrustedPeer:
        """The role and policy stages for a TD (after its quote verified)."""
        # A bare quote judged offline (``bound`` False) has no key or join: no role.
        bound_role = (
            self._td_role(verified.report_data, what, role, expected_report_data) if bound else None
        )
        matched = self._apply_policy(verified, collateral_json, what, when, record)
        return TrustedPeer(verified=verified, matched=matched, role=bound_role)

    @staticmethod
    def _td_role(
        report_data: bytes, what: str, role: Role | None, expected_report_data: bytes | None
    ) -> Role:
        """The role a TD's verified report_data binds, or PeerRejected saying why not."""
        # RA-TLS binds the key in the first 32 bytes (checked on the certificate); the
        # value the TD was asked for is that hash padded with zeros, as for SGX.
        requested = (
            expected_report_data
            if expected_report_data is not None
            else report_data[:32] + bytes(REPORT_DATA_SIZE - 32)
        )
        bound_role = _tdx_role(report_data, requested, role)
        if bound_role is not None:
            return bound_role
        other = _tdx_role(report_data, requested, None)
        if role is not None and other is not None:
            # One VM image may serve both roles: the binding, not MRTD, decides.
            raise PeerRejected(
                f"{what}: TDX VM attests as the {_role_name(other)} role, not the "
                f"{_role_name(role)} role"
            )
        if expected_report_data is not None:
            raise PeerRejected(f"{what}: {_NOT_BOUND}")
        raise PeerRejected(
            f"{what}: TDX quote report_data binds no teepsi role to this key "
            "(not made by a teepsi TDX evidence provider)"
        )

    def _apply_policy(
        self,
        verified: VerifiedQuote,
        collateral_json: str | None,
        what: str,
        when: int,
        record: bool,
    ) -> MeasurementEntry | TdxEntry | None:
        """Policy (measurements, TCB, collateral rules), then the rollback state."""
        assert collateral_json  # verify_quote refuses a quote without collateral
        matched: MeasurementEntry | TdxEntry | None = None
        ppid = verified.ppid
        try:
            info = describe_collateral(collateral_json)
            if self.policy is not None:
                if verified.td is not None:
                    matched = self.policy.check_td(verified.td, verified.tcb_status)
                else:
                    assert verified.identity is not None
                    matched = self.policy.check(verified.identity, verified.tcb_status)
                self.policy.check_collateral(info, when)
        except TcbStatusRefused as exc:
            raise PeerRejected(f"{what}: {exc}", RejectedBy.TCB_STATUS) from None
        except (PolicyViolation, CollateralError) as exc:
            raise PeerRejected(f"{what}: {exc}", RejectedBy.POLICY) from None
        if record:
            if not ppid:
                raise PeerRejected(f"{what}: the verified quote names no platform (PPID)")
            try:
                # Last: only a fully accepted peer moves its platform's rollback state.
                self.freshness.check_and_record_info(info, source=f"ppid:{ppid}")
            except CollateralError as exc:
                raise PeerRejected(f"{what}: {exc}") from None
        return matched

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

    def verify_unbound_quote(
        self, quote: bytes, collateral_json: str | None, *, what: str = "quote", at: int | None
    ) -> TrustedPeer:
        """Quote and policy stages for a bare quote (``teepsi verify-quote --config``).

        No binding and no role: a bare quote carries neither a key nor a join to bind,
        so this proves only who made it, never that it belongs to a session. The
        rollback state is left alone.
        """
        try:
            when = checked_verification_time(at)
        except QuoteVerificationError as exc:
            raise PeerRejected(f"{what}: {exc}") from None
        return self._check(quote, collateral_json, what, None, when, False, bound=False)

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
        # refused without running dcap-qvl. (A TD's value also binds its role; which
        # role is judged after the quote verified.)
        if is_tdx_quote(quote):
            bound = _tdx_role(claimed, expected_report_data, None) is not None
        else:
            bound = hmac.compare_digest(claimed, expected_report_data)
        if not bound:
            raise PeerRejected(f"{what}: {_NOT_BOUND}")
        return self._check(quote, collateral_json, what, role, at, record, expected_report_data)
