"""One teepsi job: a fresh server and one client process per party, measured from outside."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import KEY, KIB, BenchError, Json, output_digests, teepsi
from procmon import Child, cpu_busy_seconds, loopback_bytes, process_cpu_seconds, wait_for_quiet


def sample_keys(paths: list[Path], count: int) -> list[bytes]:
    """Keys from the head of each party's text or CSV file, to look for on disk."""
    keys: list[bytes] = []
    per_file = count // len(paths)
    for path in paths:
        with open(path, "rb") as handle:
            column = 0
            if path.suffix == ".csv":
                column = handle.readline().split(b",").index(KEY.encode())
            for _ in range(per_file):
                line = handle.readline()
                if not line:
                    break
                keys.append(line.split(b",")[column].strip())
    return keys


@dataclass
class SpillScan:
    """Watches the server's spill directory while a job runs."""

    root: Path
    keys: list[bytes]
    files_seen: set[str] = field(default_factory=set)
    bytes_scanned: int = 0
    plaintext_hits: list[str] = field(default_factory=list)
    structured_files: list[str] = field(default_factory=list)
    max_files_at_once: int = 0
    _sizes: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        # Every sample key holds this marker, so one search per file covers all of them.
        assert all(b"@example" in k for k in self.keys)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.scan_once()

    def files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file()]

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.scan_once()

    def scan_once(self) -> None:
        present = self.files()
        self.max_files_at_once = max(self.max_files_at_once, len(present))
        for path in present:
            try:
                size = path.stat().st_size
                if self._sizes.get(str(path)) == size:
                    continue
                data = path.read_bytes()
            except OSError:
                continue  # deleted between listing and reading
            self._sizes[str(path)] = size
            self.files_seen.add(str(path))
            self.bytes_scanned += len(data)
            if b"@example" in data or any(k in data for k in self.keys[:50]):
                self.plaintext_hits.append(path.name)
            if looks_structured(data):
                self.structured_files.append(path.name)


def looks_structured(data: bytes) -> bool:
    """True when some byte column at a 16-byte stride is far from uniform, or ordered.

    A plaintext spill segment holds 16-byte records of one partition in ascending order,
    so the top byte of each record's first digest never decreases along it (and in a
    window of a large segment takes few values); AES-GCM output is uniform and unordered.
    """
    if len(data) < 16 * 4096:
        return False
    window = data[: 16 * 8192]
    for offset in range(16):
        column = window[offset::16]
        top = Counter(column).most_common(1)[0][1]
        if top / len(column) > 0.05:  # uniform: ~0.004, at most ~0.007 for 8192 samples
            return True
        rising = sum(1 for a, b in itertools.pairwise(column) if b >= a) / (len(column) - 1)
        if rising > 0.6:  # random bytes: ~0.502
            return True
    return False


@dataclass
class BenchJobSetup:
    """What one measured teepsi job runs on: its inputs, its place, its server's options.

    (Not a teepsi job spec, the contract parties agree to: this one is the bench's own.)
    """

    label: str
    rows: int
    parties: int
    files: list[Path]
    fmt: str
    workdir: Path
    timeout: float
    quiet_wait: float = 0.0
    server_args: list[str] = field(default_factory=list)
    spill_scan: SpillScan | None = None
    server_env: dict[str, str] = field(default_factory=dict)


#: Phases of one job's critical path, from the audit log's time stamps.
PHASES = ("start+read+attest", "hash+upload+intersect", "result+rows+write")
#: The server logs this when a job spills key records to disk (no audit event says so).
SERVER_SPILLED = "spilled to disk"


def audit_events(path: Path) -> list[Json]:
    """The server's audit log (JSON lines: event, time, job_id, ...): what happened when."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _event_times(events: list[Json], job: str, event: str) -> list[float]:
    return [float(e["time"]) for e in events if e.get("job_id") == job and e["event"] == event]


def log_records(lines: list[tuple[float, str]]) -> list[Json]:
    """The JSON log records among a process's stderr lines (``--log-format json``).

    Anything else on stderr (a library's warning, a traceback) is not a record: skipped.
    """
    records: list[Json] = []
    for _, line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def client_timings(records: list[Json]) -> dict[str, float]:
    """Wall seconds per phase, from the client's structured ``timing`` records."""
    return {
        str(r["phase"]): float(r["wall_s"])
        for r in records
        if "phase" in r and isinstance(r.get("wall_s"), int | float)
    }


def client_intersection(records: list[Json]) -> int | None:
    """The intersection size from the client's summary record (``intersection_size``):
    the server's audit log holds no result size (it is public)."""
    for record in records:
        size = record.get("intersection_size")
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


def run_teepsi(spec: BenchJobSetup, env: dict[str, str]) -> Json:
    """One job: a fresh server, every client at once; wall = first start to last exit."""
    spec.workdir.mkdir(parents=True, exist_ok=True)
    policy = spec.workdir / "policy.json"
    # Measured right before each job: other edits to the sources change sim MRENCLAVE.
    subprocess.run(
        teepsi("measure", "--attestation", "sim", "-o", str(policy)),
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    )
    job = f"bench-{spec.parties}p-{spec.rows}-{spec.fmt}"
    # Structured, time-stamped job events (joined, released, delivered): the phases.
    audit_log = spec.workdir / "audit.jsonl"
    audit_log.unlink(missing_ok=True)
    server_cmd = teepsi(
        "server",
        "--attestation",
        "sim",
        "--allow-simulated",
        "--config",
        str(policy),
        "--announce",
        "--host",
        "127.0.0.1:0",
        "--job-timeout",
        str(int(spec.timeout)),
        "--audit-log",
        str(audit_log),
        *spec.server_args,
    )
    children: list[Child] = []
    server = Child(
        "server", server_cmd, env={**env, **spec.server_env}, log_path=spec.workdir / "server.log"
    )
    children.append(server)
    try:
        line = server.first_stdout_line(timeout=120)
        if line is None:
            server.kill()
            server.wait(10)
            server.finish()
            raise BenchError(f"{spec.label}: server did not start; see {server.log_path}")
        port = int(json.loads(line)["port"])
        idle_rss = server.rss_kib() or 0
        if spec.spill_scan is not None:
            spec.spill_scan.start()
        outputs = [spec.workdir / f"out_{i}.{spec.fmt}" for i in range(1, spec.parties + 1)]
        client_cmds = [
            teepsi(
                "client",
                "--host",
                f"127.0.0.1:{port}",
                "--config",
                str(policy),
                "--data",
                str(path),
                *([] if spec.fmt == "txt" else ["--key", KEY]),
                "--parties",
                str(spec.parties),
                "--name",
                f"p{i}",
                "--job",
                job,
                "--attestation",
                "sim",
                "--allow-simulated",
                "--quiet",
                # One JSON object per line: timings and the summary are read as fields.
                "--log-format",
                "json",
                "--timeout",
                str(int(spec.timeout)),
                "--output",
                str(out),
                "-v",
            )
            for i, (path, out) in enumerate(zip(spec.files, outputs, strict=True), start=1)
        ]
        quiet = wait_for_quiet(spec.quiet_wait) if spec.quiet_wait > 0 else None
        net_before = loopback_bytes()
        busy0, own0, server0 = (
            cpu_busy_seconds(),
            process_cpu_seconds("self"),
            server.cpu_now(),
        )
        t0, epoch0 = time.monotonic(), time.time()
        clients = [
            Child(
                f"p{i}",
                cmd,
                env=env,
                log_path=spec.workdir / f"client_{i}.log",
                stdout_path=spec.workdir / f"client_{i}.stdout",
            )
            for i, cmd in enumerate(client_cmds, start=1)
        ]
        children += clients
        deadline = t0 + spec.timeout + 30
        # Until every client has exited, or one has failed: the others would only wait for
        # it until their timeout (they are killed below).
        while not all(c.returncode is not None for c in clients):
            if any(c.returncode for c in clients):
                break
            if time.monotonic() > deadline:
                running = [c.name for c in clients if c.returncode is None]
                raise BenchError(
                    f"{spec.label}: {', '.join(running)} still running after the timeout"
                )
            time.sleep(0.05)
        t_end = max(c.ended or 0.0 for c in clients)
        net_after = loopback_bytes()
        ours = (
            sum(c.cpu_now() for c in clients)
            + server.cpu_now()
            - server0
            + process_cpu_seconds("self")
            - own0
        )
        # CPU that other users of the machine burnt meanwhile, in cores.
        others = max(0.0, cpu_busy_seconds() - busy0 - ours) / (time.monotonic() - t0)
        teepsi_cpu = sum(c.cpu_now() for c in clients) + server.cpu_now() - server0
        failed = [c for c in clients if c.returncode]
        if failed:
            failed[0].finish()  # its output read to the end
            tail = failed[0].stderr_text().strip().splitlines()[-3:]
            raise BenchError(
                f"{spec.label}: client {failed[0].name} exited {failed[0].returncode}: "
                f"{' | '.join(tail)} (logs in {spec.workdir})"
            )
        # The job is wiped when the server has seen every delivery; wait for that event.
        wiped_by = time.monotonic() + 30
        while not _event_times(audit_events(audit_log), job, "delivered"):
            if time.monotonic() > wiped_by:
                break
            time.sleep(0.05)
        spill_after_job: list[str] | None = None
        if spec.spill_scan is not None:
            spec.spill_scan.stop()
            spill_after_job = [str(p) for p in spec.spill_scan.files()]
        server_hwm = server.read_hwm_now()  # exact: the server is still alive
    finally:
        for child in children[1:]:
            child.kill()  # no-op for children that already exited
        server.stop()
        for child in children:
            child.wait(10)
            child.finish()

    events = audit_events(audit_log)
    joins = [t - epoch0 for t in _event_times(events, job, "joined")]
    released = [e for e in events if e.get("job_id") == job and e["event"] == "released"]
    phases: dict[str, float | None] = dict.fromkeys(PHASES)
    if len(joins) == spec.parties and released:
        # Critical path: each phase ends when its last party (or the server) is done.
        computed = float(released[0]["time"]) - epoch0
        phases = {
            "start+read+attest": max(joins),
            "hash+upload+intersect": computed - max(joins),
            "result+rows+write": t_end - t0 - computed,
        }
    wall = t_end - t0
    records = [log_records(c.stderr_lines) for c in clients]
    timings = [client_timings(r) for r in records]
    result: Json = {
        "label": spec.label,
        "rows": spec.rows,
        "parties": spec.parties,
        "format": spec.fmt,
        "server_args": spec.server_args,
        "wall_s": wall,
        "items_per_s": spec.rows * spec.parties / wall,
        "cpu_s": teepsi_cpu,
        "other_load_cores": others,
        "idle_before_cores": quiet,
        "phases_s": phases,
        "client_timings_s": timings,
        "client_walls_s": [c.wall for c in clients],
        "server_peak_rss": server_hwm * KIB,
        "server_peak_rss_at_exit": server.peak_rss_kib * KIB,
        "server_idle_rss": idle_rss * KIB,
        "server_env": spec.server_env,
        "server_rss_timeline": rss_timeline(server, t0),
        "server_rss_peak_phase": peak_phase(server, t0, phases),
        "client_peak_rss": [c.peak_rss_kib * KIB for c in clients],
        "server_peak_threads": server.peak_threads,
        "client_peak_threads": [c.peak_threads for c in clients],
        "client_rss_sources_kib": [
            {
                "vmhwm_polled": c.vmhwm_kib,
                "ru_maxrss": c.ru_maxrss_kib,
                "parent_hwm": c.parent_hwm_kib,
            }
            for c in clients
        ],
        "loopback_bytes": net_after - net_before,
        "intersection": client_intersection(records[0]) if records else None,
        "spilled": any(SERVER_SPILLED in line for _, line in server.stderr_lines),
        "outputs": [str(p) for p in outputs],
        "output_digests": output_digests(outputs, env),
        "logs": str(spec.workdir),
    }
    if spec.spill_scan is not None:
        scan = spec.spill_scan
        result["spill"] = {
            "dir": str(scan.root),
            "files_seen": len(scan.files_seen),
            "max_files_at_once": scan.max_files_at_once,
            "bytes_scanned": scan.bytes_scanned,
            "sample_keys": len(scan.keys),
            "plaintext_hits": scan.plaintext_hits,
            "structured_files": scan.structured_files,
            "files_left_after_job": spill_after_job,
            "files_left_after_server_stop": [str(p) for p in scan.files()],
            "dirs_left_after_server_stop": [str(p) for p in scan.root.iterdir()],
        }
    return result


def rss_timeline(child: Child, t0: float, step: float = 0.25) -> list[tuple[float, int]]:
    """(seconds since t0, RSS bytes), at most one sample per ``step``, the maximum of each."""
    out: list[tuple[float, int]] = []
    for when, kib in child.rss_samples:
        slot = round((when - t0) // step * step, 3)
        if out and out[-1][0] == slot:
            out[-1] = (slot, max(out[-1][1], kib * KIB))
        else:
            out.append((slot, kib * KIB))
    return out


def peak_phase(child: Child, t0: float, phases: dict[str, float | None]) -> str:
    """Which phase the child's sampled RSS peaked in (seconds since t0)."""
    if not child.rss_samples:
        return "unknown"
    when, _ = max(child.rss_samples, key=lambda s: s[1])
    at = when - t0
    if at < 0:
        return f"before the job ({at:.1f} s)"
    elapsed = 0.0
    for name, seconds in phases.items():
        if seconds is None:
            return f"{at:.1f} s"
        elapsed += seconds
        if at <= elapsed:
            return f"{name} ({at:.1f} s)"
    return f"after the last client ({at:.1f} s)"
