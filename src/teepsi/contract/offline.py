"""Offline checks of what a server signed: a receipt, and the signed heads of its audit
log, each with the attestation of the server enclave whose certificate signed it.

The enclave is judged by the caller's ``judge`` (:func:`judge_signing_server` with the
caller's policy), so every offline check goes through the one verification path; the
functions here decide what must hold and raise :class:`SignedRefused` with one line when
it does not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from teepsi.errors import TeepsiError

if TYPE_CHECKING:
    from teepsi.attestation.policy import Policy
    from teepsi.contract.audit import AuditHead, AuditSummary
    from teepsi.contract.receipt_files import ReceiptFiles

#: Judges a signing certificate with its collateral as of a time (UNIX seconds): the
#: verdict's fields, or SignedRefused.
Judge = Callable[[bytes, "str | None", int], dict[str, object]]


class SignedRefused(TeepsiError, ValueError):
    """Evidence or a signed document does not check out; the message is one line."""


def judge_signing_server(
    certificate: bytes,
    collateral: str | None,
    at: int,
    *,
    policy: Policy | None,
    allow_simulated: bool,
    simulated_remedy: str | None = None,
) -> dict[str, object]:
    """The server enclave whose certificate signed a receipt or audit heads, judged through
    :class:`teepsi.attestation.peer.PeerVerifier` (quote signatures and PCK chain to
    Intel's root, or the simulated root only with ``allow_simulated``; key binding; server
    role; the policy if given) as of ``at``, its rollback state left alone.
    ``simulated_remedy`` is how the caller's user allows simulated evidence (its flag)."""
    from teepsi.attestation.evidence import Role
    from teepsi.attestation.peer import SIMULATED_REMEDY, PeerRejected, PeerVerifier
    from teepsi.timefmt import iso_utc

    verifier = PeerVerifier(
        policy,
        allow_simulated=allow_simulated,
        simulated_remedy=simulated_remedy or SIMULATED_REMEDY,
    )
    try:
        peer, _ = verifier.verify_certificate(
            certificate, collateral, what="signing server", role=Role.SERVER, at=at, record=False
        )
    except PeerRejected as exc:
        raise SignedRefused(str(exc)) from None
    verified = peer.verified
    return {
        # Which TEE signed ("tee": SGX or TDX) and its measurements.
        "signer": {**verified.identity_fields(), "simulated": verified.simulated},
        "quote_verified": True,
        "root": verified.root,
        "tcb_status": verified.tcb_status,
        "advisory_ids": list(verified.advisory_ids),
        "verified_at": at,
        "verified_at_iso": iso_utc(at),
    }


def check_receipt(files: ReceiptFiles, *, at: int | None, judge: Judge) -> dict[str, object]:
    """The receipt's signature, and its signer judged as of ``at`` (default the receipt's
    issue time: the verdict a live client had then); the signer's verdict."""
    from teepsi.contract.receipt import ReceiptError, verify_receipt

    try:
        verify_receipt(files.signed, files.certificate)
    except ReceiptError as exc:
        raise SignedRefused(str(exc)) from None
    receipt = files.signed.receipt
    judged = judge(files.certificate, files.collateral, receipt.issued_at if at is None else at)
    signer = judged["signer"]
    tee = signer.get("tee") if isinstance(signer, dict) else None
    if tee != receipt.tee:
        raise SignedRefused(
            f"the receipt says an {receipt.tee} TEE signed it; its certificate holds {tee} evidence"
        )
    return judged


@dataclass(frozen=True)
class AuditVerdict:
    summary: AuditSummary
    #: The verdict of each certificate that signs heads, in the log's order.
    signers: list[dict[str, object]]
    #: The receipt's audit head, when a receipt was checked against the log.
    receipt_head: AuditHead | None


def check_audit_log(
    log: str, *, head: str | None, receipt: ReceiptFiles | None, judge: Judge
) -> AuditVerdict:
    """The log's chain, every signed head and the signer of each, and with ``receipt``
    that the log holds, unchanged, everything up to the receipt's release."""
    from teepsi.contract.audit import AuditError, verify_audit_log
    from teepsi.contract.receipt import ReceiptError, verify_receipt

    expect_entry = None
    if receipt is not None:
        try:
            verify_receipt(receipt.signed, receipt.certificate)
        except ReceiptError as exc:
            raise SignedRefused(str(exc)) from None
        expect_entry = receipt.signed.receipt.audit_head
        if expect_entry is None:
            raise SignedRefused("the receipt carries no audit head (its server kept no audit log)")
    try:
        summary = verify_audit_log(log, expect_head=head, expect_entry=expect_entry)
    except AuditError as exc:
        raise SignedRefused(str(exc)) from None
    if summary.signed_entries == 0:
        raise SignedRefused(
            f"{log}: no signed head: nothing in the log is authenticated by a server key"
        )
    receipt_key = certificate_key_sha256(receipt.certificate) if receipt is not None else None
    signers = []
    for signing in summary.signers:
        # The collateral the server recorded beside its certificate at start; for the
        # receipt's own server, the collateral its client verified it with also serves.
        collateral = signing.collateral_json or None
        if (
            collateral is None
            and receipt is not None
            and (certificate_key_sha256(signing.der) == receipt_key)
        ):
            collateral = receipt.collateral
        try:
            signers.append(judge(signing.der, collateral, signing.recorded_at))
        except SignedRefused as exc:
            raise SignedRefused(
                f"{log}: a certificate that signs heads is refused: {exc}"
            ) from None
    if receipt is not None and not any(
        certificate_key_sha256(s.der) == receipt_key for s in summary.signers
    ):
        raise SignedRefused(
            f"{log}: the receipt's server certificate signs no head in this log (another log)"
        )
    return AuditVerdict(summary, signers, expect_entry)


def certificate_key_sha256(certificate: bytes) -> bytes | None:
    """SHA-256 of a certificate's public key (PEM or DER); None if it cannot be read."""
    from teepsi.contract.signing import SignatureError, certificate_public_key

    try:
        return certificate_public_key(certificate)[0]
    except SignatureError:
        return None
