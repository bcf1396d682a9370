"""``teepsi health``: ask a server's gRPC health service, for health checks."""

from __future__ import annotations

import argparse
import sys

from teepsi.cli.errors import EXIT_FAILED, EXIT_OK, UsageError


def run(args: argparse.Namespace) -> int:
    """One line on stdout (SERVING) or stderr (why not): a probe's exit code says it."""
    from teepsi.protocol.connect import PsiClientError, split_host
    from teepsi.server.health import HealthCheckError, check_health

    try:
        split_host(args.host)
    except PsiClientError as exc:
        raise UsageError(str(exc)) from None
    try:
        status = check_health(args.host, service=args.service, timeout=args.timeout)
    except HealthCheckError as exc:
        print(f"teepsi health: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(status)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = subparsers.add_parser(
        "health",
        help="ask a server's gRPC health service (exit 0 when SERVING); for health checks",
    )
    health.add_argument("--host", required=True, help="server address HOST:PORT")
    health.add_argument(
        "--service",
        default="",
        help='the service to ask about: "" (default) the whole server, or teepsi.v1.Psi',
    )
    health.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    health.set_defaults(func=run)
