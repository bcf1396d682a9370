"""Prometheus metrics of the server, in a registry of its own (prometheus-client).

Metrics are public, like host logs (docs/threat-model.md): every label is a fixed enum, so
no item, key, job id, party name, per-job size or digest can ever become a series. Counts
summed over all jobs (uploads, bytes received, spill bytes) are what the host already sees
as traffic and files.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from teepsi.errors import TeepsiError
from teepsi.server.errors import ErrorKind, Refusal

if TYPE_CHECKING:
    from teepsi.server.jobs import JobRegistry

log = logging.getLogger(__name__)

#: Phases of a job as the ``phase`` label spells them.
JOB_PHASES = ("waiting", "computing", "done", "expired")

#: A refusal's reason when the code that refused named none: from its status kind.
_REASON_OF_KIND = {
    ErrorKind.INVALID_ARGUMENT: Refusal.BAD_REQUEST,
    ErrorKind.UNAUTHENTICATED: Refusal.AUTHENTICATION,
    ErrorKind.PERMISSION_DENIED: Refusal.AUTHENTICATION,
    ErrorKind.FAILED_PRECONDITION: Refusal.JOB_STATE,
    ErrorKind.ALREADY_EXISTS: Refusal.JOB_STATE,
    ErrorKind.NOT_FOUND: Refusal.JOB_STATE,
    ErrorKind.RESOURCE_EXHAUSTED: Refusal.LIMITS,
    ErrorKind.DEADLINE_EXCEEDED: Refusal.TIMEOUT,
    ErrorKind.UNAVAILABLE: Refusal.UNAVAILABLE,
    ErrorKind.CANCELLED: Refusal.UNAVAILABLE,
}


def refusal_reason(kind: ErrorKind, reason: Refusal | None) -> Refusal:
    return reason if reason is not None else _REASON_OF_KIND[kind]


class ServerMetrics:
    """The server's metrics. Always collected (cheap); served only with --metrics-host."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.uploads = Counter(
            "teepsi_uploads_completed",
            "Party uploads completed (all jobs).",
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "teepsi_upload_received_bytes",
            "Bytes of upload chunks received (all jobs).",
            registry=self.registry,
        )
        self.intersections = Counter(
            "teepsi_intersections",
            "Intersections computed (all jobs).",
            registry=self.registry,
        )
        self.intersection_seconds = Histogram(
            "teepsi_intersection_duration_seconds",
            "Time to compute one job's intersection, digests and receipt.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.refusals = Counter(
            "teepsi_refusals",
            "Calls refused, by reason (a fixed set).",
            labelnames=("reason",),
            registry=self.registry,
        )
        for reason in Refusal:  # every series exists from the start, at 0
            self.refusals.labels(reason=reason.value)
        self.attestation_seconds = Histogram(
            "teepsi_attestation_verification_duration_seconds",
            "Time to verify one data provider's quote and policy, accepted or not.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def intersection_done(self, seconds: float) -> None:
        self.intersections.inc()
        self.intersection_seconds.observe(seconds)

    def refused(self, kind: ErrorKind, reason: Refusal | None) -> None:
        self.refusals.labels(reason=refusal_reason(kind, reason).value).inc()

    @contextmanager
    def timed_attestation(self) -> Iterator[None]:
        with self.attestation_seconds.time():
            yield

    def watch_jobs(self, jobs: JobRegistry) -> None:
        """Read the registry's gauges (jobs by phase, waiting parties, memory, spill) at
        each scrape, from the registry itself: they cannot drift from the truth."""
        self.registry.register(_JobGauges(jobs))


@dataclass(frozen=True)
class JobCounts:
    """Counts over all live jobs; no job is named."""

    by_phase: dict[str, int]
    parties_waiting: int
    memory_held_bytes: int
    memory_budget_bytes: int
    spill_written_bytes: int


class _JobGauges(Collector):
    def __init__(self, jobs: JobRegistry) -> None:
        self._jobs = jobs

    def collect(self) -> Iterable[Metric]:
        counts = self._jobs.counts()
        phases = GaugeMetricFamily("teepsi_jobs", "Live jobs by phase.", labels=["phase"])
        for phase in JOB_PHASES:
            phases.add_metric([phase], counts.by_phase.get(phase, 0))
        yield phases
        yield GaugeMetricFamily(
            "teepsi_parties_waiting",
            "Parties that joined a job still waiting for its result (all jobs).",
            value=counts.parties_waiting,
        )
        yield GaugeMetricFamily(
            "teepsi_memory_held_bytes",
            "Bytes of the memory budget taken: the server's own share and the uploads and "
            "results of all jobs.",
            value=counts.memory_held_bytes,
        )
        yield GaugeMetricFamily(
            "teepsi_memory_budget_bytes",
            "The server's memory budget for uploaded records.",
            value=counts.memory_budget_bytes,
        )
        yield CounterMetricFamily(
            "teepsi_spill_written_bytes",
            "Bytes of ciphertext written to spill files since start (all jobs).",
            value=counts.spill_written_bytes,
        )


class MetricsAddressError(TeepsiError, ValueError):
    """--metrics-host is malformed or not loopback without --metrics-public."""


def parse_metrics_host(text: str, *, allow_public: bool) -> tuple[str, int]:
    """(address, port) from HOST:PORT; a non-loopback address needs ``allow_public``:
    metrics are plain HTTP without authentication."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise MetricsAddressError(
            f"metrics_host {text!r}: expected HOST:PORT with a port 0..65535 (0: any free port), "
            "e.g. 127.0.0.1:9100"
        )
    if host == "localhost":
        return host, int(port_text)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise MetricsAddressError(
            f"metrics_host {text!r}: {host!r} is not an IP address or localhost"
        ) from None
    if not loopback and not allow_public:
        raise MetricsAddressError(
            f"metrics_host {text}: metrics are plain HTTP without authentication, so a "
            "non-loopback address needs metrics_public (or use 127.0.0.1)"
        )
    return host, int(port_text)


@dataclass
class MetricsEndpoint:
    port: int
    stop: Callable[[], None]


def serve_metrics(metrics: ServerMetrics, host: str, port: int) -> MetricsEndpoint:
    """Serve ``/metrics`` over plain HTTP on its own port (a thread of prometheus-client)."""
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise MetricsAddressError(
            f"metrics_host {host}:{port}: cannot listen ({exc.strerror}): pick a free port"
        ) from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsEndpoint(port=bound, stop=stop)
