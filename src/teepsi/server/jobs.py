"""Jobs and their lifecycle, with no gRPC in sight.

A job is created by its first party's join and lives until every party has its result
or its deadline passes; then all of its state (items, result, sessions) is dropped.
Nothing of one job is reachable from another: each has its own parties, sessions and
waiters. The registry is thread-safe; the gRPC server (on an asyncio event loop) waits for
a result with :meth:`JobRegistry.wait_result_async`, which holds no thread while it waits
and has a deadline: every change of a job's state wakes the job's waiters through their
loops; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from teepsi.contract.audit import AuditError, AuditLog
from teepsi.contract.receipt import PartyEntry, Receipt, SignedReceipt
from teepsi.contract.spec import IDENTIFIER_PATTERN, JobSpec, OutputKind
from teepsi.engine.intersect import records_digests
from teepsi.engine.keys import U64Array
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import (
    MemoryBudget,
    Partitioner,
    RecordStore,
    StoreClosed,
    intersect_stores,
)
from teepsi.server.errors import ErrorKind, ServiceError
from teepsi.server.memory import release_free_memory

log = logging.getLogger(__name__)

#: Why a job ended early (``Job.end_reason``), where the reason chooses the status.
SHUTTING_DOWN = "server shutting down"
DEADLINE_PASSED = "deadline passed"

_ID_PATTERN = IDENTIFIER_PATTERN


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
    #: An upload stream that sends nothing for this long is ended by the server.
    upload_idle_timeout_seconds: float = 60.0


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
    set_sha256: bytes = b""
    #: Salts this party's set digest in the receipt; only this party learns it.
    set_salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    delivered: bool = False


@dataclass
class Job:
    job_id: str
    party_count: int
    created: float
    deadline: float
    parties: dict[str, Party] = field(default_factory=dict)
    key_scheme: str = ""
    key_seeds: bytes = b""
    spec: JobSpec | None = None
    spec_sha256: bytes = b""
    max_items: int = 0
    #: Salts the receipt's result digest; only recipients of the records learn it.
    result_salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    state: JobState = JobState.WAITING
    result: JobResult | None = None
    #: Why the job ended early ("deadline passed", "server shutting down", ...).
    end_reason: str = ""
    #: Wakers of asyncio waiters (each schedules its waiter on its own loop).
    waiters: set[Callable[[], None]] = field(default_factory=set)
    #: Enders of the job's in-flight calls: each is told why when the job ends.
    calls: set[Callable[[ServiceError], None]] = field(default_factory=set)
    #: Splits the parties' records into partitions under a key drawn for this job.
    partitioner: Partitioner = field(default_factory=Partitioner)

    def notify_locked(self) -> None:
        """The job's state changed: wake its waiters."""
        for wake in list(self.waiters):
            wake()

    def uploaded(self) -> int:
        return sum(1 for p in self.parties.values() if p.upload is UploadState.DONE)


@dataclass(frozen=True)
class JobResult:
    """The intersection as key records, sorted; the same for every party."""

    hi: U64Array
    lo: U64Array
    sha256: bytes
    receipt_json: str = ""

    def __len__(self) -> int:
        return len(self.hi)


class ReleaseStatus(Enum):
    """What one party may receive of a job's result (the job spec's release rules)."""

    RELEASED = "released"
    COUNT_ONLY = "count only"
    NOT_RECIPIENT = "not a recipient"
    BELOW_THRESHOLD = "below threshold"


def release_status(spec: JobSpec | None, party: str, size: int) -> ReleaseStatus:
    if spec is None:
        return ReleaseStatus.RELEASED
    if size < spec.min_intersection:
        return ReleaseStatus.BELOW_THRESHOLD
    if spec.output is OutputKind.COUNT:
        return ReleaseStatus.COUNT_ONLY
    if not spec.is_recipient(party):
        return ReleaseStatus.NOT_RECIPIENT
    return ReleaseStatus.RELEASED


@dataclass(frozen=True)
class Delivery:
    """One party's view of a finished job."""

    result: JobResult
    status: ReleaseStatus
    distinct_records: int
    set_salt: bytes
    result_salt: bytes


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


#: Signs a receipt with the server's attested key.
ReceiptSigner = Callable[[Receipt], SignedReceipt]


class JobRegistry:
    """All live jobs of one server. Thread-safe; a result is awaited
    (:meth:`wait_result_async`), holding no thread."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        spill_dir: str | None = None,
        signer: ReceiptSigner | None = None,
        certificate_sha256: bytes = b"",
        audit: AuditLog | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self._clock = clock
        self._signer = signer
        self._certificate_sha256 = certificate_sha256
        self._audit = audit
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

    def _record(self, event: str, **fields: str | int | bool | None) -> None:
        """Append to the audit log: job ids, names, counts and digests, never items."""
        if self._audit is not None:
            try:
                self._audit.append(event, **fields)
            except (OSError, AuditError) as exc:
                log.error("audit log append failed: %s", exc)

    def close(self) -> None:
        """Expire every job (waiters get an error) and stop the reaper."""
        with self._lock:
            self._closed = True
            for job in list(self._jobs.values()):
                self._expire_locked(job, reason=SHUTTING_DOWN)
            self._reaper_wakeup.notify_all()
        self._reaper.join(timeout=5)
        self.spill.close()

    def job_count(self) -> int:
        with self._lock:
            return len(self._jobs)

    def expire_due(self) -> None:
        """Expire every job whose deadline has passed by the registry's clock now (the
        reaper does this at each deadline; a caller whose clock jumps can ask for it)."""
        with self._lock:
            self._expire_due_locked()

    def _expire_due_locked(self) -> None:
        now = self._clock()
        for job in list(self._jobs.values()):
            if job.deadline <= now:
                self._expire_locked(job, reason=DEADLINE_PASSED)

    def _reap_loop(self) -> None:
        with self._lock:
            while not self._closed:
                self._expire_due_locked()
                next_deadline = min((j.deadline for j in self._jobs.values()), default=None)
                timeout = None if next_deadline is None else max(0.0, next_deadline - self._clock())
                self._reaper_wakeup.wait(timeout)

    def _expire_locked(self, job: Job, *, reason: str) -> None:
        job.end_reason = reason
        if job.state is not JobState.DONE:
            log.warning(
                "job %s expired (%s): %d of %d parties had uploaded",
                job.job_id,
                reason,
                job.uploaded(),
                job.party_count,
            )
            job.state = JobState.EXPIRED
            self._record(
                "expired",
                job_id=job.job_id,
                reason=reason,
                parties_joined=len(job.parties),
                parties_uploaded=job.uploaded(),
            )
        elif not all(p.delivered for p in job.parties.values()):
            log.warning(
                "job %s dropped (%s) with results not fetched by every party", job.job_id, reason
            )
            self._record(
                "expired_undelivered",
                job_id=job.job_id,
                undelivered=",".join(
                    sorted(p.name for p in job.parties.values() if not p.delivered)
                ),
            )
        self._drop_locked(job)

    def _drop_locked(self, job: Job) -> None:
        """Forget the job: its sessions, items and result; end its in-flight calls, give its
        memory and spill files back now. Waiters keep only the state."""
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]
        ended = self._end_error_locked(job)
        for end in list(job.calls):
            end(ended)
        job.calls.clear()
        for party in job.parties.values():
            self._sessions.pop(party.token, None)
            if party.store is not None:
                party.store.close()
                party.store = None
        job.result = None
        job.notify_locked()

    # -- joining -------------------------------------------------------------------

    def join(
        self,
        job_id: str,
        party_name: str,
        party_count: int,
        key_scheme: str = "",
        *,
        spec: JobSpec | None = None,
        attested: bool = False,
    ) -> JoinOutcome:
        """Add a party to a job, creating the job (from ``spec`` when given) on first join.

        The caller has already authenticated the party against ``spec`` (listed name, its
        key's signature, attestation where required).
        """
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
                deadline = now + self.limits.job_timeout_seconds
                max_items = self.limits.max_items_per_party
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
                job = Job(
                    job_id=job_id,
                    party_count=party_count,
                    created=now,
                    deadline=deadline,
                    key_scheme=key_scheme,
                    key_seeds=secrets.token_bytes(16),
                    spec=spec,
                    spec_sha256=spec.digest() if spec is not None else b"",
                    max_items=max_items,
                )
                self._jobs[job_id] = job
                self._reaper_wakeup.notify_all()
                log.info("job %s created for %d parties", job_id, party_count)
                self._record(
                    "created",
                    job_id=job_id,
                    parties=party_count,
                    spec_sha256=job.spec_sha256.hex() or None,
                    output=spec.output.value if spec is not None else "intersection",
                    deadline=int(deadline),
                )
            claimed = spec.digest() if spec is not None else b""
            if job.spec_sha256 != claimed:
                # Only the fact of a mismatch: nothing of the job's spec leaks.
                if job.spec_sha256 and claimed:
                    problem = "runs under a different job spec (digest mismatch): every party "
                    problem += "must join with the same --spec file"
                elif job.spec_sha256:
                    problem = "runs under a job spec: pass --spec"
                else:
                    problem = "has no job spec: join without --spec"
                raise ServiceError(ErrorKind.FAILED_PRECONDITION, f"job {job_id} {problem}")
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
            self._record("joined", job_id=job_id, party=party_name, attested=attested)
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

    def _end_error_locked(self, job: Job) -> ServiceError:
        """What a call of an ended job is told: why it ended, and what to do."""
        if job.end_reason == SHUTTING_DOWN:
            return ServiceError(
                ErrorKind.UNAVAILABLE,
                f"server shutting down: job {job.job_id} was dropped; run every party again",
            )
        if job.end_reason == DEADLINE_PASSED:
            return ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                f"job {job.job_id} expired: {job.uploaded()} of {job.party_count} parties "
                "uploaded before its deadline",
            )
        return ServiceError(
            ErrorKind.CANCELLED, f"job {job.job_id} has ended ({job.end_reason or 'finished'})"
        )

    def watch_call(self, token: bytes, end: Callable[[ServiceError], None]) -> Callable[[], None]:
        """Have ``end`` told (once, from whichever thread ends it) when the token's job
        ends; returns what stops the watch. ``end`` must not block: the registry is locked."""
        with self._lock:
            job, _party = self._lookup_locked(token)
            job.calls.add(end)

        def unwatch() -> None:
            with self._lock:
                job.calls.discard(end)

        return unwatch

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

    def begin_upload(self, token: bytes) -> tuple[str, str, RecordStore, int]:
        """Claim the party's single upload: (job id, party, its record store, item limit)."""
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
            party.store = RecordStore(self.budget, self.spill, job.partitioner, salt=party.set_salt)
            return job.job_id, party.name, party.store, job.max_items

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
                if not job.parties:
                    # Nobody left: free the job (and its --max-jobs slot) now.
                    log.info("job %s has no parties left; dropped", job.job_id)
                    job.end_reason = "no parties left"
                    self._drop_locked(job)
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
        try:
            found = intersect_stores(stores)
        except StoreClosed:
            with self._lock:  # the job ended meanwhile, and took its stores with it
                raise self._end_error_locked(job) from None
        digest, salted_digest = records_digests(found.hi, found.lo, [b"", job.result_salt])
        receipt = self._receipt(job, parties, found.set_sha256, len(found.hi), salted_digest)
        result = JobResult(hi=found.hi, lo=found.lo, sha256=digest, receipt_json=receipt)
        with self._lock:
            if job.state is not JobState.COMPUTING:
                return  # expired while computing
            job.result = result
            job.state = JobState.DONE
            for p, count, set_digest in zip(parties, found.distinct, found.set_sha256, strict=True):
                p.distinct_records = count
                p.set_sha256 = set_digest
                if p.store is not None:
                    p.store.close()
                    p.store = None
                self._record(
                    "uploaded",
                    job_id=job.job_id,
                    party=p.name,
                    records=p.records_received,
                    distinct=count,
                    set_sha256=set_digest.hex(),
                )
            withheld = release_status(job.spec, "", len(result)) is ReleaseStatus.BELOW_THRESHOLD
            self._record(
                "released",
                job_id=job.job_id,
                output=job.spec.output.value if job.spec is not None else "intersection",
                threshold_met=not withheld,
                result_size=None if withheld else len(result),
                result_sha256=None if withheld else digest.hex(),
            )
            log.info(
                "job %s: intersection of %d parties has %d records",
                job.job_id,
                job.party_count,
                len(result),
            )
            job.notify_locked()
        release_free_memory()  # the parties' stores are gone: return their pages

    def _receipt(
        self,
        job: Job,
        parties: list[Party],
        set_digests: list[bytes],
        size: int,
        salted_result_sha256: bytes,
    ) -> str:
        """The signed receipt every party gets (empty if the server has no signer)."""
        if self._signer is None:
            return ""
        withheld = release_status(job.spec, "", size) is ReleaseStatus.BELOW_THRESHOLD
        count_only = job.spec is not None and job.spec.output is OutputKind.COUNT
        receipt = Receipt(
            spec_sha256=job.spec_sha256,
            job_id=job.job_id,
            parties=tuple(
                PartyEntry(name=p.name, items=p.records_received, set_sha256=d)
                for p, d in sorted(zip(parties, set_digests, strict=True), key=lambda x: x[0].name)
            ),
            output=job.spec.output.value if job.spec is not None else "intersection",
            released=not withheld,
            result_size=None if withheld else size,
            result_sha256=None if withheld or count_only else salted_result_sha256,
            issued_at=int(self._clock()),
            certificate_sha256=self._certificate_sha256,
        )
        return self._signer(receipt).to_json()

    # -- results -------------------------------------------------------------------

    async def wait_result_async(self, token: bytes, *, timeout: float | None) -> Delivery:
        """Await the result without holding a thread (asyncio; no polling); the caller's view.

        Whatever changes the job's state (the last upload, expiry, shutdown) wakes the wait
        through the caller's event loop; a cancelled caller simply stops waiting.
        """
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(woken.set)

        with self._lock:
            job, party, give_up = self._begin_wait_locked(token, timeout)
            job.waiters.add(wake)
        try:
            while True:
                with self._lock:
                    if job.state not in (JobState.WAITING, JobState.COMPUTING):
                        break
                    remaining = give_up - self._clock()
                    if remaining <= 0:
                        break
                    woken.clear()  # under the lock: no wake-up after this is lost
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), remaining)
            with self._lock:
                return self._end_wait_locked(job, party)
        finally:
            with self._lock:
                job.waiters.discard(wake)

    def _begin_wait_locked(self, token: bytes, timeout: float | None) -> tuple[Job, Party, float]:
        """The caller's job and party, and when its wait gives up."""
        job, party = self._lookup_locked(token)
        if party.upload is not UploadState.DONE:
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                f"party {party.name} has not uploaded its set for job {job.job_id}",
            )
        give_up = job.deadline if timeout is None else min(job.deadline, self._clock() + timeout)
        return job, party, give_up

    def _end_wait_locked(self, job: Job, party: Party) -> Delivery:
        """After a wait: the party's view of the result, or why there is none."""
        if job.state is JobState.DONE and job.result is not None:
            return Delivery(
                result=job.result,
                status=release_status(job.spec, party.name, len(job.result)),
                distinct_records=party.distinct_records,
                set_salt=party.set_salt,
                result_salt=job.result_salt,
            )
        if job.state is JobState.WAITING and self._clock() >= job.deadline:
            # The reaper may not have run yet; the deadline is the deadline.
            self._expire_locked(job, reason=DEADLINE_PASSED)
        if job.state is JobState.EXPIRED:
            raise self._end_error_locked(job)
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
                self._jobs[session.job_id].notify_locked()

    def mark_delivered(self, token: bytes) -> None:
        """Record that the party has its whole result; the last delivery frees the job."""
        wiped = False
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return
            job = self._jobs[session.job_id]
            job.parties[session.party_name].delivered = True
            if all(p.delivered for p in job.parties.values()):
                log.info("job %s: every party has its result; job state wiped", job.job_id)
                self._record("delivered", job_id=job.job_id)
                job.end_reason = "every party has its result"
                self._drop_locked(job)
                wiped = True
        if wiped:
            release_free_memory()  # the result is gone too

    def snapshot(self) -> Iterable[tuple[str, str, int, int]]:
        """(job id, state, parties joined, party count) for operators; no items."""
        with self._lock:
            return [
                (j.job_id, j.state.value, len(j.parties), j.party_count)
                for j in self._jobs.values()
            ]
