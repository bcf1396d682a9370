"""Soak: repeated PSI jobs against one `teepsi server` process for a fixed time.

    python bench/soak.py                      # 10 minutes, 3 parties x 100k items, 4 jobs at once
    python bench/soak.py --duration 60        # a quick look
    python bench/soak.py --spill              # --memory-budget 1MiB: every job spills

The server is a separate process in simulation mode; the parties are threads of this
process using the Python API, each with its own attested connection. Every result is
checked. The server's idle baseline (RSS, threads, open file descriptors, from /proc) is
taken once ``--warmup`` jobs have run and ended; then jobs run for the rest of
``--duration`` and one line every ``--report-every`` seconds gives jobs done, jobs/s,
parties/s, RSS, peak RSS, threads and fds; after the last job ends the idle figures are
taken again. The last line is a JSON summary. Exit status 1 when a job failed or the idle
RSS grew more than ``--max-growth-mib`` over the baseline, so it can gate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.policy import Policy, policy_for
from teepsi.client import PartyConfig, run_party_items
from teepsi.demo import start_server_process


def proc_status(pid: int) -> dict[str, int]:
    values = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--parties", type=int, default=3, help="parties per job (default 3)")
    parser.add_argument("--items", type=int, default=100_000, help="items per party")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs at once (default 4)")
    parser.add_argument("--warmup", type=int, default=10, help="jobs before the RSS baseline")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds per line")
    parser.add_argument("--spill", action="store_true", help="--memory-budget 1MiB (spill)")
    parser.add_argument(
        "--max-growth-mib",
        type=float,
        default=32.0,
        help="idle RSS growth over the idle baseline that fails the run (default 32)",
    )
    args = parser.parse_args(argv)
    # Parties are threads here: keep their per-run SIMULATED warnings off the report.
    logging.getLogger("teepsi").setLevel(logging.ERROR)

    policy = policy_for(
        [
            ("teepsi server (simulated)", sim_identity(Role.SERVER)),
            ("teepsi data provider (simulated)", sim_identity(Role.DATA_PROVIDER)),
        ]
    )
    with tempfile.TemporaryDirectory(prefix="teepsi-soak-") as tmp:
        workdir = Path(tmp)
        policy_path = workdir / "dynamic_config.json"
        policy_path.write_text(json.dumps(policy.to_dict()))
        extra: list[str] = []
        if args.spill:
            spill = workdir / "spill"
            spill.mkdir()
            extra += ["--memory-budget", "1MiB", "--spill-dir", str(spill)]
        server, port = start_server_process(workdir, policy_path, *extra)
        try:
            return _soak(
                args,
                server.pid,
                f"127.0.0.1:{port}",
                Policy.from_dict(policy.to_dict()),
                workdir,
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
            if server.stdout is not None:
                server.stdout.close()


def _soak(args: argparse.Namespace, pid: int, host: str, policy: Policy, workdir: Path) -> int:
    half = args.items // 2
    counter = iter(range(10**9))
    lock = threading.Lock()
    done = {"jobs": 0, "failed": 0}
    errors: list[str] = []

    def one_job() -> None:
        with lock:
            j = next(counter)
        common = [f"soak{j}-common-{i}" for i in range(half)]
        results: dict[int, object] = {}

        def party(n: int) -> None:
            config = PartyConfig(
                host=host,
                policy=policy,
                name=f"p{n}",
                party_count=args.parties,
                job_id=f"soak{j}",
                attestation="sim",
                allow_simulated=True,
                timeout=300,
            )
            items = common + [f"soak{j}-p{n}-{i}" for i in range(args.items - half)]
            results[n] = run_party_items(config, items).matching_items()

        threads = [threading.Thread(target=party, args=(n,)) for n in range(args.parties)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(320)
            ok = len(results) == args.parties and all(r == sorted(common) for r in results.values())
        except Exception as exc:  # counted and reported; the soak goes on
            ok = False
            errors.append(str(exc))
        with lock:
            done["jobs" if ok else "failed"] += 1

    def run_jobs(until: float, limit: int | None, on_finish) -> None:
        """Keep ``concurrency`` jobs in flight until ``until`` (or ``limit`` jobs), then drain."""
        submitted = 0
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            running: set[Future[None]] = set()
            while running or (time.monotonic() < until and (limit is None or submitted < limit)):
                while (
                    time.monotonic() < until
                    and len(running) < args.concurrency
                    and (limit is None or submitted < limit)
                ):
                    running.add(pool.submit(one_job))
                    submitted += 1
                # Block until a job finishes (bounded), no spinning.
                finished, running = wait(running, timeout=5.0, return_when=FIRST_COMPLETED)
                if finished:
                    on_finish()

    def idle_status() -> dict[str, int]:
        time.sleep(2.0)  # every job has ended; let the server settle
        return proc_status(pid)

    started = time.monotonic()
    cpu_start = cpu_seconds(pid)
    print(
        f"soak: {args.parties} parties x {args.items} items, {args.concurrency} jobs at once, "
        f"{args.duration:g} s{' (spilling)' if args.spill else ''}; server pid {pid}",
        flush=True,
    )
    run_jobs(started + args.duration, args.warmup, lambda: None)
    baseline = idle_status()
    print(
        f"baseline after {done['jobs']} warm-up jobs, idle: RSS {baseline['VmRSS'] / 1024:.1f} "
        f"MiB, threads {baseline['Threads']}, fds {baseline['fds']}",
        flush=True,
    )
    base_time, base_jobs = time.monotonic(), done["jobs"]
    busiest = dict(baseline)
    next_report = [base_time + args.report_every]

    def sample() -> None:
        status = proc_status(pid)
        busiest["VmRSS"] = max(busiest["VmRSS"], status["VmRSS"])
        now = time.monotonic()
        if now >= next_report[0]:
            next_report[0] = now + args.report_every
            elapsed = now - base_time
            jobs = done["jobs"] - base_jobs
            print(
                f"{now - started:7.0f} s  jobs {done['jobs']:5d} (failed {done['failed']})  "
                f"{jobs / elapsed:5.2f} jobs/s  {jobs * args.parties / elapsed:6.1f} parties/s  "
                f"RSS {status['VmRSS'] / 1024:6.1f} MiB (peak {status['VmHWM'] / 1024:.1f})  "
                f"threads {status['Threads']}  fds {status['fds']}",
                flush=True,
            )

    run_jobs(started + args.duration, None, sample)
    measured = time.monotonic() - base_time
    measured_jobs = done["jobs"] - base_jobs
    final = idle_status()
    growth = (final["VmRSS"] - baseline["VmRSS"]) / 1024
    summary = {
        "seconds": round(time.monotonic() - started, 1),
        "jobs": done["jobs"],
        "failed": done["failed"],
        "parties_per_job": args.parties,
        "items_per_party": args.items,
        "concurrency": args.concurrency,
        "spill": args.spill,
        "jobs_per_s": round(measured_jobs / measured, 2),
        "parties_per_s": round(measured_jobs * args.parties / measured, 1),
        "server_cpu_s": round(cpu_seconds(pid) - cpu_start, 1),
        "rss_idle_baseline_mib": round(baseline["VmRSS"] / 1024, 1),
        "rss_idle_final_mib": round(final["VmRSS"] / 1024, 1),
        "rss_idle_growth_mib": round(growth, 1),
        "rss_busy_max_mib": round(busiest["VmRSS"] / 1024, 1),
        "rss_peak_mib": round(final["VmHWM"] / 1024, 1),
        "threads": [baseline["Threads"], final["Threads"]],
        "fds": [baseline["fds"], final["fds"]],
        "jobs_wiped_in_log": (workdir / "server.log")
        .read_text(errors="replace")
        .count("job state wiped"),
        "spill_files_left": sum(1 for p in (workdir / "spill").rglob("*") if p.is_file())
        if args.spill
        else None,
        "errors": errors[:5],
    }
    print(json.dumps(summary), flush=True)
    failed = done["failed"] > 0 or growth > args.max_growth_mib
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
