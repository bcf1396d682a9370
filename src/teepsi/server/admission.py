"""Who may join a job, and on which terms a new job starts: the registry's join checks.

Every refusal tells the caller no more than it may know of the job (see
:func:`check_joinable`); the registry calls these under its lock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from teepsi.contract.spec import JobSpec
from teepsi.server.errors import ErrorKind, Refusal, ServiceError
from teepsi.server.job import Job, JobState
from teepsi.server.limits import Limits
from teepsi.timefmt import iso_utc

REFUSED_KEY_SETTINGS = "different key settings (--normalize or the number of --key columns)"


def _quick_refusal(job: Job, party_name: str, party_count: int, key_scheme: str) -> str | None:
    """Why a quick-mode job refuses this join (told to the job's parties, not the caller)."""
    if job.state is not JobState.WAITING:
        return f"the job is {job.state.value}"
    if job.party_count != party_count:
        return "different --parties"
    if job.key_scheme != key_scheme:
        return REFUSED_KEY_SETTINGS
    if party_name in job.parties:
        return "its --name was taken"
    if len(job.parties) >= job.party_count:
        return "the job was full"
    return None


def check_joinable(job: Job, party_name: str, party_count: int, key_scheme: str) -> None:
    """Refuse a join the job cannot take, telling no more than the caller may know.

    Under a spec the caller is authenticated as one of the job's listed parties (its
    name, its key's signature over the spec digest): it is told what is wrong. Without
    a spec nobody is authenticated, so every refusal is the same line: it says neither
    the job's state, nor its party count, nor which setting differs.
    """
    if job.spec is None:
        why = _quick_refusal(job, party_name, party_count, key_scheme)
        if why is not None:
            if job.state is JobState.WAITING:
                # The waiting parties learn why a partner did not join (its count only).
                job.refusals[why] += 1
                job.notify_locked()
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                f"cannot join job {job.job_id} as {party_name!r}: a job of that id "
                "takes no such party now (it may be full, running or done, the name may "
                "be taken, or its parties use other --parties or key settings); agree "
                "on --job, --parties, --normalize and --key with the other parties, or "
                "use another --job id",
            )
        return
    if job.state is not JobState.WAITING:
        raise ServiceError(
            ErrorKind.FAILED_PRECONDITION,
            f"job {job.job_id} is {job.state.value} and takes no new parties",
        )
    if party_name in job.parties:
        raise ServiceError(
            ErrorKind.ALREADY_EXISTS,
            f"party {party_name!r} already joined job {job.job_id} (with this party's "
            "key: if that was not you, the key has leaked)",
        )
    if job.key_scheme != key_scheme:
        # A listed party; still, say what differs without revealing the others' value.
        job.refusals[REFUSED_KEY_SETTINGS] += 1
        job.notify_locked()
        raise ServiceError(
            ErrorKind.FAILED_PRECONDITION,
            f"this party's key settings ({key_scheme or 'none'}) differ from job "
            f"{job.job_id}'s: every party must use the same --normalize, the same "
            "number of --key columns and the same teepsi version",
            Refusal.SPEC_MISMATCH,
        )


def refuse_other_spec(
    jobs: Iterable[Job], job_id: str, party_name: str, spec: JobSpec, key_sha256: bytes
) -> None:
    """Tell a listed party that its co-parties run this job id under another spec.

    Only when the other job was created by a party this spec lists (same key) and lists
    this party with this key: then the caller is a party of that job too, and the other
    job is no outsider's (a fake spec naming someone's public key cannot block them; it
    is simply another job).
    """
    own_keys = {hashlib.sha256(p.public_key).digest() for p in spec.parties}
    for job in jobs:
        if job.job_id != job_id or job.spec is None:
            continue
        listed = job.spec.party(party_name)
        if (
            listed is not None
            and hashlib.sha256(listed.public_key).digest() == key_sha256
            and job.creator.key_sha256 in own_keys
        ):
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                f"job {job_id} runs under a different job spec (digest mismatch), "
                "created by one of this spec's parties: every party must join with the "
                "same --spec file (compare the sha256 of `teepsi spec check`)",
                Refusal.SPEC_MISMATCH,
            )


def new_job_terms(
    job_id: str,
    spec: JobSpec | None,
    limits: Limits,
    now: float,
    certificate_not_after: float | None,
) -> tuple[float, int]:
    """A new job's deadline and item limit per party: the server's limits, tightened by
    its spec; refused when its deadline has passed or would outlive the certificate."""
    deadline = now + limits.job_timeout_seconds
    max_items = limits.max_items_per_party
    if spec is not None:
        if spec.deadline is not None:
            if spec.deadline <= now:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"job {job_id}'s deadline {spec.deadline_text()} has passed",
                )
            deadline = min(deadline, float(spec.deadline))
        if spec.max_items_per_party is not None:
            max_items = min(max_items, spec.max_items_per_party)
    if certificate_not_after is not None and deadline > certificate_not_after:
        raise ServiceError(
            ErrorKind.UNAVAILABLE,
            f"the server's certificate ends {iso_utc(certificate_not_after)}, before this "
            "job could finish; the server then restarts with a new one: retry then",
        )
    return deadline, max_items
