"""Jobs and their lifecycle, with no gRPC in sight.

A job is created by its first party's join and lives until every party has its result
or its deadline passes; then all of its state (items, result, sessions) is dropped.
Nothing of one job is reachable from another: each has its own parties, sessions and
condition variable. Every wait is a condition wait with a deadline; nothing polls.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from teepsi.engine.intersect import records_digest
from teepsi.engine.keys import U64Array
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import MemoryBudget, RecordStore, intersect_stores
from teepsi.server.errors import ErrorKind, ServiceError

log = logging.getLogger(__name__)

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


def check_identifier(value: str, what: str) -> None:
    """Job ids and party names: 1-128 of letters, digits and . _ @ -, not starting with a sign."""
    if not _ID_PATTERN.fullmatch(value):
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"{what} {value[:40]!r} is invalid: use 1-128 letters, digits, '.', '_', '@' or '-'",
        )


@dataclass(frozen=True)
class Limits:
    """Documented service limits; each refusal names the limit it hit."""

    max_jobs: int = 256
    max_parties_per_job: int = 256
    max_items_per_party: int = 100_000_000
    job_timeout_seconds: float = 600.0
    #: Bytes of key records held in memory across all jobs; beyond it they spill to disk.
    memory_budget_bytes: int = 1024**3


class JobState(Enum):
    WAITING = "waiting for parties"
    COMPUTING = "computing"
    DONE = "done"
    EXPIRED = "expired"


class UploadState(Enum):
    NONE = "none"
    IN_PROGRESS = "in progress"
    DONE = "done"


@dataclass
class Party:
    name: str
    token: bytes
    upload: UploadState = UploadState.NONE
    store: RecordStore | None = None
    records_received: int = 0
    distinct_records: int = 0
    delivered: bool = False


@dataclass
class Job:
    job_id: str
    party_count: int
    created: float
    deadline: float
    cond: threading.Condition
    parties: dict[str, Party] = field(default_factory=dict)
    key_scheme: str = ""
    key_seeds: bytes = b""
    state: JobState = JobState.WAITING
    result: JobResult | None = None

    def uploaded(self) -> int:
        return sum(1 for p in self.parties.values() if p.upload is UploadState.DONE)


@dataclass(frozen=True)
class JobResult:
    """The intersection as key records, sorted; the same for every party."""

    hi: U64Array
    lo: U64Array
    sha256: bytes

    def __len__(self) -> int:
        return len(self.hi)


@dataclass(frozen=True)
class Session:
    job_id: str
    party_name: str


@dataclass(frozen=True)
class JoinOutcome:
    token: bytes
    deadline: float
    party_count: int
    key_seeds: bytes


class JobRegistry:
    """All live jobs of one server. Thread-safe; waits are condition waits."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        spill_dir: str | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self._clock = clock
        self.budget = MemoryBudget(self.limits.memory_budget_bytes)
        self.spill = SpillArea(spill_dir)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._sessions: dict[bytes, Session] = {}
        self._reaper_wakeup = threading.Condition(self._lock)
        self._closed = False
        self._reaper = threading.Thread(
            target=self._reap_loop, name="teepsi-job-reaper", daemon=True
        )
        self._reaper.start()

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Expire every job (waiters get an error) and stop the reaper."""
        with self._lock:
            self._closed = True
            for job in list(self._jobs.values()):
                self._expire_locked(job, reason="server shutting down")
            self._reaper_wakeup.notify_all()
        self._reaper.join(timeout=5)
        self.spill.close()

    def job_count(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _reap_loop(self) -> None:
        with self._lock:
            while not self._closed:
                now = self._clock()
                for job in list(self._jobs.values()):
                    if job.deadline <= now:
                        self._expire_locked(job, reason="deadline passed")
                next_deadline = min((j.deadline for j in self._jobs.values()), default=None)
                timeout = None if next_deadline is None else max(0.0, next_deadline - self._clock())
                self._reaper_wakeup.wait(timeout)

    def _expire_locked(self, job: Job, *, reason: str) -> None:
        if job.state is not JobState.DONE:
            log.warning(
                "job %s expired (%s): %d of %d parties had uploaded",
                job.job_id,
                reason,
                job.uploaded(),
                job.party_count,
            )
            job.state = JobState.EXPIRED
        self._drop_locked(job)

    def _drop_locked(self, job: Job) -> None:
        """Forget the job: its sessions, items and result. Waiters keep only the state."""
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]
        for party in job.parties.values():
            self._sessions.pop(party.token, None)
            if party.store is not None:
                party.store.close()
                party.store = None
        job.result = None
        job.cond.notify_all()

    # -- joining -------------------------------------------------------------------

    def join(
        self, job_id: str, party_name: str, party_count: int, key_scheme: str = ""
    ) -> JoinOutcome:
        check_identifier(job_id, "job id")
        check_identifier(party_name, "party name")
        most = self.limits.max_parties_per_job
        if party_count < 1 or party_count > most:
            raise ServiceError(
                ErrorKind.INVALID_ARGUMENT,
                f"party count {party_count} is out of range: 1 to {most}",
            )
        with self._lock:
            if self._closed:
                raise ServiceError(ErrorKind.FAILED_PRECONDITION, "server is shutting down")
            job = self._jobs.get(job_id)
            if job is None:
                if len(self._jobs) >= self.limits.max_jobs:
                    raise ServiceError(
                        ErrorKind.RESOURCE_EXHAUSTED,
                        f"server already runs {self.limits.max_jobs} jobs (the limit); retry later",
                    )
                now = self._clock()
                job = Job(
                    job_id=job_id,
                    party_count=party_count,
                    created=now,
                    deadline=now + self.limits.job_timeout_seconds,
                    cond=threading.Condition(self._lock),
                    key_scheme=key_scheme,
                    key_seeds=secrets.token_bytes(16),
                )
                self._jobs[job_id] = job
                self._reaper_wakeup.notify_all()
                log.info("job %s created for %d parties", job_id, party_count)
            if job.state is not JobState.WAITING:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"job {job_id} is {job.state.value} and takes no new parties; "
                    "use another --job id or wait for it to finish",
                )
            if job.party_count != party_count:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"job {job_id} was created for {job.party_count} parties, not {party_count}; "
                    "every party must pass the same --parties",
                )
            if job.key_scheme != key_scheme:
                # Say what differs without revealing the other parties' settings.
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"this party's key settings ({key_scheme or 'none'}) differ from job "
                    f"{job_id}'s: every party must use the same --normalize, the same number "
                    "of --key columns and the same teepsi version",
                )
            if party_name in job.parties:
                raise ServiceError(
                    ErrorKind.ALREADY_EXISTS,
                    f"party name {party_name!r} is already taken in job {job_id}",
                )
            if len(job.parties) >= job.party_count:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"job {job_id} already has all {job.party_count} parties",
                )
            token = secrets.token_bytes(32)
            job.parties[party_name] = Party(name=party_name, token=token)
            self._sessions[token] = Session(job_id, party_name)
            log.info(
                "job %s: party %s joined (%d/%d)",
                job_id,
                party_name,
                len(job.parties),
                job.party_count,
            )
            return JoinOutcome(
                token=token,
                deadline=job.deadline,
                party_count=job.party_count,
                key_seeds=job.key_seeds,
            )

    def _lookup_locked(self, token: bytes) -> tuple[Job, Party]:
        session = self._sessions.get(token)
        if session is None:
            raise ServiceError(
                ErrorKind.UNAUTHENTICATED,
                "unknown or expired session: join the job first (the job may have ended)",
            )
        job = self._jobs[session.job_id]
        return job, job.parties[session.party_name]

    # -- uploading -----------------------------------------------------------------

    def begin_upload(self, token: bytes) -> tuple[str, str, RecordStore]:
        """Claim the party's single upload; returns (job id, party name, its record store)."""
        with self._lock:
            job, party = self._lookup_locked(token)
            if party.upload is not UploadState.NONE:
                raise ServiceError(
                    ErrorKind.ALREADY_EXISTS,
                    f"party {party.name} already uploaded its set for job {job.job_id}; "
                    "a party uploads once",
                )
            if job.state is not JobState.WAITING:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION, f"job {job.job_id} is {job.state.value}"
                )
            party.upload = UploadState.IN_PROGRESS
            party.store = RecordStore(self.budget, self.spill)
            return job.job_id, party.name, party.store

    def abort_upload(self, token: bytes) -> None:
        """A broken upload frees the party's slot so a restarted provider can rejoin."""
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return
            job = self._jobs[session.job_id]
            party = job.parties[session.party_name]
            if party.upload is UploadState.IN_PROGRESS and job.state is JobState.WAITING:
                if party.store is not None:
                    party.store.close()
                del job.parties[party.name]
                del self._sessions[token]
                log.warning(
                    "job %s: upload of party %s broke off; its slot is free again",
                    job.job_id,
                    party.name,
                )

    def finish_upload(self, token: bytes) -> None:
        """The party's upload is complete; the last one computes the intersection."""
        with self._lock:
            job, party = self._lookup_locked(token)
            if job.state is not JobState.WAITING or party.upload is not UploadState.IN_PROGRESS:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION, f"job {job.job_id} is {job.state.value}"
                )
            assert party.store is not None
            party.store.finish()
            party.records_received = party.store.records
            party.upload = UploadState.DONE
            log.info(
                "job %s: party %s uploaded %d records%s",
                job.job_id,
                party.name,
                party.records_received,
                " (spilled to disk, encrypted)" if party.store.spilled else "",
            )
            if len(job.parties) < job.party_count or job.uploaded() < job.party_count:
                return
            job.state = JobState.COMPUTING
            parties = list(job.parties.values())
            stores = [p.store for p in parties if p.store is not None]
        # Compute without the lock: other jobs keep moving meanwhile.
        hi, lo, distinct = intersect_stores(stores)
        result = JobResult(hi=hi, lo=lo, sha256=records_digest(hi, lo))
        with self._lock:
            if job.state is not JobState.COMPUTING:
                return  # expired while computing
            job.result = result
            job.state = JobState.DONE
            for p, count in zip(parties, distinct, strict=True):
                p.distinct_records = count
                if p.store is not None:
                    p.store.close()
                    p.store = None
            log.info(
                "job %s: intersection of %d parties has %d records",
                job.job_id,
                job.party_count,
                len(result),
            )
            job.cond.notify_all()

    # -- results -------------------------------------------------------------------

    def wait_result(
        self,
        token: bytes,
        *,
        timeout: float | None,
        is_active: Callable[[], bool] = lambda: True,
    ) -> tuple[JobResult, int]:
        """Block (condition wait, no polling) until the result exists.

        Returns the result and the distinct records the caller uploaded.
        """
        with self._lock:
            job, party = self._lookup_locked(token)
            if party.upload is not UploadState.DONE:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"party {party.name} has not uploaded its set for job {job.job_id}",
                )
            give_up = (
                job.deadline if timeout is None else min(job.deadline, self._clock() + timeout)
            )
            while job.state in (JobState.WAITING, JobState.COMPUTING) and is_active():
                remaining = give_up - self._clock()
                if remaining <= 0:
                    break
                job.cond.wait(remaining)
            if job.state is JobState.DONE and job.result is not None:
                return job.result, party.distinct_records
            if not is_active():
                raise ServiceError(ErrorKind.CANCELLED, "caller went away")
            if job.state is JobState.WAITING and self._clock() >= job.deadline:
                # The reaper may not have run yet; the deadline is the deadline.
                self._expire_locked(job, reason="deadline passed")
            if job.state is JobState.EXPIRED:
                raise ServiceError(
                    ErrorKind.DEADLINE_EXCEEDED,
                    f"job {job.job_id} expired: {job.uploaded()} of {job.party_count} parties "
                    "uploaded before its deadline",
                )
            raise ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                f"timed out waiting for job {job.job_id}: {job.uploaded()} of "
                f"{job.party_count} parties have uploaded",
            )

    def wake(self, token: bytes) -> None:
        """Wake waiters of the token's job (used when a caller cancels)."""
        with self._lock:
            session = self._sessions.get(token)
            if session is not None and session.job_id in self._jobs:
                self._jobs[session.job_id].cond.notify_all()

    def mark_delivered(self, token: bytes) -> None:
        """Record that the party has its whole result; the last delivery frees the job."""
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return
            job = self._jobs[session.job_id]
            job.parties[session.party_name].delivered = True
            if all(p.delivered for p in job.parties.values()):
                log.info("job %s: every party has its result; job state wiped", job.job_id)
                self._drop_locked(job)

    def snapshot(self) -> Iterable[tuple[str, str, int, int]]:
        """(job id, state, parties joined, party count) for operators; no items."""
        with self._lock:
            return [
                (j.job_id, j.state.value, len(j.parties), j.party_count)
                for j in self._jobs.values()
            ]
