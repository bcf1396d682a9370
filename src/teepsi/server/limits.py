"""The server's documented limits, and the per-party and per-address job quotas."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from teepsi.server.errors import ErrorKind, ServiceError

#: What the server needs besides the records it holds: the interpreter and libraries (about
#: 115 MiB at start), gRPC's message buffers and the temporaries of storing uploads and of
#: the intersection (up to about 190 MiB more, measured at 2 x 100M). Reserved from the
#: memory budget, so the records' share plus this stays within it.
SERVER_RUNTIME_BYTES = 384 * 1024**2


@dataclass(frozen=True)
class Limits:
    """Documented service limits; each refusal names the limit it hit."""

    max_jobs: int = 256
    max_parties_per_job: int = 256
    max_items_per_party: int = 100_000_000
    job_timeout_seconds: float = 600.0
    #: The server's memory: its runtime (``SERVER_RUNTIME_BYTES``) and the key records
    #: and results it holds across all jobs; beyond it they spill to disk.
    memory_budget_bytes: int = 1024**3
    #: Of the memory budget, what the server itself needs (reserved from the start).
    memory_runtime_bytes: int = SERVER_RUNTIME_BYTES
    #: A job in which no party has begun an upload this long after its creation is
    #: dropped: a join alone holds a --max-jobs slot only briefly.
    join_timeout_seconds: float = 120.0
    #: Live jobs one party key may have created; None = a sixteenth of max_jobs.
    max_jobs_per_party: int | None = None
    #: Live jobs created from one network address; None = half of max_jobs; 0 = no limit.
    max_jobs_per_address: int | None = None
    #: An upload stream that sends nothing for this long is ended by the server.
    upload_idle_timeout_seconds: float = 60.0

    def party_quota(self) -> int:
        if self.max_jobs_per_party is not None:
            return self.max_jobs_per_party
        return max(1, self.max_jobs // 16)

    def address_quota(self) -> int:
        if self.max_jobs_per_address is not None:
            return self.max_jobs_per_address
        return max(1, self.max_jobs // 2)


@dataclass(frozen=True)
class JobCreator:
    """Who created a job, for the per-party and per-address quotas."""

    #: SHA-256 of the party's public key (its signature over the join transcript verified).
    key_sha256: bytes
    #: The peer's network address without its port ("ipv4:10.0.0.7").
    address: str


#: Charged to no quota: for in-process callers of the registry; the gRPC service always
#: names the joining party's key and address.
NO_CREATOR = JobCreator(key_sha256=b"", address="")


def check_quota(live_creators: Iterable[JobCreator], creator: JobCreator, limits: Limits) -> None:
    """One party key, or one address, holds no more than its share of --max-jobs.

    ``live_creators`` are the creators of the live jobs."""
    creators = list(live_creators)
    by_key = sum(1 for c in creators if c.key_sha256 == creator.key_sha256)
    if creator.key_sha256 and by_key >= limits.party_quota():
        raise ServiceError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"this party key already created {by_key} live jobs (the limit per party, "
            "--max-jobs-per-party); finish or wait for one of them",
        )
    quota = limits.address_quota()
    by_address = sum(1 for c in creators if c.address == creator.address)
    if creator.address and quota and by_address >= quota:
        raise ServiceError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"{by_address} live jobs were created from this network address (the limit "
            "per address, --max-jobs-per-address); retry later",
        )


def peer_address(peer: str) -> str:
    """What a job quota is charged to, from a gRPC peer (``ipv4:1.2.3.4:5678``,
    ``ipv6:[2001:db8::1]:5678``): the host without its port, which changes with every
    connection. An IPv6 host is its /64 (one subscriber usually holds all of it); an
    IPv4-mapped IPv6 address (a dual-stack listener) is the IPv4 address."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer  # unix sockets and the like: the whole peer
    host = rest.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ipv4:{address.ipv4_mapped}"
        return f"ipv6:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ipv4:{address}"
