"""argparse value types: each turns one flag's text into its value, or says in one line
what is wrong with it (argparse prints that as a usage error, exit 2)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import timedelta


def parse_size(text: str) -> int:
    """An argparse type over :func:`teepsi.sizes.parse_size`."""
    from teepsi.sizes import parse_size as parse_byte_size

    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole_number_from(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {minimum}")
        return value

    return parse


#: A count of at least 1 (a limit of 0 or less would refuse everything, or nothing).
positive_int = _whole_number_from(1)
#: A count of 0 or more (0 where a limit may be turned off).
non_negative_int = _whole_number_from(0)


def positive_seconds(text: str) -> float:
    """Seconds, finite and above 0 (float() would take nan, inf and negatives)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number of seconds above 0")
    return value


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


def _address(text: str, lowest_port: int) -> str:
    """HOST:PORT or [IPv6]:PORT, the port in lowest_port..65535 (gRPC itself would pick
    443 for a missing port and wrap an out-of-range one)."""
    example = "HOST:PORT, e.g. 127.0.0.1:50051 or [::1]:50051"
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} has no port: give {example}")
    if host.startswith("[") and host.endswith("]"):
        import ipaddress

        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {host} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise argparse.ArgumentTypeError(
            f"{text!r}: {host!r} is not a host name or address (an IPv6 address goes in "
            f"brackets): give {example}"
        )
    if not port.isdigit() or not lowest_port <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r}: port {port!r} is not a number {lowest_port}..65535"
        )
    return text


def server_address(text: str) -> str:
    """The address the server listens on; port 0 picks a free port."""
    return _address(text, 0)


def client_address(text: str) -> str:
    """The server's address as a client dials it."""
    return _address(text, 1)


def parse_duration(text: str) -> timedelta:
    """A duration from "30d", "12h", "90m", "45s" or plain seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number = text.strip()
    scale = units.get(number[-1:].lower()) if number else None
    if scale is not None:
        number = number[:-1]
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d, 12h or 90s")
    return timedelta(seconds=value)
