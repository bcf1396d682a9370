"""A receipt on disk with the evidence to verify it offline: ``RECEIPT`` (the signed
receipt), ``RECEIPT.cert.pem`` (the server's certificate) and ``RECEIPT.collateral.json``
(the collateral the client verified the server with, so the quote can be judged as of
the receipt's time)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from teepsi.contract.receipt import SignedReceipt
from teepsi.errors import TeepsiError

RECEIPT_CERT_SUFFIX = ".cert.pem"
RECEIPT_COLLATERAL_SUFFIX = ".collateral.json"


class ReceiptFilesError(TeepsiError, ValueError):
    """A receipt's file or its certificate cannot be read; one line naming the file."""


def receipt_paths(receipt: str) -> list[str]:
    """Every file a receipt saved at ``receipt`` takes, the receipt itself first."""
    return [receipt + suffix for suffix in ("", RECEIPT_CERT_SUFFIX, RECEIPT_COLLATERAL_SUFFIX)]


def _pem(der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def save_receipt_files(
    path: str, receipt_json: str, certificate_der: bytes, collateral: str
) -> None:
    """The receipt and its evidence, all 0600, each written atomically (the receipt last,
    so a receipt on disk always has its evidence beside it); OSError names the file."""
    from teepsi.privatefile import write_private

    for target, data in (
        (path + RECEIPT_CERT_SUFFIX, _pem(certificate_der)),
        (path + RECEIPT_COLLATERAL_SUFFIX, (collateral + "\n").encode()),
        (path, (receipt_json + "\n").encode()),
    ):
        try:
            write_private(target, data)
        except OSError as exc:
            raise OSError(f"cannot write {target}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ReceiptFiles:
    signed: SignedReceipt
    certificate: bytes
    #: None when there is no collateral file (an older receipt, or it was not kept).
    collateral: str | None


def load_receipt_files(
    receipt: str, *, certificate: str | None = None, collateral: str | None = None
) -> ReceiptFiles:
    """Read a receipt and its evidence; ``certificate`` and ``collateral`` replace the
    files beside it (an explicit ``collateral`` must exist, the one beside it may not).

    Raises ReceiptFilesError for an unreadable receipt or certificate, CollateralError
    for a bad collateral file and ReceiptError for a receipt that does not parse.
    """
    from teepsi.attestation.collateral import load_collateral_file

    try:
        receipt_bytes = Path(receipt).read_bytes()
        cert = Path(certificate or receipt + RECEIPT_CERT_SUFFIX).read_bytes()
    except OSError as exc:
        raise ReceiptFilesError(f"cannot read {exc.filename}: {exc.strerror}") from None
    collateral_path = collateral or receipt + RECEIPT_COLLATERAL_SUFFIX
    collateral_json: str | None = None
    if collateral or Path(collateral_path).exists():
        collateral_json = load_collateral_file(collateral_path)
    return ReceiptFiles(SignedReceipt.from_json(receipt_bytes), cert, collateral_json)
