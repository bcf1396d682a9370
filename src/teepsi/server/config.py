"""The server's configuration, and the gRPC channel arguments and process limits it sets."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from teepsi.attestation.evidence import EvidenceProvider
from teepsi.attestation.policy import Policy
from teepsi.attestation.ratls import DEFAULT_LIFETIME
from teepsi.errors import TeepsiError
from teepsi.protocol import MAX_MESSAGE_BYTES
from teepsi.server.limits import Limits

#: File descriptors kept free beyond --max-connections (listener, spill files, audit log,
#: collateral fetches, Python's own).
RESERVED_FDS = 128
#: Concurrent streams on one connection: an honest party runs one call at a time.
MAX_STREAMS_PER_CONNECTION = 8


class ServerConfigError(TeepsiError, ValueError):
    """The server cannot start with this configuration; one line for the operator."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0:50051"
    #: "gramine", "tdx" or "sim"; real hardware unless simulation is asked for, as on the
    #: command line.
    attestation: str = "gramine"
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
    #: On shutdown, health says NOT_SERVING this long before the server refuses new joins
    #: and closes, so load balancers stop sending parties here first (--drain-seconds;
    #: the command line's default is a few seconds, in-process servers drain not at all).
    drain_seconds: float = 0.0


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


def ensure_fd_limit(max_connections: int) -> None:
    """Raise the soft file-descriptor limit to fit --max-connections, or refuse to start:
    running out of descriptors would refuse honest parties and break spill files."""
    needed = max_connections + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ServerConfigError(
                f"max_connections {max_connections} needs {needed} file descriptors but "
                f"the process may open only {hard} (ulimit -Hn): lower max_connections"
            )
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        except (ValueError, OSError) as exc:
            raise ServerConfigError(
                f"max_connections {max_connections}: cannot raise the file descriptor "
                f"limit from {soft} to {needed} ({exc}): lower max_connections"
            ) from None
