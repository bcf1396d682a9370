"""The server's cache of collateral for its own quote, refreshed before it expires."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from teepsi.attestation.collateral.documents import CollateralInfo, describe_collateral
from teepsi.attestation.collateral.errors import CollateralError
from teepsi.attestation.collateral.platform import QuotePlatform, quote_platform
from teepsi.attestation.collateral.rollback import CollateralFreshness
from teepsi.timefmt import iso_utc

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    collateral_json: str
    info: CollateralInfo
    fetched_at: float
    refresh_at: float
    next_attempt: float


@dataclass
class CacheStats:
    """Counters for tests and logs: served from cache, fetches tried, fetches failed."""

    hits: int = 0
    fetches: int = 0
    failures: int = 0


class CollateralCache:
    """Collateral for the server's own quote, kept until it needs refreshing.

    An entry (per platform: TEE type, FMSPC, PCK CA) is served until the earliest
    nextUpdate of its TCB info, QE identity and CRLs. It is refreshed ``refresh_margin``
    seconds before that, so peers whose clocks run a little ahead still accept it, and
    at the latest ``max_age`` after fetching, so a TCB recovery published by Intel
    reaches peers within a day rather than a month. If an early refresh fails, the old
    collateral is served (and the refresh retried every ``retry_interval``) until it
    expires. A refresh never replaces collateral with older collateral.

    Thread-safe: at most one fetch runs at a time; while it runs, other callers get
    the cached collateral if it is still valid, or wait for the fetch.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = 3600.0,
        max_age: float | None = 24 * 3600.0,
        retry_interval: float = 60.0,
    ) -> None:
        self._clock = clock
        self.refresh_margin = refresh_margin
        self.max_age = max_age
        self.retry_interval = retry_interval
        self._entries: dict[QuotePlatform, _Entry] = {}
        self._lock = threading.Lock()
        self._fetching = threading.Lock()
        self._freshness = CollateralFreshness()
        self.stats = CacheStats()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _usable(self, entry: _Entry | None, now: float) -> bool:
        return entry is not None and now < entry.info.next_update

    def _wanted(self, entry: _Entry | None, now: float) -> bool:
        """Should this caller try to fetch (True) or serve the entry (False)?"""
        if not self._usable(entry, now):
            return True
        assert entry is not None
        return now >= entry.refresh_at and now >= entry.next_attempt

    def get(
        self,
        quote: bytes,
        fetch: Callable[[bytes], str],
        *,
        validate: Callable[[bytes, str, int], None] | None = None,
    ) -> str:
        """Collateral for ``quote``: cached, or from ``fetch(quote)``.

        ``validate(quote, collateral_json, now)`` may refuse fetched collateral by raising
        CollateralError; ``now`` is this cache's clock.
        """
        key = quote_platform(quote)
        with self._lock:
            entry = self._entries.get(key)
            if not self._wanted(entry, self._clock()):
                self.stats.hits += 1
                assert entry is not None
                return entry.collateral_json
        # Someone else refreshing while we hold valid collateral: do not wait for them.
        blocking = not self._usable(entry, self._clock())
        if not self._fetching.acquire(blocking=blocking):
            with self._lock:
                self.stats.hits += 1
            assert entry is not None
            return entry.collateral_json
        try:
            with self._lock:
                entry = self._entries.get(key)
                now = self._clock()
                if not self._wanted(entry, now):
                    self.stats.hits += 1
                    assert entry is not None
                    return entry.collateral_json
            try:
                fresh = self._fetch(quote, fetch, validate)
            except CollateralError as exc:
                now = self._clock()
                with self._lock:
                    self.stats.failures += 1
                    if entry is not None and self._usable(entry, now):
                        entry.next_attempt = now + self.retry_interval
                        log.warning(
                            "collateral refresh failed, serving the cached collateral until %s: %s",
                            iso_utc(entry.info.next_update),
                            exc,
                        )
                        return entry.collateral_json
                raise
            with self._lock:
                self._entries[key] = fresh
            return fresh.collateral_json
        finally:
            self._fetching.release()

    def _fetch(
        self,
        quote: bytes,
        fetch: Callable[[bytes], str],
        validate: Callable[[bytes, str, int], None] | None,
    ) -> _Entry:
        with self._lock:
            self.stats.fetches += 1
        collateral_json = fetch(quote)
        now = self._clock()
        info = describe_collateral(collateral_json)
        problems = info.describe_expired(int(now))
        if info.next_update <= now or problems:
            raise CollateralError(f"fetched collateral is not valid now: {problems}")
        if validate is not None:
            validate(quote, collateral_json, int(now))
        # Recorded only after validation (see CollateralFreshness); a refresh that is
        # older than what we hand out already is refused here.
        self._freshness.check_and_record(collateral_json, source="own platform")
        refresh_at = info.next_update - self.refresh_margin
        if self.max_age is not None:
            refresh_at = min(refresh_at, now + self.max_age)
        return _Entry(
            collateral_json=collateral_json,
            info=info,
            fetched_at=now,
            refresh_at=refresh_at,
            next_attempt=now + self.retry_interval,
        )
