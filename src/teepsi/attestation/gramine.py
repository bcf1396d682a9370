"""Evidence from real SGX hardware, through Gramine's ``/dev/attestation`` pseudo-files.

Inside a Gramine-SGX enclave, writing 64 bytes to ``user_report_data`` and then reading
``quote`` yields a DCAP quote over this enclave with exactly that report_data.
``attestation_type`` says which kind of quote Gramine can produce ("dcap" or "none").
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

from teepsi.attestation.evidence import REPORT_DATA_SIZE, EvidenceError, EvidenceProvider

DEFAULT_ROOT = Path("/dev/attestation")

_NOT_IN_GRAMINE = (
    'not running inside Gramine-SGX with sgx.remote_attestation = "dcap" in the manifest'
)


class GramineEvidenceProvider(EvidenceProvider):
    """DCAP quotes from Gramine's attestation pseudo-files."""

    name = "gramine"
    simulated = False

    # The write-then-read pair is not atomic and the pseudo-files are shared by the
    # whole enclave, so concurrent callers must not interleave.
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def _attestation_type(self) -> str:
        path = self.root / "attestation_type"
        if not self.root.is_dir():
            raise EvidenceError(f"{self.root} does not exist: {_NOT_IN_GRAMINE}")
        try:
            return path.read_text(encoding="ascii", errors="replace").strip().strip("\0")
        except OSError as exc:
            raise EvidenceError(f"cannot read {path} ({exc.strerror}): {_NOT_IN_GRAMINE}") from None

    def quote(self, report_data: bytes) -> bytes:
        if len(report_data) != REPORT_DATA_SIZE:
            raise EvidenceError(
                f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}"
            )
        kind = self._attestation_type()
        if kind != "dcap":
            raise EvidenceError(f"Gramine attestation type is {kind!r}: {_NOT_IN_GRAMINE}")
        user_report_data = self.root / "user_report_data"
        quote_path = self.root / "quote"
        with self._lock:
            try:
                with open(user_report_data, "wb", buffering=0) as handle:
                    written = handle.write(bytes(report_data))
            except OSError as exc:
                raise EvidenceError(f"cannot write {user_report_data}: {exc.strerror}") from None
            if written != REPORT_DATA_SIZE:
                raise EvidenceError(f"short write to {user_report_data} ({written} bytes)")
            try:
                quote = quote_path.read_bytes()
            except OSError as exc:
                raise EvidenceError(f"cannot read {quote_path}: {exc.strerror}") from None
        if not quote:
            raise EvidenceError(f"{quote_path} returned no quote")
        return quote
