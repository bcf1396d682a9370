"""Load: one job of 64 parties, 50 concurrent 3-party jobs, and a short soak that checks
the server's memory, threads and file descriptors return to their baseline.

The server is a separate process (``teepsi server``); the parties are threads of this
process using the Python API (``teepsi.client.run_party_items``), each with its own
attested connection. Figures (jobs/s, parties/s, RSS) are printed (``pytest -s``) and,
when ``TEEPSI_LOAD_FIGURES`` names a file, appended to it as JSON lines. The long soak is
``bench/soak.py`` (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from teepsi.attestation.policy import Policy
from teepsi.client import PartyConfig, PartyResult, run_party_items


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
) -> dict[tuple[str, str], PartyResult]:
    """Run (job, name, party count, items) parties as threads; every failure is raised."""
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
    assert all(r.text() == sorted(common) for r in results.values())
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
        assert result.text() == sorted(f"{job}-common-{i}" for i in range(100)), job
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
        assert all(len(r.text()) == items // 2 for r in results.values())
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
    then the last party of each job arrives and all 9 complete (finding F1).

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
        assert result.text() == sorted(f"{job}-common-{i}" for i in range(50)), job
    assert srv.log().count("job state wiped") == 3
    report("3 jobs x 3 parties, --max-workers 2", server_threads_while_6_wait=threads_waiting)
