"""Load: one job of 64 parties, 50 concurrent 3-party jobs, a short soak that checks
the server's memory, threads and file descriptors return to their baseline, and honest
jobs completing while a hostile client floods, grabs, squats and holds connections.

The server is a separate process (``teepsi server``); the parties are threads of this
process using the Python API (``teepsi.client.run_party_items``), each with its own
attested connection. Figures (jobs/s, parties/s, RSS) are printed (``pytest -s``) and,
when ``TEEPSI_LOAD_FIGURES`` names a file, appended to it as JSON lines. The long soak is
``bench/soak.py`` (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from teepsi.attestation.policy import Policy
from teepsi.client import PartyConfig, PartyResult, run_party_items
from teepsi.client.party import PsiClient, PsiClientError
from teepsi.contract.party_keys import generate_private_key, public_key_der
from teepsi.contract.spec import JobSpec, PartySpec
from teepsi.engine.tables import TableSpec
from teepsi.protocol import teepsi_pb2 as pb
from tests.support.tcp_proxy import TcpProxy


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB), Threads and open file descriptors of a process, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = int(rest.split()[0])
    values["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return values


def report(name: str, **figures: object) -> None:
    line = {"figure": name, **figures}
    print(f"\nLOAD {json.dumps(line)}")
    target = os.environ.get("TEEPSI_LOAD_FIGURES")
    if target:
        with open(target, "a") as out:
            out.write(json.dumps(line) + "\n")


def run_parties(
    host: str,
    policy: Policy,
    parties: list[tuple[str, str, int, list[str]]],
    *,
    timeout: float = 240,
    extra: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> dict[tuple[str, str], PartyResult]:
    """Run (job, name, party count, items) parties as threads; every failure is raised.
    ``extra`` adds PartyConfig fields (a spec and key) for some (job, name)."""
    results: dict[tuple[str, str], PartyResult] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def one(job: str, name: str, count: int, items: list[str]) -> None:
        config = PartyConfig(
            host=host,
            policy=policy,
            name=name,
            party_count=count,
            job_id=job,
            attestation="sim",
            allow_simulated=True,
            timeout=timeout,
            **(extra or {}).get((job, name), {}),
        )
        try:
            result = run_party_items(config, items)
        except Exception as exc:  # reported below, with the party's name
            with lock:
                failures.append(f"{job}/{name}: {exc}")
            return
        with lock:
            results[(job, name)] = result

    threads = [threading.Thread(target=one, args=party, daemon=True) for party in parties]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + timeout + 30
    for thread in threads:
        thread.join(max(0.0, give_up - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "parties still running after the timeout"
    assert not failures, failures[:5]
    return results


@pytest.fixture
def server(start_server, policy_file) -> Callable[..., object]:
    def start(*extra: str):
        return start_server(*extra, policy=policy_file)

    return start


def test_one_job_with_64_parties(server, policy, tmp_path):
    srv = server()  # default --max-workers: waiting parties hold no worker thread
    common = [f"shared-{i:04d}" for i in range(200)]
    parties = [
        ("big", f"p{n:02d}", 64, [*common, *(f"p{n}-own-{i}" for i in range(1800))])
        for n in range(64)
    ]
    started = time.monotonic()
    results = run_parties(srv.host, policy, parties)
    elapsed = time.monotonic() - started
    assert len(results) == 64
    assert all(r.matching_items() == sorted(common) for r in results.values())
    assert len({r.result_sha256 for r in results.values()}) == 1
    assert "job big: intersection computed for 64 parties" in srv.log()
    report(
        "64-party job",
        parties=64,
        items_per_party=2000,
        seconds=round(elapsed, 2),
        parties_per_s=round(64 / elapsed, 1),
    )


def test_50_concurrent_3_party_jobs(server, policy):
    srv = server()
    jobs = 50
    parties = []
    for j in range(jobs):
        common = [f"job{j}-common-{i}" for i in range(100)]
        for n in range(3):
            parties.append(
                (f"job{j}", f"p{n}", 3, [*common, *(f"job{j}-p{n}-{i}" for i in range(900))])
            )
    before = proc_status(srv.proc.pid)
    started = time.monotonic()
    results = run_parties(srv.host, policy, parties)
    elapsed = time.monotonic() - started
    assert len(results) == 3 * jobs
    for (job, _), result in results.items():
        # Each party gets its own job's intersection and nothing of any other job.
        assert result.matching_items() == sorted(f"{job}-common-{i}" for i in range(100)), job
    assert srv.log().count("job state wiped") == jobs
    after = proc_status(srv.proc.pid)
    report(
        "50 concurrent 3-party jobs",
        jobs=jobs,
        parties=3 * jobs,
        items_per_party=1000,
        seconds=round(elapsed, 2),
        jobs_per_s=round(jobs / elapsed, 2),
        parties_per_s=round(3 * jobs / elapsed, 1),
        server_rss_mib=after["VmRSS"] // 1024,
        server_peak_rss_mib=after["VmHWM"] // 1024,
        server_threads=after["Threads"],
        server_threads_before=before["Threads"],
    )


def test_soak_server_memory_returns_to_baseline(server, policy):
    """30 jobs one after another, 3 parties of 60k items (2.9 MB of records per job).

    Baseline: the server's RSS after 5 warm-up jobs (the first jobs grow the allocator's
    arenas, gRPC's thread pool and numpy/polars caches once). Leaking a job's records
    would add ~2.9 MB per job, ~70 MB over the 25 measured jobs; the tolerance, 24 MiB,
    covers allocator fragmentation and the jitter of a job's transient peak (measured
    plateau: within ~5 MiB). Threads and file descriptors must come back exactly (a
    small slack for gRPC's own pollers).
    """
    srv = server()
    jobs, warmup, items = 30, 5, 60_000
    samples = []
    started = time.monotonic()
    measured_from = started
    baseline: dict[str, int] = {}
    for j in range(jobs):
        common = [f"soak{j}-c{i}" for i in range(items // 2)]
        parties = [
            (f"soak{j}", f"p{n}", 3, [*common, *(f"soak{j}-p{n}-{i}" for i in range(items // 2))])
            for n in range(3)
        ]
        results = run_parties(srv.host, policy, parties)
        assert all(len(r.matching_items()) == items // 2 for r in results.values())
        status = proc_status(srv.proc.pid)
        samples.append(status["VmRSS"])
        if j + 1 == warmup:
            baseline = status
            measured_from = time.monotonic()
    elapsed = time.monotonic() - measured_from
    final = proc_status(srv.proc.pid)
    growth_mib = (max(samples[warmup:]) - baseline["VmRSS"]) / 1024
    report(
        "soak (CI)",
        jobs=jobs,
        parties_per_job=3,
        items_per_party=items,
        jobs_per_s=round((jobs - warmup) / elapsed, 2),
        parties_per_s=round(3 * (jobs - warmup) / elapsed, 1),
        rss_baseline_mib=round(baseline["VmRSS"] / 1024, 1),
        rss_final_mib=round(final["VmRSS"] / 1024, 1),
        rss_max_growth_mib=round(growth_mib, 1),
        threads=(baseline["Threads"], final["Threads"]),
        fds=(baseline["fds"], final["fds"]),
    )
    assert srv.log().count("job state wiped") == jobs
    assert growth_mib < 24, samples
    assert (final["VmRSS"] - baseline["VmRSS"]) / 1024 < 24, samples
    assert final["Threads"] <= baseline["Threads"] + 4
    assert final["fds"] <= baseline["fds"] + 4


def test_waiting_parties_hold_no_worker_threads(server, policy):
    """3 jobs x 3 parties with --max-workers 2: 6 parties wait for their results at once,
    then the last party of each job arrives and all 9 complete.

    Before grpc.aio each waiting party held a worker thread: --max-workers 2 lowered
    --max-parties to 1 (every join refused) and a third concurrent RPC got
    RESOURCE_EXHAUSTED. Now a waiting party is a suspended coroutine on the event loop.
    """
    srv = server("--max-workers", "2", "--job-timeout", "120")
    assert "lowered" not in srv.log()
    jobs = [f"few-workers-{j}" for j in range(3)]
    items = {
        (job, n): [f"{job}-common-{i}" for i in range(50)] + [f"{job}-p{n}-{i}" for i in range(50)]
        for job in jobs
        for n in range(3)
    }
    first = [(job, f"p{n}", 3, items[(job, n)]) for job in jobs for n in range(2)]
    last = [(job, "p2", 3, items[(job, 2)]) for job in jobs]
    waiting: dict[tuple[str, str], PartyResult] = {}
    errors: list[BaseException] = []

    def early_parties() -> None:
        try:
            waiting.update(run_parties(srv.host, policy, first, timeout=120))
        except BaseException as exc:  # reported below
            errors.append(exc)

    early = threading.Thread(target=early_parties, daemon=True)
    early.start()
    # All 6 have uploaded: each now waits in GetResult (the client asks right after).
    give_up = time.monotonic() + 90
    while srv.log().count(" uploaded ") < 6:
        assert time.monotonic() < give_up, srv.log()
        assert not errors, errors
        time.sleep(0.05)
    time.sleep(1.0)
    assert early.is_alive() and not errors, errors  # still waiting, none refused
    threads_waiting = proc_status(srv.proc.pid)["Threads"]
    finished = run_parties(srv.host, policy, last, timeout=120)
    early.join(60)
    assert not early.is_alive() and not errors, errors
    results = {**waiting, **finished}
    assert len(results) == 9
    for (job, _), result in results.items():
        assert result.matching_items() == sorted(f"{job}-common-{i}" for i in range(50)), job
    assert srv.log().count("job state wiped") == 3
    report("3 jobs x 3 parties, --max-workers 2", server_threads_while_6_wait=threads_waiting)


KEY_SCHEME = TableSpec(path=Path("<memory>")).key_scheme
#: The HTTP/2 client connection preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _spec(job_id: str, keys: dict[str, Any]) -> JobSpec:
    parties = tuple(PartySpec(name=n, public_key=public_key_der(k)) for n, k in keys.items())
    return JobSpec(job_id=job_id, parties=parties, recipients=tuple(keys))


def hostile_join(host: str, policy: Policy, job: str, name: str, **fields: Any) -> str:
    """A join that never uploads; "joined", or the one-line refusal."""
    client = PsiClient(
        PartyConfig(
            host=host,
            policy=policy,
            name=name,
            party_count=3,
            job_id=job,
            attestation="sim",
            allow_simulated=True,
            timeout=30,
            **fields,
        )
    )
    try:
        client.connect()
        client.join(KEY_SCHEME)
        return "joined"
    except PsiClientError as exc:
        return str(exc)
    finally:
        client.close()


class ChallengeFlood(threading.Thread):
    """GetChallenge as fast as one channel goes, 64 calls in flight."""

    def __init__(self, host: str, policy: Policy, count: int) -> None:
        super().__init__(daemon=True)
        self.client = PsiClient(
            PartyConfig(
                host=host,
                policy=policy,
                name="flood",
                party_count=2,
                attestation="sim",
                allow_simulated=True,
                timeout=120,
            )
        )
        self.count, self.issued, self.errors = count, 0, 0
        self.last_error = ""
        self.seconds = 0.0

    def run(self) -> None:
        self.client.connect()
        started = time.monotonic()
        try:
            while self.issued < self.count and self.errors < self.count:
                calls = [
                    self.client.stub.GetChallenge.future(
                        pb.GetChallengeRequest(job_id=f"victim{n % 10}", party_name="p0"),
                        timeout=30,
                    )
                    for n in range(64)
                ]
                for call in calls:
                    try:
                        call.result()
                        self.issued += 1
                    except grpc.RpcError as exc:  # counted: the flood goes on
                        self.errors += 1
                        self.last_error = f"{exc.code()}: {exc.details()}"
        finally:
            self.seconds = time.monotonic() - started
            self.client.close()


class SlowLoris(threading.Thread):
    """Hold ``raw`` TCP connections that never start TLS and ``idle`` TLS+HTTP/2 ones
    that never call, reopening each one the server closes; sample the server's fds."""

    def __init__(self, port: int, pid: int, *, raw: int, idle: int) -> None:
        super().__init__(daemon=True)
        self.port, self.pid, self.raw, self.idle = port, pid, raw, idle
        self.stop = threading.Event()
        self.closed_by_server = 0
        self.max_server_fds = 0
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        self.context.set_alpn_protocols(["h2"])

    def _open(self, tls: bool) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            if tls:
                sock = self.context.wrap_socket(sock)
                sock.sendall(H2_PREFACE)
            sock.setblocking(False)
            return sock
        except OSError:
            return None

    def run(self) -> None:
        held: list[tuple[socket.socket | None, bool]] = [
            (self._open(False), False) for _ in range(self.raw)
        ] + [(self._open(True), True) for _ in range(self.idle)]
        while not self.stop.wait(0.2):
            with contextlib.suppress(FileNotFoundError):  # the server has stopped
                self.max_server_fds = max(self.max_server_fds, proc_status(self.pid)["fds"])
            for i, (sock, tls) in enumerate(held):
                if sock is not None and not _server_closed(sock):
                    continue
                if sock is not None:
                    self.closed_by_server += 1
                    sock.close()
                held[i] = (self._open(tls), tls)
        for sock, _ in held:
            if sock is not None:
                sock.close()


def _server_closed(sock: socket.socket) -> bool:
    try:
        return not sock.recv(65536)  # EOF; frames the server sent are read and dropped
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


def test_honest_jobs_complete_with_a_hostile_client_in_the_loop(server, policy):
    """10 concurrent honest 3-party jobs (5 quick, 5 under a spec) against one hostile
    client that, all at once: floods 12k challenges (more than the old nonce store held),
    squats the spec jobs' ids in quick mode first, grabs job slots with one attested
    party key and with fresh keys from another address (127.0.0.2), and holds 100
    connections open (half never start TLS, half idle after HTTP/2)."""
    srv = server(
        "--max-jobs",
        "40",  # per party key: 40/16 = 2; per address: 40/2 = 20
        "--join-timeout",
        "8",
        "--connection-idle-timeout",
        "2",
        "--handshake-timeout",
        "2",
        "--max-connections",
        "200",
        "--job-timeout",
        "120",
    )
    started = time.monotonic()
    loris = SlowLoris(srv.port, srv.proc.pid, raw=50, idle=50)
    flood = ChallengeFlood(srv.host, policy, 12_000)
    loris.start()
    flood.start()
    keys = {j: {n: generate_private_key() for n in ("alice", "bob", "carol")} for j in range(5)}
    specs = {j: _spec(f"contract-{j}", keys[j]) for j in range(5)}
    with TcpProxy(srv.port, source_address="127.0.0.2", lifetime=120) as elsewhere:
        # Squat first: the contract ids, in quick mode, under the listed names.
        squats = [
            hostile_join(elsewhere.host, policy, f"contract-{j}", name)
            for j in range(5)
            for name in ("alice", "bob", "carol")
        ]
        assert squats == ["joined"] * 15  # the squatter's own quick jobs, full now
        honest: list[tuple[str, str, int, list[str]]] = []
        extra: dict[tuple[str, str], dict[str, Any]] = {}
        for j in range(10):
            job = f"contract-{j}" if j < 5 else f"quick-{j}"
            common = [f"{job}-common-{i}" for i in range(100)]
            for n, name in enumerate(("alice", "bob", "carol")):
                honest.append((job, name, 3, [*common, *(f"{job}-{n}-{i}" for i in range(900))]))
                if j < 5:
                    extra[(job, name)] = {"spec": specs[j], "party_key": keys[j][name]}
        results: dict[tuple[str, str], PartyResult] = {}
        errors: list[BaseException] = []

        def run_honest() -> None:
            try:
                results.update(run_parties(srv.host, policy, honest, timeout=90, extra=extra))
            except BaseException as exc:  # reported below
                errors.append(exc)

        honest_thread = threading.Thread(target=run_honest, daemon=True)
        honest_thread.start()
        # Slot grabbing by one attested party with one key (its own specs)...
        mallory = generate_private_key()
        grabs = [
            hostile_join(
                srv.host,
                policy,
                f"grab-{k}",
                "mallory",
                spec=_spec(
                    f"grab-{k}",
                    {"mallory": mallory, "x": generate_private_key(), "y": generate_private_key()},
                ),
                party_key=mallory,
            )
            for k in range(4)
        ]
        # ... and by fresh keys from one other address (a Sybil), until refused.
        sybil: list[str] = []
        while len(sybil) < 40 and (not sybil or sybil[-1] == "joined"):
            sybil.append(hostile_join(elsewhere.host, policy, f"sybil-{len(sybil)}", "p0"))
        honest_thread.join(120)
    assert not honest_thread.is_alive() and not errors, errors
    elapsed = time.monotonic() - started
    assert len(results) == 30
    for (job, _), result in results.items():
        assert result.matching_items() == sorted(f"{job}-common-{i}" for i in range(100)), job
    assert srv.log().count("job state wiped") == 10
    assert grabs[:2] == ["joined"] * 2
    assert all("--max-jobs-per-party" in g for g in grabs[2:]), grabs
    # The squats and the Sybil's jobs fill 127.0.0.2's share (20 of 40), then are refused
    # (more than 15 only if squat jobs were already dropped by the join timeout).
    sybil_jobs = len(sybil) - 1
    assert 15 <= sybil_jobs <= 20 and "--max-jobs-per-address" in sybil[-1], sybil
    flood.join(60)
    # Calls beyond the server's 8 streams per connection may be refused (REFUSED_STREAM):
    # the flood only counts the challenges it got.
    assert flood.issued >= 12_000, (flood.errors, flood.last_error)
    # The hostile jobs never upload: the join timeout drops them and frees their slots.
    give_up = time.monotonic() + 15
    while srv.log().count("no upload within the join timeout") < 5 + sybil_jobs + 2:
        assert time.monotonic() < give_up, srv.log()[-2000:]
        time.sleep(0.2)
    loris.stop.set()
    loris.join(10)
    # Every held connection was closed by the server at least once (2 s timeouts).
    assert loris.closed_by_server >= 100, loris.closed_by_server
    assert loris.max_server_fds <= 200 + 128
    report(
        "10 honest 3-party jobs with a hostile client",
        honest_parties=30,
        items_per_party=1000,
        seconds=round(elapsed, 1),
        challenges_flooded=flood.issued,
        flood_calls_refused=flood.errors,
        flood_seconds=round(flood.seconds, 1),
        challenges_per_s=round(flood.issued / flood.seconds),
        held_connections=100,
        connections_closed_by_server=loris.closed_by_server,
        max_server_fds=loris.max_server_fds,
        hostile_jobs_created=5 + sybil_jobs + 2,
    )
