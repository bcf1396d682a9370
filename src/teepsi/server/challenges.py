"""Single-use challenge nonces for data-provider attestation."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from teepsi.server.errors import ErrorKind, ServiceError

NONCE_BYTES = 32


@dataclass(frozen=True)
class _Issued:
    job_id: str
    party_name: str
    expires: float


class ChallengeStore:
    """Nonces bound to (job, party), valid once and for a short time."""

    def __init__(
        self,
        *,
        ttl_seconds: int = 120,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self._capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._issued: OrderedDict[bytes, _Issued] = OrderedDict()

    def issue(self, job_id: str, party_name: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        now = self._clock()
        with self._lock:
            # Oldest first: drop expired ones, and the oldest if still over capacity.
            while self._issued:
                oldest = next(iter(self._issued.values()))
                if oldest.expires > now and len(self._issued) < self._capacity:
                    break
                self._issued.popitem(last=False)
            self._issued[nonce] = _Issued(job_id, party_name, now + self.ttl_seconds)
        return nonce

    def redeem(self, nonce: bytes, job_id: str, party_name: str) -> None:
        """Consume ``nonce``; refuse it if unknown, used, expired or issued for another party."""
        with self._lock:
            issued = self._issued.pop(nonce, None)
        if issued is None or issued.expires <= self._clock():
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED,
                "challenge nonce is unknown, used or expired: request a new challenge",
            )
        if (issued.job_id, issued.party_name) != (job_id, party_name):
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED, "challenge nonce was issued for another job or party"
            )
