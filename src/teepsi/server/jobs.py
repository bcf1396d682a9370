"""The job registry: every live job of one server and its lifecycle, with no gRPC in sight.

A job is created by its first party's join and lives until every party has its result
or its deadline passes (or, if no party starts an upload, until the join timeout); then
all of its state (items, result, sessions) is dropped.
Nothing of one job is reachable from another: each has its own parties, sessions and
waiters. The registry is thread-safe; the gRPC server (on an asyncio event loop) waits for
a result with :meth:`JobRegistry.wait_result_async`, which holds no thread while it waits
and has a deadline: every change of a job's state wakes the job's waiters through their
loops; nothing polls.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable

from teepsi.contract.audit import AuditLog
from teepsi.contract.spec import JobSpec
from teepsi.engine.result import intersect_stores
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import MemoryBudget, RecordStore, StoreClosed
from teepsi.memory import release_free_memory
from teepsi.protocol.chunks import RECORDS_PER_CHUNK
from teepsi.server.admission import check_joinable, new_job_terms, refuse_other_spec
from teepsi.server.errors import ErrorKind, ServiceError
from teepsi.server.job import (
    DEADLINE_PASSED,
    NO_UPLOAD,
    PHASE,
    SHUTTING_DOWN,
    UPLOAD_BROKE_OFF,
    Job,
    JobKey,
    JobProgress,
    JobResult,
    JobState,
    Party,
    UploadState,
    check_identifier,
)
from teepsi.server.job_audit import JobAuditTrail
from teepsi.server.limits import NO_CREATOR, JobCreator, Limits, check_quota
from teepsi.server.metrics import JobCounts, ServerMetrics
from teepsi.server.release import (
    Delivery,
    ReceiptIssuer,
    delivery_for,
    is_withheld,
    result_digests,
    result_salts,
)
from teepsi.server.sessions import JoinOutcome, Sessions

log = logging.getLogger(__name__)


class JobRegistry:
    """All live jobs of one server. Thread-safe; a result is awaited
    (:meth:`wait_result_async`), holding no thread."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        spill_dir: str | None = None,
        receipts: ReceiptIssuer | None = None,
        audit: AuditLog | None = None,
        certificate_not_after: float | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.metrics = metrics or ServerMetrics()
        #: When the server's certificate ends (UNIX seconds): no job may outlive it, since
        #: the server stops then and would take the job with it.
        self._certificate_not_after = certificate_not_after
        self._clock = clock
        #: Signs each finished job's receipt; None = no receipts (in-process callers).
        self._receipts = receipts
        self._trail = JobAuditTrail(audit)
        self.budget = MemoryBudget(
            self.limits.memory_budget_bytes, runtime_bytes=self.limits.memory_runtime_bytes
        )
        self.spill = SpillArea(spill_dir)
        self._lock = threading.Lock()
        self._jobs: dict[JobKey, Job] = {}
        self._sessions = Sessions()
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
            self._closed = self._sessions.closed = True
            for job in list(self._jobs.values()):
                self._expire_locked(job, reason=SHUTTING_DOWN)
            self._reaper_wakeup.notify_all()
        self._reaper.join(timeout=5)
        self.spill.close()

    def counts(self) -> JobCounts:
        """Counts over all jobs for the metrics: no id, name or per-job size."""
        with self._lock:
            jobs = list(self._jobs.values())
        by_phase = Counter(PHASE[job.state] for job in jobs)
        waiting = sum(len(job.parties) for job in jobs if job.state is not JobState.DONE)
        return JobCounts(
            by_phase=dict(by_phase),
            parties_waiting=waiting,
            # The runtime's share too: held over budget then says how full it is.
            memory_held_bytes=self.budget.held + self.budget.runtime_bytes,
            memory_budget_bytes=self.budget.limit_bytes,
            spill_written_bytes=self.spill.bytes_written,
        )

    def _expire_due_locked(self) -> None:
        now = self._clock()
        join_timeout = self.limits.join_timeout_seconds
        for job in list(self._jobs.values()):
            if job.deadline <= now:
                self._expire_locked(job, reason=DEADLINE_PASSED)
            elif job.reap_at(join_timeout) <= now:
                self._expire_locked(job, reason=NO_UPLOAD)

    def _reap_loop(self) -> None:
        with self._lock:
            while not self._closed:
                self._expire_due_locked()
                join_timeout = self.limits.join_timeout_seconds
                next_deadline = min(
                    (j.reap_at(join_timeout) for j in self._jobs.values()), default=None
                )
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
            self._trail.expired(job, reason)
        elif not all(p.delivered for p in job.parties.values()):
            log.warning(
                "job %s dropped (%s) with results not fetched by every party", job.job_id, reason
            )
            self._trail.dropped_undelivered(job)
        self._drop_locked(job)

    def _drop_locked(self, job: Job) -> None:
        """Forget the job: its sessions, items and result; end its in-flight calls, give its
        memory and spill files back now. Waiters keep only the state."""
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        ended = job.end_error()
        for end in list(job.calls):
            end(ended)
        job.calls.clear()
        for party in job.parties.values():
            self._sessions.end(party.token)
            if party.store is not None:
                party.store.close()
                party.store = None
        if job.result is not None:
            job.result.records.close()  # a stream still reading it ends (its call is ended)
            job.result = None
        job.notify_locked()

    # -- joining -------------------------------------------------------------------

    def _create_locked(
        self,
        job_id: str,
        party_count: int,
        key_scheme: str,
        spec: JobSpec | None,
        spec_sha256: bytes,
        creator: JobCreator,
    ) -> Job:
        if len(self._jobs) >= self.limits.max_jobs:
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"server already runs {self.limits.max_jobs} jobs (the limit); retry later",
            )
        check_quota((j.creator for j in self._jobs.values()), creator, self.limits)
        now = self._clock()
        deadline, max_items = new_job_terms(
            job_id, spec, self.limits, now, self._certificate_not_after
        )
        job = Job(
            job_id=job_id,
            party_count=party_count,
            created=now,
            deadline=deadline,
            creator=creator,
            key_scheme=key_scheme,
            key_seeds=secrets.token_bytes(16),
            spec=spec,
            spec_sha256=spec_sha256,
            max_items=max_items,
        )
        self._jobs[job.key] = job
        self._reaper_wakeup.notify_all()
        log.info("job %s created for %d parties", job_id, party_count)
        self._trail.created(job)
        return job

    def join(
        self,
        job_id: str,
        party_name: str,
        party_count: int,
        key_scheme: str = "",
        *,
        spec: JobSpec | None = None,
        attested: bool = False,
        creator: JobCreator = NO_CREATOR,
    ) -> JoinOutcome:
        """Add a party to a job, creating the job (from ``spec`` when given) on first join.

        The caller has already authenticated the party against ``spec`` (listed name, its
        key's signature, attestation where required). ``creator`` is charged for the job
        if this join creates it.
        """
        check_identifier(job_id, "job id")
        check_identifier(party_name, "party name")
        most = self.limits.max_parties_per_job
        if party_count < 1 or party_count > most:
            raise ServiceError(
                ErrorKind.INVALID_ARGUMENT,
                f"party count {party_count} is out of range: 1 to {most}",
            )
        spec_sha256 = spec.digest() if spec is not None else b""
        with self._lock:
            if self._closed:
                raise ServiceError(ErrorKind.FAILED_PRECONDITION, "server is shutting down")
            job = self._jobs.get((job_id, spec_sha256))
            if job is None:
                if spec is not None:
                    refuse_other_spec(
                        self._jobs.values(), job_id, party_name, spec, creator.key_sha256
                    )
                job = self._create_locked(
                    job_id, party_count, key_scheme, spec, spec_sha256, creator
                )
            check_joinable(job, party_name, party_count, key_scheme)
            job.parties[party_name] = Party(name=party_name, token=b"")
            outcome = self._sessions.issue(job, job.parties[party_name])
            self._trail.joined(job_id, party_name, attested=attested)
            job.notify_locked()  # progress watchers see the new party
            log.info(
                "job %s: party %s joined (%d/%d)",
                job_id,
                party_name,
                len(job.parties),
                job.party_count,
            )
            return outcome

    def resume(self, job_id: str, party_name: str, *, spec: JobSpec) -> JoinOutcome:
        """A new session for a party that joined and uploaded before (its client restarted).

        Only under a job spec, and the caller has authenticated the party as for a join
        (its listed key signed a fresh transcript, attestation where required). The old
        session ends; the party's slot, upload and result stay as they are.
        """
        check_identifier(job_id, "job id")
        check_identifier(party_name, "party name")
        with self._lock:
            job = self._jobs.get((job_id, spec.digest()))
            party = job.parties.get(party_name) if job is not None else None
            if job is None or party is None:
                raise ServiceError(
                    ErrorKind.NOT_FOUND,
                    f"job {job_id} holds no upload of party {party_name} to resume (the job "
                    "may have ended or never started): run the party without --resume",
                )
            if party.upload is not UploadState.DONE:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    f"party {party_name} has not finished its upload for job {job_id}: "
                    "nothing to resume; run the party without --resume once it broke off",
                )
            outcome = self._sessions.issue(job, party)
            self._trail.resumed(job_id, party_name)
            log.info("job %s: party %s resumed its session", job_id, party_name)
            return outcome

    def watch_call(self, token: bytes, end: Callable[[ServiceError], None]) -> Callable[[], None]:
        """Have ``end`` told (once, from whichever thread ends it) when the token's job
        ends; returns what stops the watch. ``end`` must not block: the registry is locked."""
        with self._lock:
            job, _party = self._sessions.lookup(token, self._jobs)
            job.calls.add(end)

        def unwatch() -> None:
            with self._lock:
                job.calls.discard(end)

        return unwatch

    # -- uploading -----------------------------------------------------------------

    def begin_upload(self, token: bytes) -> tuple[str, str, RecordStore, int]:
        """Claim the party's single upload: (job id, party, its record store, item limit)."""
        with self._lock:
            job, party = self._sessions.lookup(token, self._jobs)
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
            found = self._sessions.find(token, self._jobs)
            if found is None:
                return
            job, party = found
            if party.upload is UploadState.IN_PROGRESS and job.state is JobState.WAITING:
                if party.store is not None:
                    party.store.close()
                del job.parties[party.name]
                job.departed[party.name] = UPLOAD_BROKE_OFF
                self._sessions.end(token)
                job.notify_locked()  # progress watchers see the slot free again
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
            job, party = self._sessions.lookup(token, self._jobs)
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
                job.notify_locked()  # progress watchers see the upload
                return
            job.state = JobState.COMPUTING
            parties = list(job.parties.values())
            stores = [p.store for p in parties if p.store is not None]
        # Compute without the lock: other jobs keep moving meanwhile.
        started = time.monotonic()
        try:
            # Merged once into wire-sized chunks, digested as made, sent as they are to all.
            found = intersect_stores(
                stores,
                spill=self.spill,
                chunk_records=RECORDS_PER_CHUNK,
                salts=result_salts(job),
            )
        except StoreClosed:
            with self._lock:  # the job ended meanwhile, and took its stores with it
                raise job.end_error() from None
        digest, result_sha256 = result_digests(job, found.result)
        size = len(found.result)
        withheld = is_withheld(job.spec, size)
        with self._lock:
            if job.state is not JobState.COMPUTING:
                found.result.close()
                return  # expired while computing
            for p, count, set_digest in zip(parties, found.distinct, found.set_sha256, strict=True):
                p.distinct_records = count
                p.set_sha256 = set_digest
                if p.store is not None:
                    p.store.close()
                    p.store = None
            # No size: the host is no party of the job, and a withheld size is nobody's.
            # The receipt carries the chain up to this release, and a signed head covers it.
            audit_head = self._trail.released(
                job, parties, withheld=withheld, result_sha256=result_sha256
            )
            receipt = (
                self._receipts.issue(job, parties, size, result_sha256, audit_head, self._clock())
                if self._receipts is not None
                else ""
            )
            self._trail.sign_head()
            job.result = JobResult(records=found.result, sha256=digest, receipt_json=receipt)
            job.state = JobState.DONE
            self.metrics.intersection_done(time.monotonic() - started)
            # Host logs are public: never a result size, not even a released one.
            log.info("job %s: intersection computed for %d parties", job.job_id, job.party_count)
            job.notify_locked()
        release_free_memory()  # the parties' stores are gone: return their pages

    # -- results -------------------------------------------------------------------

    async def wait_result_async(self, token: bytes, *, timeout: float | None) -> Delivery:
        """Await the result without holding a thread (asyncio; no polling); the caller's view.

        Whatever changes the job's state (the last upload, expiry, shutdown) wakes the wait
        through the caller's event loop; a cancelled caller simply stops waiting.
        """
        with self._lock:
            job, party, give_up = self._begin_wait_locked(token, timeout)
        await job.await_change(
            self._lock,
            self._clock,
            lambda: job.state not in (JobState.WAITING, JobState.COMPUTING),
            give_up,
        )
        with self._lock:
            return self._end_wait_locked(job, party)

    async def next_progress_async(
        self, token: bytes, seen: JobProgress | None, *, timeout: float | None
    ) -> JobProgress | None:
        """The caller's job's progress once it differs from ``seen`` (at once for None);
        None once the job no longer waits for parties, or at the deadline or ``timeout``.
        Awaited like the result: woken by the job's changes, no polling."""
        with self._lock:
            job, _ = self._sessions.lookup(token, self._jobs)
            give_up = self._give_up_locked(job, timeout)
        await job.await_change(
            self._lock,
            self._clock,
            lambda: job.state is not JobState.WAITING or job.progress_view() != seen,
            give_up,
        )
        with self._lock:
            view = job.progress_view()
            return view if view != seen else None

    def _begin_wait_locked(self, token: bytes, timeout: float | None) -> tuple[Job, Party, float]:
        """The caller's job and party, and when its wait gives up."""
        job, party = self._sessions.lookup(token, self._jobs)
        if party.upload is not UploadState.DONE:
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                f"party {party.name} has not uploaded its set for job {job.job_id}",
            )
        return job, party, self._give_up_locked(job, timeout)

    def _give_up_locked(self, job: Job, timeout: float | None) -> float:
        """When a wait ends: the job's deadline, or the caller's own sooner timeout."""
        return job.deadline if timeout is None else min(job.deadline, self._clock() + timeout)

    def _end_wait_locked(self, job: Job, party: Party) -> Delivery:
        """After a wait: the party's view of the result, or why there is none."""
        if job.state is JobState.DONE and job.result is not None:
            return delivery_for(job, party, job.result)
        if job.state is JobState.WAITING and self._clock() >= job.deadline:
            # The reaper may not have run yet; the deadline is the deadline.
            self._expire_locked(job, reason=DEADLINE_PASSED)
        if job.state is JobState.EXPIRED:
            raise job.end_error()
        raise ServiceError(
            ErrorKind.DEADLINE_EXCEEDED,
            f"timed out waiting for job {job.job_id}: {job.progress()}",
        )

    def mark_delivered(self, token: bytes) -> None:
        """Record that the party has its whole result; the last delivery frees the job."""
        wiped = False
        with self._lock:
            found = self._sessions.find(token, self._jobs)
            if found is None:
                return
            job, party = found
            party.delivered = True
            if all(p.delivered for p in job.parties.values()):
                log.info("job %s: every party has its result; job state wiped", job.job_id)
                self._trail.delivered(job.job_id)
                job.end_reason = "every party has its result"
                self._drop_locked(job)
                wiped = True
        if wiped:
            release_free_memory()  # the result is gone too
