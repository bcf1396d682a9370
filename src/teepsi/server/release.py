"""Release of a job's result: what each party may receive under the job spec's release
rules, and the signed receipt every party gets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from teepsi.contract.audit import AuditHead
from teepsi.contract.receipt import PartyEntry, Receipt, SignedReceipt
from teepsi.contract.spec import JobSpec, OutputKind
from teepsi.engine.result import SortedResult
from teepsi.server.job import Job, JobResult, Party

#: Signs a receipt with the server's attested key.
ReceiptSigner = Callable[[Receipt], SignedReceipt]


class ReleaseStatus(Enum):
    """What one party may receive of a job's result (the job spec's release rules)."""

    RELEASED = "released"
    COUNT_ONLY = "count only"
    NOT_RECIPIENT = "not a recipient"
    BELOW_THRESHOLD = "below threshold"


def output_kind(spec: JobSpec | None) -> OutputKind:
    """What a job computes: its spec's output; without a spec, the intersection."""
    return spec.output if spec is not None else OutputKind.INTERSECTION


def release_status(spec: JobSpec | None, party: str, size: int) -> ReleaseStatus:
    """``party``'s share of a result of ``size`` records ("" asks only about the threshold)."""
    if spec is None:
        return ReleaseStatus.RELEASED
    if size < spec.min_intersection:
        return ReleaseStatus.BELOW_THRESHOLD
    if spec.output is OutputKind.COUNT:
        return ReleaseStatus.COUNT_ONLY
    if not spec.is_recipient(party):
        return ReleaseStatus.NOT_RECIPIENT
    return ReleaseStatus.RELEASED


def is_withheld(spec: JobSpec | None, size: int) -> bool:
    """Below the spec's threshold: no party gets the records or even the size."""
    return release_status(spec, "", size) is ReleaseStatus.BELOW_THRESHOLD


def result_salts(job: Job) -> list[bytes]:
    """The salts the result is digested under as it is merged, for :func:`result_digests`."""
    return [b"", job.result_salt]


def result_digests(job: Job, result: SortedResult) -> tuple[bytes, bytes | None]:
    """The result's SHA-256 (for the parties' check) and the receipt's result digest:
    salted, since only recipients of the records get the salt; None when no party gets
    the records (below the threshold, or a count job). ``result`` was digested under
    :func:`result_salts`."""
    digest, salted = result.sha256_per_salt
    if is_withheld(job.spec, len(result)) or output_kind(job.spec) is OutputKind.COUNT:
        return digest, None
    return digest, salted


@dataclass(frozen=True)
class Delivery:
    """One party's view of a finished job."""

    result: JobResult
    status: ReleaseStatus
    distinct_records: int
    set_salt: bytes
    result_salt: bytes


def delivery_for(job: Job, party: Party, result: JobResult) -> Delivery:
    return Delivery(
        result=result,
        status=release_status(job.spec, party.name, len(result)),
        distinct_records=party.distinct_records,
        set_salt=party.set_salt,
        result_salt=job.result_salt,
    )


@dataclass(frozen=True)
class ReceiptIssuer:
    """Who signs receipts: the server's attested key, its certificate and its TEE."""

    sign: ReceiptSigner
    certificate_sha256: bytes
    #: The TEE of the signing key (SGX or TDX), written into each receipt.
    tee: str

    def issue(
        self,
        job: Job,
        parties: Sequence[Party],
        size: int,
        result_sha256: bytes | None,
        audit_head: AuditHead | None,
        issued_at: float,
    ) -> str:
        """The signed receipt of a finished job (each party's set digest is already set)."""
        withheld = is_withheld(job.spec, size)
        receipt = Receipt(
            spec_sha256=job.spec_sha256,
            job_id=job.job_id,
            parties=tuple(
                PartyEntry(name=p.name, items=p.records_received, set_sha256=p.set_sha256)
                for p in sorted(parties, key=lambda p: p.name)
            ),
            output=output_kind(job.spec),
            released=not withheld,
            result_size=None if withheld else size,
            result_sha256=result_sha256,
            issued_at=int(issued_at),
            certificate_sha256=self.certificate_sha256,
            tee=self.tee,
            audit_head=audit_head,
        )
        return self.sign(receipt).to_json()
