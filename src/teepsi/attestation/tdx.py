"""Evidence from a real Intel TDX guest, through Linux's configfs-tsm interface.

Linux 6.7 and later expose quote generation under ``/sys/kernel/config/tsm/report/``:
``mkdir`` a report directory, write the 64-byte report data to its ``inblob``, read
the quote from ``outblob``. ``provider`` names the backend (``tdx_guest`` in a TDX
guest) and ``generation`` counts writes to the directory, so a reader can tell that
another writer changed ``inblob`` between its write and its read. Each request uses a
directory of its own, removed afterwards.

Not supported: the legacy ``/dev/tdx_guest`` ioctl of older kernels, and Azure's
paravisor-based TDX VMs, which attest through a vTPM (the guest sees no TDX module);
both are refused with a message saying so.

The report data is role-bound (:func:`teepsi.attestation.evidence.tdx_report_data`):
one VM image may serve as the server and as a data provider.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from pathlib import Path
from typing import ClassVar

from teepsi.attestation.evidence import (
    REPORT_DATA_SIZE,
    EvidenceError,
    EvidenceProvider,
    Role,
    tdx_report_data,
)

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_DMI_ROOT = Path("/sys/class/dmi/id")
TDX_PROVIDER = "tdx_guest"
#: Linux caps a configfs-tsm outblob at 32 KiB (TSM_OUTBLOB_MAX); a TDX quote is ~5 KiB.
MAX_QUOTE_SIZE = 32 * 1024
# A fresh report directory starts at generation 0; our one inblob write makes it 1.
_GENERATION_AFTER_OUR_WRITE = 1

_NEEDS_KERNEL = (
    "configfs-tsm needs a TDX guest with Linux 6.7 or later and configfs mounted at "
    "/sys/kernel/config (mount -t configfs none /sys/kernel/config); teepsi does not "
    "use the legacy /dev/tdx_guest ioctl"
)
_AZURE = (
    "this looks like an Azure confidential VM with a paravisor (vTPM-based TDX "
    "attestation): teepsi cannot attest there; use a TDX VM that exposes the TDX "
    "module to the guest (e.g. Google Cloud C3, Alibaba g8i, or Azure's TDX VMs "
    "without a paravisor)"
)


class TdxEvidenceProvider(EvidenceProvider):
    """TDX quotes from configfs-tsm for a VM acting as ``role``."""

    name: ClassVar[str] = "tdx"
    simulated: ClassVar[bool] = False

    # One request at a time per process: the directories are separate, but the TDX
    # module serialises quote generation anyway and this keeps the generation check
    # meaningful for our own threads.
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        role: Role,
        root: Path = DEFAULT_TSM_ROOT,
        *,
        dmi_root: Path = DEFAULT_DMI_ROOT,
    ) -> None:
        self.role = role
        self.root = root
        self.dmi_root = dmi_root

    def _looks_like_azure_paravisor(self) -> bool:
        try:
            vendor = (self.dmi_root / "sys_vendor").read_text(errors="replace").strip()
        except OSError:
            return False
        return vendor == "Microsoft Corporation"

    def _check_available(self) -> None:
        if self.root.is_dir():
            return
        if self._looks_like_azure_paravisor():
            raise EvidenceError(f"{self.root} does not exist: {_AZURE}")
        raise EvidenceError(f"{self.root} does not exist: {_NEEDS_KERNEL}")

    def _new_report_dir(self) -> Path:
        """Create this request's report directory (the kernel fills it with its files)."""
        entry = self.root / f"teepsi-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            entry.mkdir()
        except OSError as exc:
            raise EvidenceError(
                f"cannot create the configfs-tsm report directory {entry}: {exc.strerror} "
                "(run as root or grant write access to the report directory)"
            ) from None
        return entry

    def quote(self, report_data: bytes) -> bytes:
        requested = tdx_report_data(self.role, report_data)
        self._check_available()
        with self._lock:
            entry = self._new_report_dir()
            try:
                return self._quote_in(entry, requested)
            finally:
                # configfs removes its attribute files with the directory
                with contextlib.suppress(OSError):
                    entry.rmdir()

    def _read(self, path: Path, limit: int) -> bytes:
        try:
            with open(path, "rb") as handle:
                return handle.read(limit + 1)
        except OSError as exc:
            raise EvidenceError(f"cannot read {path}: {exc.strerror}") from None

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation", 32).decode("ascii", "replace").strip()
        if not text.isdigit():
            raise EvidenceError(f"{entry / 'generation'} holds {text!r}, not a number")
        return int(text)

    def _quote_in(self, entry: Path, requested: bytes) -> bytes:
        provider = self._read(entry / "provider", 64).decode("ascii", "replace").strip()
        if provider != TDX_PROVIDER:
            raise EvidenceError(
                f"configfs-tsm provider is {provider!r}, not {TDX_PROVIDER!r}: this machine "
                "is not a TDX guest (use attestation 'gramine' on SGX)"
            )
        inblob = entry / "inblob"
        try:
            with open(inblob, "wb", buffering=0) as handle:
                written = handle.write(requested)
        except OSError as exc:
            raise EvidenceError(f"cannot write {inblob}: {exc.strerror}") from None
        if written != REPORT_DATA_SIZE:
            raise EvidenceError(f"short write to {inblob} ({written} bytes)")
        outblob = entry / "outblob"
        quote = self._read(outblob, MAX_QUOTE_SIZE)
        generation = self._generation(entry)
        if generation != _GENERATION_AFTER_OUR_WRITE:
            # Someone else wrote to our directory: the quote may carry their data.
            raise EvidenceError(
                f"{entry} changed while the quote was made (generation {generation}, "
                f"expected {_GENERATION_AFTER_OUR_WRITE}): another process writes to "
                "teepsi's report directory; try again"
            )
        if not quote:
            raise EvidenceError(f"{outblob} returned no quote")
        if len(quote) > MAX_QUOTE_SIZE:
            raise EvidenceError(
                f"{outblob} returned more than {MAX_QUOTE_SIZE} bytes: not a TDX quote"
            )
        from teepsi.attestation.ratls import RaTlsError, quote_report_data

        try:
            carried = quote_report_data(quote)
        except RaTlsError as exc:
            raise EvidenceError(f"{outblob} is not a usable quote: {exc}") from None
        if carried != requested:
            raise EvidenceError(f"{outblob} holds a quote for other report data than ours")
        return quote
