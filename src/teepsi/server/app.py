"""Starting and stopping the PSI server: identity, TLS, gRPC, signals."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import resource
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives import serialization

from teepsi import __version__
from teepsi.attestation.collateral import (
    FRESHNESS_TOLERANCE_SECONDS,
    CachedSource,
    CollateralError,
    CollateralFreshness,
    CollateralSource,
    PccsSource,
    SimulatedSource,
)
from teepsi.attestation.evidence import EvidenceError, EvidenceProvider, Role
from teepsi.attestation.peer import PeerVerifier
from teepsi.attestation.policy import Policy
from teepsi.attestation.providers import make_provider
from teepsi.attestation.quote import QuoteFormatError, ReportBody, parse_quote
from teepsi.attestation.ratls import DEFAULT_LIFETIME, RaTlsError, create_certificate
from teepsi.attestation.verify import SIMULATED_WARNING
from teepsi.contract.audit import AuditError, AuditLog, HeadSigner
from teepsi.contract.receipt import sign_receipt
from teepsi.engine.spill import remove_stale_areas
from teepsi.server.health import ServerHealth
from teepsi.server.jobs import JobRegistry, Limits
from teepsi.server.memory import tune_allocator
from teepsi.server.metrics import (
    MetricsAddressError,
    MetricsEndpoint,
    ServerMetrics,
    parse_metrics_host,
    serve_metrics,
)
from teepsi.server.service import SERVICE_NAME, PsiService, ServerEvidenceBundle, add_to_server

log = logging.getLogger(__name__)

#: The remedy when this server refuses a data provider's simulated evidence: read by the
#: party, so it names the server's operator and flag.
SERVER_SIMULATED_REMEDY = (
    "the SERVER refuses simulated evidence: its operator must start it with "
    "--allow-simulated for a test run (this party's own --allow-simulated does not change "
    "that), or run this party in an SGX enclave"
)

_T = TypeVar("_T")

#: Largest gRPC message the server accepts; upload chunks are ~1 MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: File descriptors kept free beyond --max-connections (listener, spill files, audit log,
#: collateral fetches, Python's own).
RESERVED_FDS = 128
#: Concurrent streams on one connection: an honest party runs one call at a time.
MAX_STREAMS_PER_CONNECTION = 8


class ServerConfigError(ValueError):
    """The server cannot start with this configuration; one line for the operator."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0:50051"
    attestation: str = "sim"
    #: The TEE ``attestation="sim"`` simulates: "sgx" or "tdx".
    sim_tee: str = "sgx"
    #: Policy for data providers; required unless client attestation is off.
    client_policy: Policy | None = None
    require_client_attestation: bool = True
    allow_simulated: bool = False
    limits: Limits = field(default_factory=Limits)
    #: Threads for blocking work (attestation checks, uploads, intersections, receipts).
    #: Waiting parties hold none: they are bounded by the job limits only.
    max_workers: int = 16
    spill_dir: str | None = None
    #: Where the server fetches collateral for its own quote (default: the QCNL config).
    pccs_url: str | None = None
    qcnl_path: Path | None = None
    insecure_pccs_tls: bool = False
    #: Data providers' collateral rollback state (per platform), kept across restarts;
    #: None keeps it in memory only. Under Gramine a file on an encrypted mount.
    collateral_state: Path | None = None
    #: Append-only, hash-chained log of job events (never items); None = no log.
    audit_log: Path | None = None
    #: How long the server's RA-TLS certificate is valid; the server stops when it ends.
    certificate_lifetime: timedelta = DEFAULT_LIFETIME
    #: Longest time an audit entry stays without a signed head after it.
    audit_sign_interval_seconds: float = 60.0
    #: Evidence provider override (tests inject fakes); default from ``attestation``.
    provider: EvidenceProvider | None = None
    #: The jobs' clock (deadlines, receipts' issue time); tests inject one that jumps.
    clock: Callable[[], float] = time.time
    #: Connections open at once; more are refused by gRPC (each holds a file descriptor).
    max_connections: int = 512
    #: A connection with no call in flight for this long is closed (GOAWAY).
    connection_idle_seconds: float = 30.0
    #: A connection must finish its TLS and HTTP/2 handshake within this (slow loris).
    handshake_timeout_seconds: float = 10.0
    #: Prometheus endpoint HOST:PORT (plain HTTP); None = no endpoint.
    metrics_host: str | None = None
    #: A non-loopback --metrics-host is refused unless this is set (--metrics-public).
    metrics_public: bool = False


def grpc_server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC core channel arguments: message sizes, connection limits and timeouts.

    Every long-lived call (an upload, a wait for a result) needs a session, so an outsider
    can hold the server only through connections: they are capped, and an idle one, or
    one still in its handshake, is closed after a short time. Keepalive pings find dead
    peers. A client's own pings are policed by gRPC's defaults (no more than one per
    5 minutes without data; the third early one gets GOAWAY), which we keep.
    """
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.max_connection_idle_ms", int(config.connection_idle_seconds * 1000)),
        ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout_seconds * 1000)),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        # The server pings a connection with a call in flight (a party waiting for its
        # result) every minute: a vanished peer's connection is closed 20 s later.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def _ensure_fd_limit(max_connections: int) -> None:
    """Raise the soft file-descriptor limit to fit --max-connections, or refuse to start:
    running out of descriptors would refuse honest parties and break spill files."""
    needed = max_connections + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ServerConfigError(
                f"--max-connections {max_connections} needs {needed} file descriptors but "
                f"the process may open only {hard} (ulimit -Hn): lower --max-connections"
            )
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        except (ValueError, OSError) as exc:
            raise ServerConfigError(
                f"--max-connections {max_connections}: cannot raise the file descriptor "
                f"limit from {soft} to {needed} ({exc}): lower --max-connections"
            ) from None


class _EventLoopThread:
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
    """A started server; ``stop()`` shuts it down and wipes every job."""

    port: int
    certificate_pem: bytes
    certificate_der: bytes
    #: When the certificate ends; verifiers refuse it after, so the server stops then.
    certificate_not_after: datetime
    registry: JobRegistry
    _server: grpc.aio.Server
    _loop: _EventLoopThread
    _executor: futures.ThreadPoolExecutor
    _health: ServerHealth
    metrics: ServerMetrics
    _audit: AuditLog | None = None
    #: The Prometheus endpoint, when --metrics-host was given.
    metrics_endpoint: MetricsEndpoint | None = None

    def stop(self, grace: float | None = 2.0) -> None:
        # NOT_SERVING first, before anything winds down: watchers stop routing here.
        try:
            self._loop.run(self._health.not_serving(), timeout=5)
        except (TimeoutError, RuntimeError) as exc:
            log.warning("could not mark the server NOT_SERVING: %s", exc)
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

    def wait(self) -> None:
        self._loop.run(self._server.wait_for_termination())

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
            self.certificate_not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        return True


def _own_tee(quote: bytes) -> str:
    """SGX or TDX: the kind of TEE the server's own quote comes from (named in receipts)."""
    return "SGX" if isinstance(parse_quote(quote).report_body, ReportBody) else "TDX"


def _log_own_quote(quote: bytes) -> None:
    """The server's measurement, once at start (structured fields for JSON logs)."""
    try:
        body = parse_quote(quote).report_body
    except QuoteFormatError as exc:
        log.info("server enclave: (own quote unreadable: %s)", exc)
        return
    fields: dict[str, object]
    if isinstance(body, ReportBody):
        fields = {
            "mr_enclave": body.mr_enclave.hex(),
            "mr_signer": body.mr_signer.hex(),
            "isv_prod_id": body.isv_prod_id,
            "isv_svn": body.isv_svn,
        }
    else:
        fields = {
            "mr_td": body.mr_td.hex(),
            "mr_seam": body.mr_seam.hex(),
            "tee_tcb_svn": body.tee_tcb_svn.hex(),
        }
    log.info("server enclave: %s", body.canonical_line(), extra=fields)


def _remove_stale_spill(spill_dir: str | None) -> None:
    """Spill areas of servers killed before they could clean up (ciphertext, key lost)."""
    where = spill_dir or tempfile.gettempdir()
    try:
        swept = remove_stale_areas(where)
    except OSError as exc:
        log.warning("cannot look for stale spill areas in %s: %s", where, exc.strerror)
        return
    log.info(
        "spill directory %s: removed %d stale spill area(s) (%d files, %d bytes of "
        "ciphertext) left by servers that did not stop cleanly",
        where,
        swept.areas,
        swept.files,
        swept.bytes,
    )


def start_server(config: ServerConfig) -> RunningServer:
    """Create the RA-TLS identity and start serving; returns once the port is bound."""
    if config.require_client_attestation and config.client_policy is None:
        raise ServerConfigError(
            "a policy for data providers is required (--config dynamic_config.json), "
            "or turn client attestation off with --no-client-attestation"
        )
    if config.max_connections < 1:
        raise ServerConfigError("--max-connections must be at least 1")
    _ensure_fd_limit(config.max_connections)
    if config.limits.job_timeout_seconds >= config.certificate_lifetime.total_seconds():
        # No job may outlive the certificate (the server stops when it ends).
        raise ServerConfigError(
            f"--certificate-lifetime {config.certificate_lifetime} must be longer than "
            f"--job-timeout {config.limits.job_timeout_seconds:g}s"
        )
    metrics_address = None
    if config.metrics_host is not None:
        try:
            metrics_address = parse_metrics_host(
                config.metrics_host, allow_public=config.metrics_public
            )
        except MetricsAddressError as exc:
            raise ServerConfigError(str(exc)) from None
    tune_allocator()
    provider = config.provider or make_provider(
        config.attestation, Role.SERVER, sim_tee=config.sim_tee
    )
    if provider.simulated:
        log.warning("%s: this server's own evidence is simulated", SIMULATED_WARNING)
    if config.allow_simulated:
        log.warning(
            "%s: this server ACCEPTS simulated evidence from data providers (--allow-simulated)",
            SIMULATED_WARNING,
        )
    try:
        ratls = create_certificate(provider, lifetime=config.certificate_lifetime)
    except RaTlsError as exc:
        raise ServerConfigError(str(exc)) from None
    except EvidenceError as exc:
        # Mostly: a server started outside an enclave, as a first try on a laptop is.
        raise ServerConfigError(
            f"--attestation {config.attestation}: cannot make this server's quote: {exc}; "
            "for a test run outside a TEE start the server with --attestation sim (and its "
            "parties with --attestation sim --allow-simulated)"
        ) from None
    own_source: CollateralSource
    if provider.simulated:
        own_source = CachedSource(SimulatedSource(provider), check=False)
    else:
        pccs = PccsSource(
            config.pccs_url,
            config.qcnl_path,
            verify_tls=False if config.insecure_pccs_tls else None,
        )
        own_source = CachedSource(pccs)

    def own_collateral() -> str:
        return own_source.collateral_for(ratls.quote)

    try:
        collateral = own_collateral()
    except CollateralError as exc:
        collateral = ""
        log.warning(
            "no collateral to staple to the server certificate; data providers must fetch "
            "their own (--pccs-url) or load a file: %s",
            exc,
        )
    _log_own_quote(ratls.quote)
    _log_start(config, provider.name)
    not_after = ratls.not_after
    log.info(
        "server certificate SHA-256 %s, valid until %s",
        hashlib.sha256(ratls.certificate_der).hexdigest(),
        not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )

    verifier = None
    if config.client_policy is not None:
        # Per platform, kept across restarts; a day's tolerance for one platform's
        # collateral reaching us through PCCS caches refreshed on different days.
        try:
            freshness = CollateralFreshness(
                config.collateral_state, tolerance_seconds=FRESHNESS_TOLERANCE_SECONDS
            )
        except CollateralError as exc:
            raise ServerConfigError(f"--collateral-state: {exc}") from None
        verifier = PeerVerifier(
            config.client_policy,
            allow_simulated=config.allow_simulated,
            freshness=freshness,
            simulated_remedy=SERVER_SIMULATED_REMEDY,
        )
    if not config.require_client_attestation:
        log.warning(
            "client attestation is OFF: data providers need not attest unless their job "
            "spec says so (--no-client-attestation)"
        )
    try:
        # The enclave's attested key signs the chain head, as it signs receipts.
        audit = (
            AuditLog(
                config.audit_log,
                signer=HeadSigner(
                    ratls.certificate_der, ratls.private_key, collateral_json=collateral
                ),
                sign_interval_seconds=config.audit_sign_interval_seconds,
            )
            if config.audit_log is not None
            else None
        )
    except (AuditError, OSError) as exc:
        raise ServerConfigError(f"--audit-log {config.audit_log}: {exc}") from None
    if audit is not None:
        log.info("audit log %s (head %s)", config.audit_log, audit.head)
    limits = config.limits
    _remove_stale_spill(config.spill_dir)
    metrics = ServerMetrics()
    registry = JobRegistry(
        limits,
        clock=config.clock,
        spill_dir=config.spill_dir,
        signer=lambda receipt: sign_receipt(receipt, ratls.private_key),
        certificate_sha256=hashlib.sha256(ratls.certificate_der).digest(),
        signer_tee=_own_tee(ratls.quote),
        audit=audit,
        certificate_not_after=not_after.timestamp(),
        metrics=metrics,
    )
    metrics.watch_jobs(registry)
    executor = futures.ThreadPoolExecutor(
        max_workers=config.max_workers, thread_name_prefix="teepsi-work"
    )
    service = PsiService(
        registry=registry,
        evidence=ServerEvidenceBundle(
            certificate_der=ratls.certificate_der,
            collateral_json=collateral,
            attestation=provider.name,
            certificate_sha256=hashlib.sha256(ratls.certificate_der).digest(),
            collateral_source=own_collateral,
        ),
        client_verifier=verifier,
        require_client_attestation=config.require_client_attestation,
        executor=executor,
        metrics=metrics,
    )
    health = ServerHealth((SERVICE_NAME,))
    key_pem = ratls.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    credentials = grpc.ssl_server_credentials([(key_pem, ratls.certificate_pem)])

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=grpc_server_options(config))
        add_to_server(service, server)
        health.add_to(server)
        try:
            port = server.add_secure_port(config.host, credentials)
        except RuntimeError as exc:
            raise ServerConfigError(f"cannot listen on {config.host}: {exc}") from None
        if port == 0:
            raise ServerConfigError(f"cannot listen on {config.host}: address in use or invalid")
        await server.start()
        await health.serving()
        return server, port

    loop = _EventLoopThread()
    endpoint = None
    try:
        server, port = loop.run(serve(), timeout=60)
        if metrics_address is not None:
            try:
                endpoint = serve_metrics(metrics, *metrics_address)
            except MetricsAddressError as exc:
                loop.run(server.stop(0), timeout=10)
                raise ServerConfigError(str(exc)) from None
    except BaseException:
        loop.close()
        executor.shutdown(wait=False)
        registry.close()
        if audit is not None:
            audit.close()
        raise
    log.info("teepsi server listening on %s (port %d)", config.host, port)
    return RunningServer(
        port=port,
        certificate_pem=ratls.certificate_pem,
        certificate_der=ratls.certificate_der,
        certificate_not_after=not_after,
        registry=registry,
        _server=server,
        _loop=loop,
        _executor=executor,
        _health=health,
        metrics=metrics,
        _audit=audit,
        metrics_endpoint=endpoint,
    )


def _log_start(config: ServerConfig, attestation: str) -> None:
    """Once at start, for whoever reads the log later: what runs, and with which limits."""
    limits = config.limits
    log.info(
        "teepsi %s server: attestation %s, client attestation %s, simulated evidence %s",
        __version__,
        attestation,
        "required" if config.require_client_attestation else "OFF",
        "ACCEPTED" if config.allow_simulated else "refused",
        extra={"version": __version__, "attestation": attestation},
    )
    fields: dict[str, int | float] = {
        "max_jobs": limits.max_jobs,
        "max_parties": limits.max_parties_per_job,
        "max_items": limits.max_items_per_party,
        "memory_budget": limits.memory_budget_bytes,
        "job_timeout": limits.job_timeout_seconds,
        "join_timeout": limits.join_timeout_seconds,
        "max_connections": config.max_connections,
        "max_workers": config.max_workers,
    }
    log.info(
        "limits: %s",
        ", ".join(f"{name} {value:g}" for name, value in fields.items()),
        extra={"limits": fields},
    )


class ServerEnd(enum.Enum):
    """Why a server run ended; each is its own exit status."""

    STOPPED = "stopped"  # SIGTERM: a clean stop
    INTERRUPTED = "interrupted"  # SIGINT (Ctrl-C)
    CERTIFICATE_ENDED = "certificate ended"  # a supervisor should start it again


def run_server(
    config: ServerConfig, *, on_ready: Callable[[RunningServer], None] | None = None
) -> ServerEnd:
    """Serve until SIGTERM or SIGINT, or the certificate's end, then shut down cleanly.

    ``on_ready`` is called once the port is bound (the CLI announces the port with it)."""
    running = start_server(config)
    stop = threading.Event()
    received: list[signal.Signals] = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if on_ready is not None:
        on_ready(running)
    expired = running.serve_until(stop)
    if received and received[0] is signal.SIGINT:
        log.warning("interrupted (Ctrl-C): shutting down; the running jobs are dropped")
    elif received:
        log.info("received %s: shutting down", received[0].name)
    running.stop()
    log.info("server stopped")
    if expired:
        return ServerEnd.CERTIFICATE_ENDED
    return ServerEnd.INTERRUPTED if received[0] is signal.SIGINT else ServerEnd.STOPPED
