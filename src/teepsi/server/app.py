"""Starting and stopping the PSI server: identity, TLS, gRPC, signals."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives import serialization

from teepsi.attestation.collateral import (
    CollateralCache,
    CollateralError,
    CollateralFreshness,
    collateral_for_quote,
)
from teepsi.attestation.evidence import EvidenceProvider, Role
from teepsi.attestation.peer import PeerVerifier
from teepsi.attestation.policy import Policy
from teepsi.attestation.providers import make_provider
from teepsi.attestation.quote import QuoteFormatError, parse_quote
from teepsi.attestation.ratls import create_certificate
from teepsi.attestation.verify import SIMULATED_WARNING
from teepsi.contract.audit import AuditError, AuditLog
from teepsi.contract.receipt import sign_receipt
from teepsi.engine.spill import remove_stale_areas
from teepsi.server.jobs import JobRegistry, Limits
from teepsi.server.memory import tune_allocator
from teepsi.server.service import PsiService, ServerEvidenceBundle, add_to_server

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Largest gRPC message the server accepts; upload chunks are ~1 MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ServerConfigError(ValueError):
    """The server cannot start with this configuration; one line for the operator."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0:50051"
    attestation: str = "sim"
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
    #: Append-only, hash-chained log of job events (never items); None = no log.
    audit_log: Path | None = None
    #: Evidence provider override (tests inject fakes); default from ``attestation``.
    provider: EvidenceProvider | None = None
    #: The jobs' clock (deadlines, receipts' issue time); tests inject one that jumps.
    clock: Callable[[], float] = time.time


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
    registry: JobRegistry
    _server: grpc.aio.Server
    _loop: _EventLoopThread
    _executor: futures.ThreadPoolExecutor

    def stop(self, grace: float | None = 2.0) -> None:
        # Expiring every job first tells waiting parties why (UNAVAILABLE, shutting down).
        self.registry.close()
        try:
            self._loop.run(self._server.stop(grace), timeout=(grace or 0) + 10)
        finally:
            self._loop.close()
            self._executor.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> None:
        self._loop.run(self._server.wait_for_termination())


def _describe_own_quote(quote: bytes) -> str:
    try:
        body = parse_quote(quote).report_body
    except QuoteFormatError as exc:
        return f"(own quote unreadable: {exc})"
    return (
        f"MRENCLAVE {body.mr_enclave.hex()} MRSIGNER {body.mr_signer.hex()} "
        f"ISV_PROD_ID {body.isv_prod_id} ISV_SVN {body.isv_svn}"
    )


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
    tune_allocator()
    provider = config.provider or make_provider(config.attestation, Role.SERVER)
    if provider.simulated:
        log.warning("%s: this server's own evidence is simulated", SIMULATED_WARNING)
    if config.allow_simulated:
        log.warning(
            "%s: this server ACCEPTS simulated evidence from data providers (--allow-simulated)",
            SIMULATED_WARNING,
        )
    ratls = create_certificate(provider)
    collateral_cache = CollateralCache()

    def own_collateral() -> str:
        if provider.simulated:
            return collateral_cache.get(ratls.quote, lambda q: provider.collateral_json(q) or "")
        return collateral_for_quote(
            ratls.quote,
            pccs_url=config.pccs_url,
            qcnl_path=config.qcnl_path,
            cache=collateral_cache,
            verify_tls=False if config.insecure_pccs_tls else None,
        )

    try:
        collateral = own_collateral()
    except CollateralError as exc:
        collateral = ""
        log.warning(
            "no collateral to staple to the server certificate; data providers must fetch "
            "their own (--pccs-url) or load a file: %s",
            exc,
        )
    log.info("server enclave: %s", _describe_own_quote(ratls.quote))
    log.info("server certificate SHA-256 %s", hashlib.sha256(ratls.certificate_der).hexdigest())

    verifier = None
    if config.client_policy is not None:
        # A day's tolerance: providers refreshing from different PCCSs on different days
        # must not refuse each other; the TCB evaluation number stays strictly monotonic.
        verifier = PeerVerifier(
            config.client_policy,
            allow_simulated=config.allow_simulated,
            freshness=CollateralFreshness(tolerance_seconds=24 * 3600),
        )
    if not config.require_client_attestation:
        log.warning(
            "client attestation is OFF: data providers need not attest unless their job "
            "spec says so (--no-client-attestation)"
        )
    try:
        audit = AuditLog(config.audit_log) if config.audit_log is not None else None
    except (AuditError, OSError) as exc:
        raise ServerConfigError(f"--audit-log {config.audit_log}: {exc}") from None
    if audit is not None:
        log.info("audit log %s (head %s)", config.audit_log, audit.head)
    limits = config.limits
    _remove_stale_spill(config.spill_dir)
    registry = JobRegistry(
        limits,
        clock=config.clock,
        spill_dir=config.spill_dir,
        signer=lambda receipt: sign_receipt(receipt, ratls.private_key),
        certificate_sha256=hashlib.sha256(ratls.certificate_der).digest(),
        audit=audit,
    )
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
    )
    key_pem = ratls.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    credentials = grpc.ssl_server_credentials([(key_pem, ratls.certificate_pem)])

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        add_to_server(service, server)
        try:
            port = server.add_secure_port(config.host, credentials)
        except RuntimeError as exc:
            raise ServerConfigError(f"cannot listen on {config.host}: {exc}") from None
        if port == 0:
            raise ServerConfigError(f"cannot listen on {config.host}: address in use or invalid")
        await server.start()
        return server, port

    loop = _EventLoopThread()
    try:
        server, port = loop.run(serve(), timeout=60)
    except BaseException:
        loop.close()
        executor.shutdown(wait=False)
        registry.close()
        raise
    log.info("teepsi server listening on %s (port %d)", config.host, port)
    return RunningServer(
        port=port,
        certificate_pem=ratls.certificate_pem,
        certificate_der=ratls.certificate_der,
        registry=registry,
        _server=server,
        _loop=loop,
        _executor=executor,
    )


def run_server(config: ServerConfig, *, ready: threading.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly."""
    running = start_server(config)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if ready is not None:
        ready.set()
    stop.wait()
    running.stop()
    log.info("server stopped")
