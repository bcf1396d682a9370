"""A started server: its event loop thread, and how it drains and stops."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc

from teepsi.contract.audit import AuditError, AuditLog
from teepsi.server.health import ServerHealth
from teepsi.server.jobs import JobRegistry
from teepsi.server.metrics import MetricsEndpoint, ServerMetrics
from teepsi.timefmt import iso_utc

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class EventLoopThread:
    """An asyncio event loop running in a thread of its own (the gRPC server's)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="teepsi-rpc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coroutine`` on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


@dataclass
class RunningServer:
    """A started server; ``stop()`` drains it, shuts it down and wipes every job."""

    port: int
    certificate_pem: bytes
    certificate_der: bytes
    #: When the certificate ends; verifiers refuse it after, so the server stops then.
    certificate_not_after: datetime
    registry: JobRegistry
    _server: grpc.aio.Server
    _loop: EventLoopThread
    _executor: futures.ThreadPoolExecutor
    _health: ServerHealth
    metrics: ServerMetrics
    _audit: AuditLog | None = None
    #: The Prometheus endpoint, when --metrics-host was given.
    metrics_endpoint: MetricsEndpoint | None = None
    #: How long health says NOT_SERVING before the server stops taking work.
    drain_seconds: float = 0.0
    #: Set to end a drain early (a second signal: the operator wants out now).
    _drain_cut: threading.Event = field(default_factory=threading.Event)

    def cut_drain(self) -> None:
        """End a drain in progress (or skip the next one): stop at once."""
        self._drain_cut.set()

    def stop(self, grace: float | None = 2.0) -> None:
        # NOT_SERVING first, before anything winds down: watchers stop routing here.
        try:
            self._loop.run(self._health.not_serving(), timeout=5)
        except (TimeoutError, RuntimeError) as exc:
            log.warning("could not mark the server NOT_SERVING: %s", exc)
        if self.drain_seconds > 0:
            # Meanwhile the server works as before: load balancers that poll health see
            # NOT_SERVING and move new parties elsewhere, while the calls in flight go on.
            log.info(
                "health is NOT_SERVING: draining for %g s before refusing new joins",
                self.drain_seconds,
            )
            self._drain_cut.wait(self.drain_seconds)
        # Expiring every job first tells waiting parties why (UNAVAILABLE, shutting down).
        self.registry.close()
        try:
            self._loop.run(self._server.stop(grace), timeout=(grace or 0) + 10)
        finally:
            self._loop.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.stop()
            if self._audit is not None:
                try:
                    self._audit.close()  # signs the final head
                except AuditError as exc:
                    log.error("audit log: %s", exc)

    def serve_until(self, stop: threading.Event) -> bool:
        """Block until ``stop`` is set or the certificate ends; True when it ended.

        Either way the caller stops the server: past its certificate's end no verifier
        accepts it, and a new start makes a new key and certificate.
        """
        left = (self.certificate_not_after - datetime.now(UTC)).total_seconds()
        if stop.wait(timeout=max(0.0, left)):
            return False
        log.error(
            "the server certificate expired at %s: stopping; start the server again for a "
            "new certificate",
            iso_utc(self.certificate_not_after),
        )
        return True
