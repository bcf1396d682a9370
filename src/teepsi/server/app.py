"""Starting and stopping the PSI server: identity, TLS, gRPC, signals."""

from __future__ import annotations

import enum
import hashlib
import logging
import signal
import tempfile
import threading
from collections.abc import Callable
from concurrent import futures
from types import FrameType

import grpc
from cryptography.hazmat.primitives import serialization

from teepsi._version import __version__
from teepsi.attestation.collateral import (
    FRESHNESS_TOLERANCE_SECONDS,
    CachedSource,
    CollateralError,
    CollateralFreshness,
    CollateralSource,
    PccsSource,
    SimulatedSource,
)
from teepsi.attestation.evidence import EvidenceError, Role
from teepsi.attestation.peer import PeerVerifier
from teepsi.attestation.providers import make_provider
from teepsi.attestation.quote import QuoteFormatError, ReportBody, parse_quote
from teepsi.attestation.ratls import RaTlsError, create_certificate
from teepsi.attestation.verify import SIMULATED_WARNING
from teepsi.contract.audit import AuditError, AuditLog, HeadSigner
from teepsi.contract.receipt import sign_receipt
from teepsi.engine.spill import remove_stale_areas
from teepsi.memory import tune_allocator
from teepsi.server.config import (
    ServerConfig,
    ServerConfigError,
    ensure_fd_limit,
    grpc_server_options,
)
from teepsi.server.evidence import ServerEvidenceBundle
from teepsi.server.handlers import SERVICE_NAME, add_to_server
from teepsi.server.health import ServerHealth
from teepsi.server.jobs import JobRegistry
from teepsi.server.metrics import (
    MetricsAddressError,
    ServerMetrics,
    parse_metrics_host,
    serve_metrics,
)
from teepsi.server.release import ReceiptIssuer
from teepsi.server.running import EventLoopThread, RunningServer
from teepsi.server.service import PsiService
from teepsi.timefmt import iso_utc

log = logging.getLogger(__name__)

#: The remedy when this server refuses a data provider's simulated evidence: read by the
#: party, so it names the server's operator and flag.
SERVER_SIMULATED_REMEDY = (
    "the SERVER refuses simulated evidence: its operator must start it with "
    "--allow-simulated for a test run (this party's own --allow-simulated does not change "
    "that), or run this party in an SGX enclave"
)


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
            "a policy for data providers is required (client_policy, a dynamic_config.json), "
            "or turn client attestation off (require_client_attestation off)"
        )
    if config.max_connections < 1:
        raise ServerConfigError("max_connections must be at least 1")
    if not 0 <= config.drain_seconds < float("inf"):
        raise ServerConfigError(
            f"drain_seconds {config.drain_seconds:g}: must be a finite number of seconds, 0 or more"
        )
    ensure_fd_limit(config.max_connections)
    if config.limits.job_timeout_seconds >= config.certificate_lifetime.total_seconds():
        # No job may outlive the certificate (the server stops when it ends).
        raise ServerConfigError(
            f"certificate_lifetime {config.certificate_lifetime} must be longer than "
            f"job_timeout_seconds {config.limits.job_timeout_seconds:g}s"
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
            "%s: this server ACCEPTS simulated evidence from data providers (allow_simulated)",
            SIMULATED_WARNING,
        )
    try:
        ratls = create_certificate(provider, lifetime=config.certificate_lifetime)
    except RaTlsError as exc:
        raise ServerConfigError(str(exc)) from None
    except EvidenceError as exc:
        # Mostly: a server started outside an enclave, as a first try on a laptop is.
        raise ServerConfigError(
            f"attestation {config.attestation!r}: cannot make this server's quote: {exc}; "
            "for a test run outside a TEE start the server with attestation 'sim' (and its "
            "parties with attestation 'sim' and allow_simulated)"
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
            "their own (pccs_url) or load a file: %s",
            exc,
        )
    _log_own_quote(ratls.quote)
    _log_start(config, provider.name)
    not_after = ratls.not_after
    log.info(
        "server certificate SHA-256 %s, valid until %s",
        hashlib.sha256(ratls.certificate_der).hexdigest(),
        iso_utc(not_after),
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
            raise ServerConfigError(f"collateral_state: {exc}") from None
        verifier = PeerVerifier(
            config.client_policy,
            allow_simulated=config.allow_simulated,
            freshness=freshness,
            simulated_remedy=SERVER_SIMULATED_REMEDY,
        )
    if not config.require_client_attestation:
        log.warning(
            "client attestation is OFF: data providers need not attest unless their job "
            "spec says so (require_client_attestation off)"
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
        raise ServerConfigError(f"audit_log {config.audit_log}: {exc}") from None
    if audit is not None:
        log.info("audit log %s (head %s)", config.audit_log, audit.head)
    limits = config.limits
    _remove_stale_spill(config.spill_dir)
    metrics = ServerMetrics()
    registry = JobRegistry(
        limits,
        clock=config.clock,
        spill_dir=config.spill_dir,
        receipts=ReceiptIssuer(
            sign=lambda receipt: sign_receipt(receipt, ratls.private_key),
            certificate_sha256=hashlib.sha256(ratls.certificate_der).digest(),
            tee=_own_tee(ratls.quote),
        ),
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

    loop = EventLoopThread()
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
        drain_seconds=config.drain_seconds,
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
        if stop.is_set():
            running.cut_drain()  # a second signal during the drain: stop now
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
