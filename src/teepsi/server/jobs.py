"""Jobs and their lifecycle, with no gRPC in sight.

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

import asyncio
import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from teepsi.contract.audit import AuditError, AuditHead, AuditLog
from teepsi.contract.receipt import PartyEntry, Receipt, SignedReceipt
from teepsi.contract.signing import SignatureError
from teepsi.contract.spec import IDENTIFIER_PATTERN, JobSpec, OutputKind
from teepsi.engine.intersect import records_sha256_per_salt
from teepsi.engine.records import U64Array
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import (
    MemoryBudget,
    Partitioner,
    RecordStore,
    StoreClosed,
    intersect_stores,
)
from teepsi.server.errors import ErrorKind, Refusal, ServiceError
from teepsi.server.memory import release_free_memory
from teepsi.server.metrics import JobCounts, ServerMetrics

log = logging.getLogger(__name__)

#: Why a job ended early (``Job.end_reason``), where the reason chooses the status.
SHUTTING_DOWN = "server shutting down"
DEADLINE_PASSED = "deadline passed"
NO_UPLOAD = "no upload within the join timeout"

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
    #: A job in which no party has begun an upload this long after its creation is
    #: dropped: a join alone holds a --max-jobs slot only briefly.
    join_timeout_seconds: float = 120.0
    #: Live jobs one party key may have created; None = a sixteenth of max_jobs.
    max_jobs_per_party: int | None = None
    #: Live jobs created from one network address; None = half of max_jobs; 0 = no limit.
    max_jobs_per_address: int | None = None

    def party_quota(self) -> int:
        if self.max_jobs_per_party is not None:
            return self.max_jobs_per_party
        return max(1, self.max_jobs // 16)

    def address_quota(self) -> int:
        if self.max_jobs_per_address is not None:
            return self.max_jobs_per_address
        return max(1, self.max_jobs // 2)

    #: An upload stream that sends nothing for this long is ended by the server.
    upload_idle_timeout_seconds: float = 60.0


class JobState(Enum):
    WAITING = "waiting for parties"
    COMPUTING = "computing"
    DONE = "done"
    EXPIRED = "expired"


#: A live job's state as the metrics' ``phase`` label says it.
_PHASE = {
    JobState.WAITING: "waiting",
    JobState.COMPUTING: "computing",
    JobState.DONE: "done",
    JobState.EXPIRED: "expired",
}


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


#: Jobs are keyed by id *and* spec digest (empty without a spec): a join without a spec,
#: or with another spec, never reaches a job under a spec, so it can neither take that
#: job's id nor learn that it exists.
JobKey = tuple[str, bytes]


@dataclass(frozen=True)
class JobCreator:
    """Who created a job, for the per-party and per-address quotas."""

    #: SHA-256 of the party's public key (its signature over the join transcript verified).
    key_sha256: bytes
    #: The peer's network address without its port ("ipv4:10.0.0.7").
    address: str


#: Charged to no quota: for in-process callers of the registry; the gRPC service always
#: names the joining party's key and address.
_NO_CREATOR = JobCreator(key_sha256=b"", address="")


@dataclass
class Job:
    job_id: str
    party_count: int
    created: float
    deadline: float
    creator: JobCreator = _NO_CREATOR
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
    #: Parties that joined and left again, and why ("its upload broke off"); told only to
    #: the job's parties, so a waiting partner learns why the job does not complete.
    departed: dict[str, str] = field(default_factory=dict)
    #: Wakers of asyncio waiters (each schedules its waiter on its own loop).
    waiters: set[Callable[[], None]] = field(default_factory=set)
    #: Enders of the job's in-flight calls: each is told why when the job ends.
    calls: set[Callable[[ServiceError], None]] = field(default_factory=set)
    #: Splits the parties' records into partitions under a key drawn for this job.
    partitioner: Partitioner = field(default_factory=Partitioner)
    #: Joins refused while waiting, by reason: the parties learn why a partner is missing.
    refusals: Counter[str] = field(default_factory=Counter)

    def notify_locked(self) -> None:
        """The job's state changed: wake its waiters."""
        for wake in list(self.waiters):
            wake()

    def uploaded(self) -> int:
        return sum(1 for p in self.parties.values() if p.upload is UploadState.DONE)

    @property
    def key(self) -> JobKey:
        return (self.job_id, self.spec_sha256)

    def reap_at(self, join_timeout: float) -> float:
        """When the reaper drops the job: its deadline, or sooner while nobody uploads."""
        if any(p.upload is not UploadState.NONE for p in self.parties.values()):
            return self.deadline
        return min(self.deadline, self.created + join_timeout)

    def progress_view(self) -> JobProgress:
        """Counts and the progress line, for the job's own parties while they wait."""
        return JobProgress(
            party_count=self.party_count,
            joined=len(self.parties),
            uploaded=self.uploaded(),
            waiting=self.state is JobState.WAITING,
            status=self.progress(),
        )

    def progress(self, when: str = "") -> str:
        """Where the job stands, for its own parties: who uploaded, who is missing and why."""
        text = f"{self.uploaded()} of {self.party_count} parties uploaded{when}"
        notes = [
            f"party {p.name} joined but has not finished uploading"
            for p in self.parties.values()
            if p.upload is not UploadState.DONE
        ]
        left = {name: why for name, why in self.departed.items() if name not in self.parties}
        notes += [f"party {name} joined but {why}" for name, why in sorted(left.items())]
        missing = self.party_count - len(self.parties) - len(left)
        if missing > 0:
            notes.append(f"{missing} {'party has' if missing == 1 else 'parties have'} not joined")
        notes += [
            f"{'a party was' if n == 1 else f'{n} parties were'} refused: {why}"
            for why, n in sorted(self.refusals.items())
        ]
        return "; ".join([text, *notes])


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


@dataclass(frozen=True)
class JobProgress:
    """What a waiting party may learn of its job: counts and the job's progress line."""

    party_count: int
    joined: int
    uploaded: int
    waiting: bool
    status: str


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
    job_key: JobKey
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
        signer_tee: str = "SGX",
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
        self._signer = signer
        self._certificate_sha256 = certificate_sha256
        #: The TEE of the key that signs receipts (SGX or TDX), written into each receipt.
        self._signer_tee = signer_tee
        self._audit = audit
        self.budget = MemoryBudget(self.limits.memory_budget_bytes)
        self.spill = SpillArea(spill_dir)
        self._lock = threading.Lock()
        self._jobs: dict[JobKey, Job] = {}
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

    def counts(self) -> JobCounts:
        """Counts over all jobs for the metrics: no id, name or per-job size."""
        by_phase: dict[str, int] = {}
        with self._lock:
            for job in self._jobs.values():
                phase = _PHASE[job.state]
                by_phase[phase] = by_phase.get(phase, 0) + 1
            waiting = sum(
                1
                for job in self._jobs.values()
                if job.state is not JobState.DONE
                for _ in job.parties
            )
        return JobCounts(
            by_phase=by_phase,
            parties_waiting=waiting,
            memory_held_bytes=self.budget.held,
            memory_budget_bytes=self.budget.limit_bytes,
            spill_written_bytes=self.spill.bytes_written,
        )

    def expire_due(self) -> None:
        """Expire every job whose deadline has passed by the registry's clock now (the
        reaper does this at each deadline; a caller whose clock jumps can ask for it)."""
        with self._lock:
            self._expire_due_locked()

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
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
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

    def _check_quota_locked(self, creator: JobCreator) -> None:
        """One party key, or one address, holds no more than its share of --max-jobs."""
        by_key = sum(1 for j in self._jobs.values() if j.creator.key_sha256 == creator.key_sha256)
        if creator.key_sha256 and by_key >= self.limits.party_quota():
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"this party key already created {by_key} live jobs (the limit per party, "
                "--max-jobs-per-party); finish or wait for one of them",
            )
        quota = self.limits.address_quota()
        by_address = sum(1 for j in self._jobs.values() if j.creator.address == creator.address)
        if creator.address and quota and by_address >= quota:
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"{by_address} live jobs were created from this network address (the limit "
                "per address, --max-jobs-per-address); retry later",
            )

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
        self._check_quota_locked(creator)
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
        ends = self._certificate_not_after
        if ends is not None and deadline > ends:
            raise ServiceError(
                ErrorKind.UNAVAILABLE,
                "the server's certificate ends "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(ends))}, before this "
                "job could finish; the server then restarts with a new one: retry then",
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
        self._record(
            "created",
            job_id=job_id,
            parties=party_count,
            spec_sha256=spec_sha256.hex() or None,
            output=spec.output.value if spec is not None else "intersection",
            deadline=int(deadline),
        )
        return job

    def _refuse_other_spec_locked(
        self, job_id: str, party_name: str, spec: JobSpec, key_sha256: bytes
    ) -> None:
        """Tell a listed party that its co-parties run this job id under another spec.

        Only when the other job was created by a party this spec lists (same key) and lists
        this party with this key: then the caller is a party of that job too, and the other
        job is no outsider's (a fake spec naming someone's public key cannot block them; it
        is simply another job).
        """
        own_keys = {hashlib.sha256(p.public_key).digest() for p in spec.parties}
        for job in self._jobs.values():
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

    def _check_joinable_locked(
        self, job: Job, party_name: str, party_count: int, key_scheme: str
    ) -> None:
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

    def join(
        self,
        job_id: str,
        party_name: str,
        party_count: int,
        key_scheme: str = "",
        *,
        spec: JobSpec | None = None,
        attested: bool = False,
        creator: JobCreator = _NO_CREATOR,
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
                    self._refuse_other_spec_locked(job_id, party_name, spec, creator.key_sha256)
                job = self._create_locked(
                    job_id, party_count, key_scheme, spec, spec_sha256, creator
                )
            self._check_joinable_locked(job, party_name, party_count, key_scheme)
            job.parties[party_name] = Party(name=party_name, token=b"")
            outcome = self._new_session_locked(job, job.parties[party_name])
            self._record("joined", job_id=job_id, party=party_name, attested=attested)
            job.notify_locked()  # progress watchers see the new party
            log.info(
                "job %s: party %s joined (%d/%d)",
                job_id,
                party_name,
                len(job.parties),
                job.party_count,
            )
            return outcome

    def _new_session_locked(self, job: Job, party: Party) -> JoinOutcome:
        """A fresh session credential for ``party`` (any earlier one of it ends)."""
        self._sessions.pop(party.token, None)
        party.token = secrets.token_bytes(32)
        self._sessions[party.token] = Session(job.key, party.name)
        return JoinOutcome(
            token=party.token,
            deadline=job.deadline,
            party_count=job.party_count,
            key_seeds=job.key_seeds,
        )

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
            outcome = self._new_session_locked(job, party)
            self._record("resumed", job_id=job_id, party=party_name)
            log.info("job %s: party %s resumed its session", job_id, party_name)
            return outcome

    def _end_error_locked(self, job: Job) -> ServiceError:
        """What a call of an ended job is told: why it ended, and what to do."""
        if job.end_reason == SHUTTING_DOWN:
            return ServiceError(
                ErrorKind.UNAVAILABLE,
                f"server shutting down: job {job.job_id} was dropped; run every party again",
            )
        if job.end_reason == DEADLINE_PASSED:
            # Only the job's own parties get here (by their session): they may know who.
            return ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                f"job {job.job_id} expired: {job.progress(' before its deadline')}",
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
        job = self._jobs[session.job_key]
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
            job = self._jobs[session.job_key]
            party = job.parties[session.party_name]
            if party.upload is UploadState.IN_PROGRESS and job.state is JobState.WAITING:
                if party.store is not None:
                    party.store.close()
                del job.parties[party.name]
                job.departed[party.name] = "its upload broke off"
                del self._sessions[token]
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
                job.notify_locked()  # progress watchers see the upload
                return
            job.state = JobState.COMPUTING
            parties = list(job.parties.values())
            stores = [p.store for p in parties if p.store is not None]
        # Compute without the lock: other jobs keep moving meanwhile.
        started = time.monotonic()
        try:
            found = intersect_stores(stores)
        except StoreClosed:
            with self._lock:  # the job ended meanwhile, and took its stores with it
                raise self._end_error_locked(job) from None
        digest, salted_digest = records_sha256_per_salt(found.hi, found.lo, [b"", job.result_salt])
        size = len(found.hi)
        withheld = release_status(job.spec, "", size) is ReleaseStatus.BELOW_THRESHOLD
        count_only = job.spec is not None and job.spec.output is OutputKind.COUNT
        # The receipt's digest, salted: only recipients of the records get the salt.
        result_sha256 = None if withheld or count_only else salted_digest
        with self._lock:
            if job.state is not JobState.COMPUTING:
                return  # expired while computing
            for p, count, set_digest in zip(parties, found.distinct, found.set_sha256, strict=True):
                p.distinct_records = count
                p.set_sha256 = set_digest
                if p.store is not None:
                    p.store.close()
                    p.store = None
                # The audit log is public: what the receipt gives every party, no more
                # (the set digest is salted with a salt only this party gets).
                self._record(
                    "uploaded",
                    job_id=job.job_id,
                    party=p.name,
                    records=p.records_received,
                    set_sha256=set_digest.hex(),
                )
            # No size: the host is no party of the job, and a withheld size is nobody's.
            self._record(
                "released",
                job_id=job.job_id,
                output=job.spec.output.value if job.spec is not None else "intersection",
                threshold_met=not withheld,
                result_sha256=None if result_sha256 is None else result_sha256.hex(),
            )
            # The receipt carries the chain up to this release, and a signed head covers it.
            audit_head = self._audit.position() if self._audit is not None else None
            receipt = self._receipt(job, parties, found.set_sha256, size, result_sha256, audit_head)
            self._sign_audit_head()
            job.result = JobResult(hi=found.hi, lo=found.lo, sha256=digest, receipt_json=receipt)
            job.state = JobState.DONE
            self.metrics.intersection_done(time.monotonic() - started)
            # Host logs are public: never a result size, not even a released one.
            log.info("job %s: intersection computed for %d parties", job.job_id, job.party_count)
            job.notify_locked()
        release_free_memory()  # the parties' stores are gone: return their pages

    def _sign_audit_head(self) -> None:
        if self._audit is not None:
            try:
                self._audit.sign_head()
            except (OSError, AuditError, SignatureError) as exc:
                log.error("audit log: cannot sign the head: %s", exc)

    def _receipt(
        self,
        job: Job,
        parties: list[Party],
        set_digests: list[bytes],
        size: int,
        result_sha256: bytes | None,
        audit_head: AuditHead | None,
    ) -> str:
        """The signed receipt every party gets (empty if the server has no signer)."""
        if self._signer is None:
            return ""
        withheld = release_status(job.spec, "", size) is ReleaseStatus.BELOW_THRESHOLD
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
            result_sha256=result_sha256,
            issued_at=int(self._clock()),
            certificate_sha256=self._certificate_sha256,
            tee=self._signer_tee,
            audit_head=audit_head,
        )
        return self._signer(receipt).to_json()

    # -- results -------------------------------------------------------------------

    async def wait_result_async(self, token: bytes, *, timeout: float | None) -> Delivery:
        """Await the result without holding a thread (asyncio; no polling); the caller's view.

        Whatever changes the job's state (the last upload, expiry, shutdown) wakes the wait
        through the caller's event loop; a cancelled caller simply stops waiting.
        """
        with self._lock:
            job, party, give_up = self._begin_wait_locked(token, timeout)
        await self._await_job(
            job, lambda: job.state not in (JobState.WAITING, JobState.COMPUTING), give_up
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
            job, _ = self._lookup_locked(token)
            give_up = self._give_up_locked(job, timeout)
        await self._await_job(
            job, lambda: job.state is not JobState.WAITING or job.progress_view() != seen, give_up
        )
        with self._lock:
            view = job.progress_view()
            return view if view != seen else None

    async def _await_job(self, job: Job, done: Callable[[], bool], give_up: float) -> None:
        """Await ``done()`` (checked under the lock) or ``give_up`` on the registry's clock."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(woken.set)

        with self._lock:
            job.waiters.add(wake)
        try:
            while True:
                with self._lock:
                    remaining = give_up - self._clock()
                    if done() or remaining <= 0:
                        return
                    woken.clear()  # under the lock: no wake-up after this is lost
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), remaining)
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
        return job, party, self._give_up_locked(job, timeout)

    def _give_up_locked(self, job: Job, timeout: float | None) -> float:
        """When a wait ends: the job's deadline, or the caller's own sooner timeout."""
        return job.deadline if timeout is None else min(job.deadline, self._clock() + timeout)

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
            f"timed out waiting for job {job.job_id}: {job.progress()}",
        )

    def wake(self, token: bytes) -> None:
        """Wake waiters of the token's job (used when a caller cancels)."""
        with self._lock:
            session = self._sessions.get(token)
            if session is not None and session.job_key in self._jobs:
                self._jobs[session.job_key].notify_locked()

    def mark_delivered(self, token: bytes) -> None:
        """Record that the party has its whole result; the last delivery frees the job."""
        wiped = False
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return
            job = self._jobs[session.job_key]
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
