"""What the public, hash-chained audit log records of each job: job ids, party names,
counts and digests, never items and never a result size (the host is no party)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from teepsi.contract.audit import AuditError, AuditHead, AuditLog
from teepsi.contract.signing import SignatureError
from teepsi.server.job import Job, Party
from teepsi.server.release import output_kind

log = logging.getLogger(__name__)


class JobAuditTrail:
    """The registry's entries in the audit log; without a log, nothing is written.

    A failing append or head signature is logged and the job goes on: the audit log
    documents jobs, it does not gate them."""

    def __init__(self, audit: AuditLog | None) -> None:
        self._audit = audit

    def _append(self, event: str, **fields: str | int | bool | None) -> None:
        if self._audit is not None:
            try:
                self._audit.append(event, **fields)
            except (OSError, AuditError) as exc:
                log.error("audit log append failed: %s", exc)

    def created(self, job: Job) -> None:
        self._append(
            "created",
            job_id=job.job_id,
            parties=job.party_count,
            spec_sha256=job.spec_sha256.hex() or None,
            output=output_kind(job.spec).value,
            deadline=int(job.deadline),
        )

    def joined(self, job_id: str, party: str, *, attested: bool) -> None:
        self._append("joined", job_id=job_id, party=party, attested=attested)

    def resumed(self, job_id: str, party: str) -> None:
        self._append("resumed", job_id=job_id, party=party)

    def expired(self, job: Job, reason: str) -> None:
        self._append(
            "expired",
            job_id=job.job_id,
            reason=reason,
            parties_joined=len(job.parties),
            parties_uploaded=job.uploaded(),
        )

    def dropped_undelivered(self, job: Job) -> None:
        self._append(
            "expired_undelivered",
            job_id=job.job_id,
            undelivered=",".join(sorted(p.name for p in job.parties.values() if not p.delivered)),
        )

    def released(
        self, job: Job, parties: Sequence[Party], *, withheld: bool, result_sha256: bytes | None
    ) -> AuditHead | None:
        """Each party's upload and the release; returns the chain's position after them
        (the receipt carries it) or None without a log."""
        for p in parties:
            # What the receipt gives every party, no more (the set digest is salted with a
            # salt only this party gets).
            self._append(
                "uploaded",
                job_id=job.job_id,
                party=p.name,
                records=p.records_received,
                set_sha256=p.set_sha256.hex(),
            )
        self._append(
            "released",
            job_id=job.job_id,
            output=output_kind(job.spec).value,
            threshold_met=not withheld,
            result_sha256=None if result_sha256 is None else result_sha256.hex(),
        )
        return self._audit.position() if self._audit is not None else None

    def delivered(self, job_id: str) -> None:
        self._append("delivered", job_id=job_id)

    def sign_head(self) -> None:
        """A signed head over the chain so far (after a release: it covers the receipt's)."""
        if self._audit is not None:
            try:
                self._audit.sign_head()
            except (OSError, AuditError, SignatureError) as exc:
                log.error("audit log: cannot sign the head: %s", exc)
