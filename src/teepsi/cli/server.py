"""``teepsi server``: run the PSI server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from teepsi.attestation.providers import PROVIDER_NAMES
from teepsi.cli.common import (
    add_collateral_state_flag,
    add_log_flags,
    add_run_config_flag,
    add_sim_tee_flag,
    add_trust_flags,
    collateral_state,
    load_policy,
    setup_logging,
    sim_tee,
)
from teepsi.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError
from teepsi.cli.values import (
    non_negative_int,
    parse_duration,
    parse_size,
    positive_int,
    positive_seconds,
    server_address,
)

if TYPE_CHECKING:
    from teepsi.server.running import RunningServer

log = logging.getLogger("teepsi")


def run(args: argparse.Namespace) -> int:
    from teepsi.attestation.ratls import DEFAULT_LIFETIME
    from teepsi.server.app import ServerEnd, run_server
    from teepsi.server.config import ServerConfig, ServerConfigError
    from teepsi.server.limits import Limits

    setup_logging("server", args.verbose, log_format=args.log_format)
    if args.no_client_attestation and args.config is None:
        policy = None
    else:
        if args.config is None:
            raise UsageError(
                "--config: a policy for data providers is required "
                "(or pass --no-client-attestation)"
            )
        policy = load_policy(args.config, args)
    config = ServerConfig(
        host=args.host,
        attestation=args.attestation,
        sim_tee=sim_tee(args),
        client_policy=policy,
        require_client_attestation=not args.no_client_attestation,
        allow_simulated=args.allow_simulated,
        limits=Limits(
            job_timeout_seconds=args.job_timeout,
            max_jobs=args.max_jobs,
            max_parties_per_job=args.max_parties,
            max_items_per_party=args.max_items,
            memory_budget_bytes=args.memory_budget,
            join_timeout_seconds=args.join_timeout,
            max_jobs_per_party=args.max_jobs_per_party,
            max_jobs_per_address=args.max_jobs_per_address,
            upload_idle_timeout_seconds=args.upload_idle_timeout,
        ),
        max_connections=args.max_connections,
        connection_idle_seconds=args.connection_idle_timeout,
        handshake_timeout_seconds=args.handshake_timeout,
        spill_dir=args.spill_dir,
        max_workers=args.max_workers,
        audit_log=args.audit_log,
        certificate_lifetime=args.certificate_lifetime or DEFAULT_LIFETIME,
        collateral_state=collateral_state(args, "server"),
        pccs_url=args.pccs_url,
        qcnl_path=args.qcnl_config,
        insecure_pccs_tls=args.insecure_pccs_tls,
        metrics_host=args.metrics_host,
        metrics_public=args.metrics_public,
        drain_seconds=args.drain_seconds,
    )

    def announce(running: RunningServer) -> None:
        # The demo and tests learn the bound port from one JSON line on stdout.
        sys.stdout.write(json.dumps({"port": running.port, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()

    try:
        end = run_server(config, on_ready=announce if args.announce else None)
    except ServerConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    return {
        ServerEnd.STOPPED: EXIT_OK,
        ServerEnd.INTERRUPTED: EXIT_INTERRUPTED,
        ServerEnd.CERTIFICATE_ENDED: EXIT_FAILED,
    }[end]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    server = subparsers.add_parser("server", help="run the PSI server")
    server.add_argument(
        "--host",
        type=server_address,
        default="0.0.0.0:50051",
        help="listen address HOST:PORT (port 0: any free port)",
    )
    server.add_argument("--config", help="policy for data providers (dynamic_config.json)")
    server.add_argument(
        "--attestation",
        choices=list(PROVIDER_NAMES),
        default="gramine",
        help="where this server's evidence comes from: gramine (SGX enclave), tdx (TDX "
        "VM, configfs-tsm) or sim (simulated; see --sim-tee)",
    )
    add_sim_tee_flag(server, "for this server's evidence")
    server.add_argument(
        "--no-client-attestation",
        action="store_true",
        help="let data providers join without attesting (they run outside enclaves)",
    )
    server.add_argument(
        "--job-timeout",
        type=positive_seconds,
        default=600.0,
        help="seconds a job waits for all its parties (default 600)",
    )
    server.add_argument(
        "--max-jobs", type=positive_int, default=256, help="jobs at once (default 256)"
    )
    server.add_argument(
        "--max-parties", type=positive_int, default=256, help="parties per job (default 256)"
    )
    server.add_argument(
        "--max-items",
        type=positive_int,
        default=100_000_000,
        help="items per party (default 100000000)",
    )
    server.add_argument(
        "--memory-budget",
        type=parse_size,
        default=1024**3,
        help="the server's memory: 384MiB for itself, the rest for key records and results; "
        "beyond it they spill to disk, encrypted (default 1GiB)",
    )
    server.add_argument("--spill-dir", help="where encrypted spill files go (default: temp dir)")
    server.add_argument(
        "--join-timeout",
        type=positive_seconds,
        default=120.0,
        help="seconds a job may go without any party starting its upload before it is "
        "dropped and its --max-jobs slot freed (default 120)",
    )
    server.add_argument(
        "--max-jobs-per-party",
        type=positive_int,
        help="live jobs one party key may create (default: --max-jobs / 16, at least 1)",
    )
    server.add_argument(
        "--max-jobs-per-address",
        type=non_negative_int,
        help="live jobs that may be created from one network address (default: "
        "--max-jobs / 2; 0 = no limit, for parties behind one proxy or NAT)",
    )
    server.add_argument(
        "--max-connections",
        type=positive_int,
        default=512,
        help="client connections open at once; more are refused (default 512)",
    )
    server.add_argument(
        "--connection-idle-timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds a connection may carry no call before the server closes it (default 30)",
    )
    server.add_argument(
        "--handshake-timeout",
        type=positive_seconds,
        default=10.0,
        help="seconds a new connection has to finish its TLS handshake (default 10)",
    )
    server.add_argument(
        "--upload-idle-timeout",
        type=positive_seconds,
        default=60.0,
        metavar="S",
        help="end an upload stream that sends nothing for S seconds (default 60)",
    )
    server.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="on shutdown, report NOT_SERVING to health checks for S seconds before "
        "refusing new joins, so load balancers move traffic away first (default 5; 0 = none)",
    )
    server.add_argument(
        "--pccs-url",
        help="PCCS for the server's own collateral (default: PCCS_URL of the QCNL config)",
    )
    server.add_argument(
        "--qcnl-config", type=Path, help="QCNL config (default /etc/sgx_default_qcnl.conf)"
    )
    server.add_argument(
        "--insecure-pccs-tls",
        action="store_true",
        help="do not verify the PCCS's TLS certificate (self-signed PCCS)",
    )
    server.add_argument(
        "--audit-log",
        type=Path,
        help="append-only, hash-chained JSON-lines log of job events (never items)",
    )
    server.add_argument(
        "--certificate-lifetime",
        type=parse_duration,
        help="how long the server's RA-TLS certificate is valid, at most 90d; the server "
        "stops when it ends, and a restart makes a new one (default 30d)",
    )
    server.add_argument(
        "--max-workers",
        type=positive_int,
        default=16,
        help="threads for blocking work: attestation checks, uploads, intersections, receipts; "
        "parties waiting for a result hold none (default 16: with the server's own threads, "
        "within a Gramine enclave's default sgx.max_threads of 32)",
    )
    add_run_config_flag(server, "max_jobs = 64")
    server.add_argument(
        "--metrics-host",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics "
        "(off by default; loopback only unless --metrics-public)",
    )
    server.add_argument(
        "--metrics-public",
        action="store_true",
        help="allow a non-loopback --metrics-host: the endpoint has no TLS and no "
        "authentication, so firewall it to the scraper",
    )
    server.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    add_collateral_state_flag(server, "server", "data provider's")
    add_log_flags(server)
    add_trust_flags(server)
    server.set_defaults(func=run, subparser=server)
