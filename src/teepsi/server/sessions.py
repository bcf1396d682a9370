"""Session credentials: each is 32 random bytes that name one party of one live job.

A party gets one at its join (or resume) and sends it as metadata on every later call;
the registry holds the lock while it uses these.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from teepsi.server.errors import ErrorKind, ServiceError
from teepsi.server.job import Job, JobKey, Party


@dataclass(frozen=True)
class Session:
    job_key: JobKey
    party_name: str


@dataclass(frozen=True)
class JoinOutcome:
    """What a joining (or resuming) party is given: its session and the job's terms."""

    token: bytes
    deadline: float
    party_count: int
    key_seeds: bytes


class Sessions:
    """The live sessions of one registry, by token."""

    def __init__(self) -> None:
        self._by_token: dict[bytes, Session] = {}
        #: Set when the server shuts down: its jobs and their sessions are gone, and a
        #: party calling then must learn that, not that it never joined.
        self.closed = False

    def issue(self, job: Job, party: Party) -> JoinOutcome:
        """A fresh session credential for ``party`` (any earlier one of it ends)."""
        self.end(party.token)
        party.token = secrets.token_bytes(32)
        self._by_token[party.token] = Session(job.key, party.name)
        return JoinOutcome(
            token=party.token,
            deadline=job.deadline,
            party_count=job.party_count,
            key_seeds=job.key_seeds,
        )

    def end(self, token: bytes) -> None:
        self._by_token.pop(token, None)

    def find(self, token: bytes, jobs: Mapping[JobKey, Job]) -> tuple[Job, Party] | None:
        """The token's job and party, or None for an unknown or ended session."""
        session = self._by_token.get(token)
        if session is None:
            return None
        job = jobs[session.job_key]
        return job, job.parties[session.party_name]

    def lookup(self, token: bytes, jobs: Mapping[JobKey, Job]) -> tuple[Job, Party]:
        """As :meth:`find`, but an unknown session is refused."""
        found = self.find(token, jobs)
        if found is None and self.closed:
            raise ServiceError(
                ErrorKind.UNAVAILABLE,
                "server shutting down: its jobs were dropped; run every party again",
            )
        if found is None:
            raise ServiceError(
                ErrorKind.UNAUTHENTICATED,
                "unknown or expired session: join the job first (the job may have ended)",
            )
        return found
