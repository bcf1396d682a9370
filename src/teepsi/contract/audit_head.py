"""Signed heads: the enclave's signature over a position in the audit log's chain.

A hash chain alone cannot stop whoever can write the file from rewriting it and
recomputing every hash. So the enclave signs the chain head with its attested RA-TLS key
(:class:`HeadSigner`); a verifier checks the signature over :func:`head_payload`.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.contract._common import canonical_json
from teepsi.contract.audit_chain import AuditHead
from teepsi.contract.signing import SignatureError, certificate_public_key, sign_document

__all__ = ["HEAD_DOMAIN", "HeadSigner", "head_payload"]

#: Prefix of the signed bytes: a head signature never passes for a receipt's, or the reverse.
HEAD_DOMAIN = b"teepsi-audit-head-v1\n"


def head_payload(head: AuditHead, certificate_sha256: bytes) -> bytes:
    """The bytes a signed head signs: domain label, then canonical JSON of the head."""
    return HEAD_DOMAIN + canonical_json(
        {"certificate_sha256": certificate_sha256.hex(), **head.to_dict()}
    )


class HeadSigner:
    """The enclave's attested key and its certificate: signs chain heads.

    ``collateral_json`` is the collateral for the certificate's quote as the server had it
    at start: recorded beside the certificate, so a verifier can check the quote offline
    through the one verification path, as of the time the certificate was recorded.
    """

    def __init__(
        self,
        certificate_der: bytes,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        collateral_json: str = "",
    ) -> None:
        self.certificate_der = bytes(certificate_der)
        self.collateral_json = collateral_json
        self.certificate_sha256, public_key = certificate_public_key(self.certificate_der)
        if public_key.public_numbers() != private_key.public_key().public_numbers():
            raise SignatureError("the signing key is not the certificate's key")
        self._private_key = private_key

    def sign(self, head: AuditHead) -> bytes:
        return sign_document(
            self._private_key, head_payload(head, self.certificate_sha256), what="audit heads"
        )
