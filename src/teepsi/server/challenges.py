"""Single-use challenge nonces for data-provider attestation.

A nonce is stateless until it is redeemed: ``random || expiry || HMAC(key, ...)`` over the
job, the party and the expiry, with a key drawn when the server starts. Issuing one stores
nothing, so no flood of ``GetChallenge`` calls (which anyone may make) can evict a nonce
an honest party is about to use. Only redeemed nonces are remembered, and only until they
expire: a redemption is the tail of a join whose transcript signature verified, so the
set grows at most as fast as the server verifies joins. Should it fill anyway, the
nonces expiring first are forgotten and every nonce expiring no later than them is
refused from then on (the *floor*): a replay is never accepted, and an honest party,
which redeems the nonce it has just been issued, expires after the floor.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import secrets
import struct
import threading
import time
from collections.abc import Callable

from teepsi.server.errors import ErrorKind, ServiceError

_RANDOM_BYTES = 16
_EXPIRY = struct.Struct(">Q")
_TAG_BYTES = hashlib.sha256().digest_size
NONCE_BYTES = _RANDOM_BYTES + _EXPIRY.size + _TAG_BYTES
_DOMAIN = b"teepsi challenge v1\x00"

#: Redeemed nonces remembered at once. A valid join costs a TLS call, a transcript
#: signature check and a quote verification (milliseconds); filling this many within one
#: nonce lifetime, between an honest party's challenge and its join, is out of reach.
DEFAULT_REDEEMED_CAPACITY = 100_000

_REFUSED = "challenge nonce is unknown, used, expired or issued for another job or party: "
_REFUSED += "request a new challenge"


class ChallengeStore:
    """Nonces bound to (job, party), valid once and for a short time."""

    def __init__(
        self,
        *,
        ttl_seconds: int = 120,
        redeemed_capacity: int = DEFAULT_REDEEMED_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_seconds < 1 or redeemed_capacity < 1:
            raise ValueError("challenge ttl and redeemed capacity must be positive")
        self.ttl_seconds = ttl_seconds
        self._capacity = redeemed_capacity
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        #: Redeemed nonce -> its expiry, and the same as a heap ordered by expiry.
        self._redeemed: dict[bytes, int] = {}
        self._expiring: list[tuple[int, bytes]] = []
        #: Nonces expiring at or before this are refused (raised only when the set is full).
        self._floor = 0

    def _tag(self, random: bytes, expiry: bytes, job_id: str, party_name: str) -> bytes:
        bound = b"".join(
            (
                _DOMAIN,
                random,
                expiry,
                *(struct.pack(">H", len(v)) + v for v in (job_id.encode(), party_name.encode())),
            )
        )
        return hmac.new(self._key, bound, hashlib.sha256).digest()

    def issue(self, job_id: str, party_name: str) -> bytes:
        """A fresh nonce for (job, party); nothing is stored."""
        random = secrets.token_bytes(_RANDOM_BYTES)
        expiry = _EXPIRY.pack(int(self._clock()) + self.ttl_seconds)
        return random + expiry + self._tag(random, expiry, job_id, party_name)

    def check(self, nonce: bytes, job_id: str, party_name: str) -> int:
        """Refuse a forged, expired, foreign or already redeemed nonce; its expiry if good.

        Cheap and stateless but for a look-up: run it before any expensive check.
        """
        if len(nonce) != NONCE_BYTES:
            raise ServiceError(ErrorKind.PERMISSION_DENIED, _REFUSED)
        random = nonce[:_RANDOM_BYTES]
        expiry_bytes = nonce[_RANDOM_BYTES : _RANDOM_BYTES + _EXPIRY.size]
        tag = nonce[_RANDOM_BYTES + _EXPIRY.size :]
        if not hmac.compare_digest(tag, self._tag(random, expiry_bytes, job_id, party_name)):
            raise ServiceError(ErrorKind.PERMISSION_DENIED, _REFUSED)
        (expiry,) = _EXPIRY.unpack(expiry_bytes)
        with self._lock:
            if expiry <= self._clock() or expiry <= self._floor or nonce in self._redeemed:
                raise ServiceError(ErrorKind.PERMISSION_DENIED, _REFUSED)
        return int(expiry)

    def redeem(self, nonce: bytes, job_id: str, party_name: str) -> None:
        """Consume ``nonce``: checked again, then remembered until it expires."""
        expiry = self.check(nonce, job_id, party_name)
        with self._lock:
            # Two joins racing with one nonce both pass check(); only one gets here first.
            if nonce in self._redeemed or expiry <= self._floor:
                raise ServiceError(ErrorKind.PERMISSION_DENIED, _REFUSED)
            now = self._clock()
            while self._expiring and (
                self._expiring[0][0] <= now or len(self._redeemed) >= self._capacity
            ):
                gone, old = heapq.heappop(self._expiring)
                del self._redeemed[old]
                if gone > now:
                    # Forgotten before its expiry: refuse everything expiring by then.
                    self._floor = max(self._floor, gone)
            self._redeemed[nonce] = expiry
            heapq.heappush(self._expiring, (expiry, nonce))

    def redeemed_count(self) -> int:
        with self._lock:
            return len(self._redeemed)
