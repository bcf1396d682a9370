"""One job's state: its parties, their uploads, its result and what its parties may learn.

The registry (:mod:`teepsi.server.jobs`) holds the lock; everything here runs under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from teepsi.contract.spec import IDENTIFIER_PATTERN, JobSpec
from teepsi.engine.result import SortedResult
from teepsi.engine.store import Partitioner, RecordStore
from teepsi.server.errors import ErrorKind, ServiceError
from teepsi.server.limits import NO_CREATOR, JobCreator

#: Why a job ended early (``Job.end_reason``), where the reason chooses the status.
SHUTTING_DOWN = "server shutting down"
DEADLINE_PASSED = "deadline passed"
NO_UPLOAD = "no upload within the join timeout"
#: Why a party left its job again (``Job.departed``).
UPLOAD_BROKE_OFF = "its upload broke off"


def check_identifier(value: str, what: str) -> None:
    """Job ids and party names: 1-128 of letters, digits and . _ @ -, not starting with a sign."""
    if not IDENTIFIER_PATTERN.fullmatch(value):
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"{what} {value[:40]!r} is invalid: use 1-128 letters, digits, '.', '_', '@' or '-'",
        )


class JobState(Enum):
    WAITING = "waiting for parties"
    COMPUTING = "computing"
    DONE = "done"
    EXPIRED = "expired"


#: A live job's state as the metrics' ``phase`` label says it.
PHASE = {
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
class JobResult:
    """The intersection as key records, sorted; the same for every party."""

    records: SortedResult
    sha256: bytes
    receipt_json: str = ""

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class JobProgress:
    """What a waiting party may learn of its job: counts, and a line made of counts only."""

    party_count: int
    joined: int
    uploaded: int
    waiting: bool
    status: str


@dataclass
class Job:
    job_id: str
    party_count: int
    created: float
    deadline: float
    creator: JobCreator = NO_CREATOR
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

    async def await_change(
        self,
        lock: threading.Lock,
        clock: Callable[[], float],
        done: Callable[[], bool],
        give_up: float,
    ) -> None:
        """Await ``done()`` (checked under ``lock``, the registry's) or ``give_up`` on
        ``clock``: woken through this loop by each change of the job, never polling."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(woken.set)

        with lock:
            self.waiters.add(wake)
        try:
            while True:
                with lock:
                    remaining = give_up - clock()
                    if done() or remaining <= 0:
                        return
                    woken.clear()  # under the lock: no wake-up after this is lost
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), remaining)
        finally:
            with lock:
                self.waiters.discard(wake)

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
        """What a watching party of the job gets while it waits: counts only, no names
        (a watcher may have joined before the others, and learns of them no more than the
        receipt would tell it)."""
        return JobProgress(
            party_count=self.party_count,
            joined=len(self.parties),
            uploaded=self.uploaded(),
            waiting=self.state is JobState.WAITING,
            status=self.progress_counts(),
        )

    def _departed_now(self) -> dict[str, str]:
        """Parties that left and have not joined again, and why."""
        return {name: why for name, why in self.departed.items() if name not in self.parties}

    def _refusal_notes(self) -> list[str]:
        return [
            f"{'a party was' if n == 1 else f'{n} parties were'} refused: {why}"
            for why, n in sorted(self.refusals.items())
        ]

    def progress_counts(self) -> str:
        """The progress line of WatchProgress: "2 of 3 parties joined, 1 uploaded", then
        how many left and why a join was refused, all as counts."""
        joined, uploaded = len(self.parties), self.uploaded()
        text = f"{joined} of {self.party_count} parties joined, {uploaded} uploaded"
        left = Counter(self._departed_now().values())
        notes = [
            f"{'a party' if n == 1 else f'{n} parties'} left: {why}"
            for why, n in sorted(left.items())
        ]
        return "; ".join([text, *notes, *self._refusal_notes()])

    def progress(self, when: str = "") -> str:
        """Where the job stands when it ends, for its own parties: who uploaded, who is
        missing and why (the expiry error names the parties that held it up)."""
        text = f"{self.uploaded()} of {self.party_count} parties uploaded{when}"
        notes = [
            f"party {p.name} joined but has not finished uploading"
            for p in self.parties.values()
            if p.upload is not UploadState.DONE
        ]
        left = self._departed_now()
        notes += [f"party {name} joined but {why}" for name, why in sorted(left.items())]
        missing = self.party_count - len(self.parties) - len(left)
        if missing > 0:
            notes.append(f"{missing} {'party has' if missing == 1 else 'parties have'} not joined")
        return "; ".join([text, *notes, *self._refusal_notes()])

    def end_error(self) -> ServiceError:
        """What a call of this ended job is told: why it ended, and what to do."""
        if self.end_reason == SHUTTING_DOWN:
            return ServiceError(
                ErrorKind.UNAVAILABLE,
                f"server shutting down: job {self.job_id} was dropped; run every party again",
            )
        if self.end_reason == DEADLINE_PASSED:
            # Only the job's own parties get here (by their session): they may know who.
            return ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                f"job {self.job_id} expired: {self.progress(' before its deadline')}",
            )
        return ServiceError(
            ErrorKind.CANCELLED,
            f"job {self.job_id} has ended ({self.end_reason or 'finished'})",
        )
