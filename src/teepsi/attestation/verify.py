"""Quote verification: one dcap-qvl call against the trust root the caller passes.

Real quotes are checked against Intel's SGX Root CA (:func:`intel_root`). Simulated
quotes go through the very same ``dcap_qvl.verify_with_root_ca`` call, against the
simulated root, which only a caller that allows simulated evidence passes in
(:mod:`teepsi.attestation.trust`). Verification never touches the network and fetches
nothing: collateral and the root are arguments.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import dcap_qvl

from teepsi.attestation.evidence import TD_MEASUREMENTS, EnclaveIdentity, TdIdentity
from teepsi.errors import TeepsiError

INTEL_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

#: How outputs name the root a quote was verified against.
INTEL_ROOT_NAME = "Intel SGX Root CA"
SIMULATED_ROOT_NAME = "SIMULATED root"

SIMULATED_WARNING = (
    "SIMULATED ATTESTATION: evidence is produced by teepsi's simulated platform; "
    "nothing is hardware-backed and anyone can forge it"
)


class QuoteVerificationError(TeepsiError):
    """The quote or its collateral did not verify; the message is one line."""


class MissingCollateral(QuoteVerificationError):
    """No collateral came with the quote; the caller says where to get some."""


class QuoteRejected(QuoteVerificationError):
    """dcap-qvl refused the quote against its collateral and root."""


class SimulatedEvidenceRefused(QuoteVerificationError):
    """Simulated evidence, and this verifier does not accept it: the remedy is the
    verifier's (its operator's switch to allow simulation), which the caller names."""


@dataclass(frozen=True)
class TrustRoot:
    """A root CA certificate (DER) quotes' PCK chains are verified against."""

    #: How outputs name it (:data:`INTEL_ROOT_NAME`, :data:`SIMULATED_ROOT_NAME`).
    name: str
    der: bytes
    #: True for the simulated root: what verifies under it proves nothing.
    simulated: bool = False


@cache
def intel_root_ca_der() -> bytes:
    """Intel's SGX Root CA certificate, checked against its well-known digest."""
    der = resources.files("teepsi.attestation").joinpath("data/intel_sgx_root_ca.der").read_bytes()
    if hashlib.sha256(der).hexdigest() != INTEL_ROOT_CA_SHA256:
        raise QuoteVerificationError("packaged Intel SGX Root CA does not match its digest")
    return der


def intel_root() -> TrustRoot:
    """Intel's SGX Root CA as a :class:`TrustRoot`."""
    return TrustRoot(INTEL_ROOT_NAME, intel_root_ca_der())


@dataclass(frozen=True)
class VerifiedQuote:
    """What a verified quote proves: who produced it, on what platform state."""

    tee_type: str
    identity: EnclaveIdentity | None  # an SGX enclave's identity; None for a TD
    report_data: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...]
    simulated: bool
    report: dict[str, Any]
    #: The platform's PPID (hex) from its verified PCK certificate: the collateral
    #: rollback state is kept per platform (:class:`CollateralFreshness`).
    ppid: str = ""
    #: A TDX TD's identity; None for an SGX enclave.
    td: TdIdentity | None = None
    #: The name of the trust root the PCK chain was verified against.
    root_name: str = INTEL_ROOT_NAME

    def identity_fields(self) -> dict[str, object]:
        """The verified identity as JSON fields: the enclave's, or the TD's registers."""
        if self.td is not None:
            td = self.td
            fields: dict[str, object] = {"tee": "TDX"}
            fields.update({name: getattr(td, name).hex() for name in TD_MEASUREMENTS})
            fields.update(
                td_attributes=td.td_attributes.to_bytes(8, "little").hex(),
                xfam=td.xfam.to_bytes(8, "little").hex(),
                tee_tcb_svn=td.tee_tcb_svn.hex(),
            )
            return fields
        if self.identity is None:
            return {"tee": self.tee_type}
        ident = self.identity
        return {
            "tee": "SGX",
            "mr_enclave": ident.mr_enclave.hex(),
            "mr_signer": ident.mr_signer.hex(),
            "isv_prod_id": ident.isv_prod_id,
            "isv_svn": ident.isv_svn,
        }

    @property
    def root(self) -> str:
        """The trust root the PCK chain was verified against."""
        return self.root_name


def _identity_from_report(body: dict[str, Any]) -> EnclaveIdentity:
    attributes = bytes.fromhex(body["attributes"])
    return EnclaveIdentity(
        mr_enclave=bytes.fromhex(body["mr_enclave"]),
        mr_signer=bytes.fromhex(body["mr_signer"]),
        isv_prod_id=int(body["isv_prod_id"]),
        isv_svn=int(body["isv_svn"]),
        attribute_flags=int.from_bytes(attributes[:8], "little"),
        xfrm=int.from_bytes(attributes[8:16], "little"),
    )


def _td_from_report(body: dict[str, Any]) -> TdIdentity:
    return TdIdentity(
        **{name: bytes.fromhex(body[name]) for name in TD_MEASUREMENTS},
        td_attributes=int.from_bytes(bytes.fromhex(body["td_attributes"]), "little"),
        xfam=int.from_bytes(bytes.fromhex(body["xfam"]), "little"),
        tee_tcb_svn=bytes.fromhex(body["tee_tcb_svn"]),
    )


def _parse_collateral(collateral_json: str) -> Any:
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    except (ValueError, TypeError) as exc:
        raise QuoteVerificationError(f"collateral is not valid dcap-qvl JSON: {exc}") from None


def checked_verification_time(now: int | None) -> int:
    """The time evidence is judged at (default now), refused unless dcap-qvl can take it."""
    at = int(time.time()) if now is None else now
    if not 0 <= at < 2**63:
        # A time from a receipt or the command line; dcap-qvl takes an unsigned 64-bit.
        raise QuoteVerificationError(f"verification time {at} is not a valid UNIX time")
    return at


def verify_quote(
    quote: bytes,
    collateral_json: str | None,
    *,
    root: TrustRoot,
    now: int | None = None,
) -> VerifiedQuote:
    """Verify ``quote`` with its collateral under ``root``; QuoteVerificationError if not.

    The quote stage of the one verification path (:class:`teepsi.attestation.peer.
    PeerVerifier`); it records nothing. The TCB status is returned, not judged:
    accepting a status other than UpToDate is the policy's decision
    (:mod:`teepsi.attestation.policy`).
    """
    if not collateral_json:
        raise MissingCollateral("no collateral for the quote: the peer sent none")
    at = checked_verification_time(now)
    collateral = _parse_collateral(collateral_json)
    try:
        verified = dcap_qvl.verify_with_root_ca(quote, collateral, root.der, at)
    except (ValueError, TypeError) as exc:
        # dcap-qvl nests causes over several lines; keep them, on one line.
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        reason = reason.replace("Caused by:; ", "caused by: ") or type(exc).__name__
        raise QuoteRejected(f"quote verification failed: {reason}") from None
    report = json.loads(verified.to_json())
    body = report.get("report", {})
    identity: EnclaveIdentity | None = None
    td: TdIdentity | None = None
    report_data = b""
    tee_type = "TDX"
    if "SgxEnclave" in body:
        tee_type = "SGX"
        identity = _identity_from_report(body["SgxEnclave"])
        report_data = bytes.fromhex(body["SgxEnclave"]["report_data"])
    elif "TD10" in body:
        td = _td_from_report(body["TD10"])
        report_data = bytes.fromhex(body["TD10"]["report_data"])
    else:
        # A TD 1.5 report (quote v5) or anything newer: teepsi judges no field of it.
        inner: dict[str, Any] = next(iter(body.values()), {}) if isinstance(body, dict) else {}
        report_data = bytes.fromhex(inner.get("report_data", ""))
    return VerifiedQuote(
        td=td,
        tee_type=tee_type,
        identity=identity,
        report_data=report_data,
        tcb_status=str(verified.status),
        advisory_ids=tuple(verified.advisory_ids),
        simulated=root.simulated,
        report=report,
        ppid=str(report.get("ppid") or ""),
        root_name=root.name,
    )
