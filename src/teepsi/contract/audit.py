"""The audit log: an append-only, hash-chained, signed JSON-lines file of job events.

Each line is one canonical JSON object that hashes the line before it
(:mod:`teepsi.contract.audit_chain`). The log is public (the host can read it): it
holds nothing a job's receipt does not give every party of that job, and its digests
are the receipt's salted ones.

:func:`verify_audit_log` detects, naming the line: an edited line (its hash no longer
matches, or it is no longer canonical), a deleted, inserted or moved line (``seq`` out of
order, ``prev`` not the previous hash), and anything that is not a well-formed entry.

A hash chain alone cannot stop whoever can write the file from rewriting it and
recomputing every hash, or from cutting lines off the end. So the enclave signs the chain
head with its attested RA-TLS key (:class:`HeadSigner`): each server start records its
certificate once (a ``server_certificate`` entry), and ``signed_head`` entries, written at
every release and within ``sign_interval_seconds`` of any other entry, carry a signature
over (entries, hash) of the line before them. A rewrite of anything a signed head covers
breaks that signature. Lines after the newest signed head are covered only by a head
recorded elsewhere: a receipt's ``audit_head`` (``expect_entry``), or ``expect_head``.

The parts: :mod:`~teepsi.contract.audit_chain` (the entry format and the chain),
:mod:`~teepsi.contract.audit_head` (signed heads), :mod:`~teepsi.contract.audit_verify`
(checking a log); this module writes the file and is the one to import.

One :class:`AuditLog` per file: appends from threads are serialised, but two writers
(two processes, or two objects on one path) would fork the chain. A crash in the middle
of a write leaves a broken last line, and the log then refuses to open until an operator
looks at it: failing closed is the point of an audit log.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from teepsi.contract._common import canonical_json, show
from teepsi.contract.audit_chain import (
    CERTIFICATE_EVENT,
    GENESIS_HASH,
    HEAD_EVENT,
    AuditError,
    AuditHead,
    FieldValue,
    check_field,
    entry_hash,
)
from teepsi.contract.audit_head import HEAD_DOMAIN, HeadSigner, head_payload
from teepsi.contract.audit_verify import AuditSummary, SigningCertificate, verify_audit_log
from teepsi.contract.identifiers import AUDIT_EVENT_PATTERN
from teepsi.contract.signing import SignatureError
from teepsi.privatefile import open_private_append, sync_directory

__all__ = [
    "CERTIFICATE_EVENT",
    "GENESIS_HASH",
    "HEAD_DOMAIN",
    "HEAD_EVENT",
    "AuditError",
    "AuditHead",
    "AuditLog",
    "AuditSummary",
    "HeadSigner",
    "SigningCertificate",
    "head_payload",
    "verify_audit_log",
]

log = logging.getLogger(__name__)


class AuditLog:
    """Appends hash-chained entries to a JSON-lines file; thread-safe.

    With a ``signer`` (the server's attested key) the log records the signer's certificate
    when opened, signs the head on :meth:`sign_head`, within ``sign_interval_seconds`` of
    any entry, and on :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        signer: HeadSigner | None = None,
        sign_interval_seconds: float = 60.0,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._signer = signer
        self._sign_interval = sign_interval_seconds
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        created = not self._path.exists()
        if created:
            summary = AuditSummary(entries=0, head=GENESIS_HASH)
        else:
            # Continuing a chain we have not checked would vouch for whatever is there.
            summary = verify_audit_log(self._path)
        self._seq = summary.entries
        self._head = summary.head
        self._signed_head = summary.head if summary.unsigned_tail == 0 else ""
        try:
            # Created 0600: the log is public by design, but who may read it is the
            # operator's choice, not the umask's.
            self._file = open_private_append(self._path)
        except OSError as exc:
            raise AuditError(f"{path}: cannot open for append: {exc.strerror or exc}") from None
        if created:
            # A new file's directory entry must survive a crash as well as its lines.
            sync_directory(self._path.parent)
        if signer is not None:
            # Once per start: the certificate whose key signs the heads from here on, and
            # how much of the chain this enclave found without a signature covering it.
            with self._lock:
                self._write_locked(
                    CERTIFICATE_EVENT,
                    {
                        "certificate": base64.b64encode(signer.certificate_der).decode("ascii"),
                        "certificate_sha256": signer.certificate_sha256.hex(),
                        "collateral": signer.collateral_json,
                        "unsigned_before": summary.unsigned_tail,
                    },
                )
                self._sign_locked()

    @property
    def head(self) -> str:
        """Hash of the last entry (GENESIS_HASH when empty)."""
        with self._lock:
            return self._head

    @property
    def entries(self) -> int:
        with self._lock:
            return self._seq

    def position(self) -> AuditHead:
        """Entries and head hash, read together (what a receipt carries)."""
        with self._lock:
            return AuditHead(entries=self._seq, hash=self._head)

    @property
    def path(self) -> Path:
        return self._path

    def append(self, event: str, **fields: FieldValue) -> str:
        """Write one entry, flushed and fsynced before returning; returns its hash."""
        if not isinstance(event, str) or not AUDIT_EVENT_PATTERN.fullmatch(event):
            raise ValueError(f"audit event name {show(event)} is invalid")
        if event in (CERTIFICATE_EVENT, HEAD_EVENT):
            raise ValueError(f"audit event {event} is written by the log itself")
        for name, value in fields.items():
            check_field(name, value)
        with self._lock:
            digest = self._write_locked(event, dict(fields))
            if self._signer is not None and self._timer is None:
                # Nothing stays unsigned for long, even with no release to sign it.
                self._timer = threading.Timer(self._sign_interval, self._sign_on_timer)
                self._timer.daemon = True
                self._timer.start()
            return digest

    def _write_locked(self, event: str, fields: dict[str, object]) -> str:
        if self._file.closed:
            raise AuditError(f"{self._path}: audit log is closed")
        body: dict[str, object] = dict(fields)
        # milliseconds are plenty, and keep lines short
        body.update(seq=self._seq + 1, time=round(self._clock(), 3), event=event)
        body["prev"] = self._head
        digest = entry_hash(self._head, body)
        line = canonical_json({**body, "hash": digest}) + b"\n"
        try:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise AuditError(f"{self._path}: cannot write: {exc.strerror or exc}") from None
        self._seq += 1
        self._head = digest
        return digest

    def sign_head(self) -> None:
        """Append a signed head covering every line so far (no-op without a signer)."""
        with self._lock:
            self._sign_locked()

    def _sign_locked(self) -> None:
        if self._signer is None or self._file.closed or self._signed_head == self._head:
            return
        head = AuditHead(entries=self._seq, hash=self._head)
        signature = self._signer.sign(head)
        self._write_locked(
            HEAD_EVENT,
            {
                "certificate_sha256": self._signer.certificate_sha256.hex(),
                "signature": signature.hex(),
            },
        )
        # The signed_head line itself needs no signature: it adds no event.
        self._signed_head = self._head

    def _sign_on_timer(self) -> None:
        with self._lock:
            self._timer = None
            try:
                self._sign_locked()
            except (AuditError, SignatureError) as exc:
                log.error("audit log: cannot sign the head: %s", exc)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._file.closed:
                try:
                    self._sign_locked()
                finally:
                    self._file.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
