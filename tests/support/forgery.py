"""What a forger can build without any enclave: certificates and receipts that look right.

The forger reads the public policy, copies a measurement from it into a quote in the
DCAP v3 layout whose report_data correctly binds the forger's own key, leaves every
signature zero and carries no PCK chain, wraps it in a Gramine-style RA-TLS certificate
and signs any receipt it likes with that certificate's key. Nothing here is a mock of
teepsi: the certificate goes through teepsi's real certificate builder.
"""

from __future__ import annotations

import hashlib
import time
from typing import ClassVar

from teepsi.attestation.evidence import DEFAULT_ATTRIBUTE_FLAGS, DEFAULT_XFRM, EvidenceProvider
from teepsi.attestation.policy import MeasurementEntry
from teepsi.attestation.quote import (
    ECDSA_PUBKEY_SIZE,
    ECDSA_SIG_SIZE,
    REPORT_BODY_SIZE,
    USER_DATA_SIZE,
    ReportBody,
    attributes_bytes,
    encode_header,
    encode_signature_data,
)
from teepsi.attestation.ratls import RaTlsCertificate, create_certificate
from teepsi.contract.outputs import OutputKind
from teepsi.contract.receipt import PartyEntry, Receipt, SignedReceipt, sign_receipt


def forged_quote(entry: MeasurementEntry, report_data: bytes) -> bytes:
    """A v3 quote claiming ``entry``'s measurement: zeroed signatures, no PCK chain."""
    assert entry.mr_enclave is not None and entry.mr_signer is not None
    body = ReportBody(
        mr_enclave=entry.mr_enclave,
        mr_signer=entry.mr_signer,
        isv_prod_id=entry.isv_prod_id or 0,
        isv_svn=entry.isv_svn or 0,
        attributes=attributes_bytes(int(DEFAULT_ATTRIBUTE_FLAGS), DEFAULT_XFRM),
        report_data=report_data,
    ).to_bytes()
    header = encode_header(qe_svn=0, pce_svn=0, user_data=bytes(USER_DATA_SIZE))
    return (
        header
        + body
        + encode_signature_data(
            isv_signature=bytes(ECDSA_SIG_SIZE),
            attestation_public_key=bytes(ECDSA_PUBKEY_SIZE),
            qe_report=bytes(REPORT_BODY_SIZE),
            qe_report_signature=bytes(ECDSA_SIG_SIZE),
            qe_auth_data=b"",
            pck_chain_pem=b"",
        )
    )


class ForgingProvider(EvidenceProvider):
    """Answers every report_data with a forged quote for one copied measurement."""

    name: ClassVar[str] = "forged"
    simulated: ClassVar[bool] = False

    def __init__(self, entry: MeasurementEntry) -> None:
        self.entry = entry

    def quote(self, report_data: bytes) -> bytes:
        return forged_quote(self.entry, report_data)


def forged_certificate(entry: MeasurementEntry) -> RaTlsCertificate:
    """A self-signed RA-TLS certificate whose quotes bind its key but prove nothing."""
    return create_certificate(ForgingProvider(entry))


def receipt_for(
    certificate: RaTlsCertificate, *, issued_at: int | None = None, tee: str = "SGX"
) -> SignedReceipt:
    """Any receipt the holder of ``certificate``'s key cares to make up, signed by it."""
    receipt = Receipt(
        spec_sha256=b"",
        job_id="default",
        parties=(
            PartyEntry(name="alice", items=3, set_sha256=hashlib.sha256(b"alice").digest()),
            PartyEntry(name="bob", items=3, set_sha256=hashlib.sha256(b"bob").digest()),
        ),
        output=OutputKind.INTERSECTION,
        released=True,
        result_size=2,
        result_sha256=hashlib.sha256(b"made up").digest(),
        issued_at=int(time.time()) if issued_at is None else issued_at,
        certificate_sha256=hashlib.sha256(certificate.certificate_der).digest(),
        tee=tee,
    )
    return sign_receipt(receipt, certificate.private_key)
