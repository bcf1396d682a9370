"""teepsi benchmark (issue 4): separate server and client processes vs two references.

    python bench/run.py --quick          # 100k and 1M rows per party, 2 and 3 parties
    python bench/run.py                  # 1M and 10M rows per party, 2 and 3 parties
    python bench/run.py --write-docs     # also refresh docs/benchmarks.md and .png

Every number in one report comes from the same run on the same files: teepsi (one
``teepsi server`` and one ``teepsi client`` process per party, attested TLS on loopback,
SIMULATED attestation), the in-process polars reference (bench/reference.py), and
openmined-psi (ECDH) on a 100k sample, scaled linearly to 1M. Results go to
bench/out/results-<timestamp>.json and bench/out/chart-<timestamp>.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procmon import (
    Child,
    cpu_busy_seconds,
    loopback_bytes,
    process_cpu_seconds,
    wait_for_quiet,
)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
DATA = OUT / "data"
DOCS = ROOT / "docs"
KIB = 1024
MIB = 1024**2
GIB = 1024**3
OPENMINED_VERSION = "2.0.6"
KEY = "email"

Json = dict[str, Any]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A run failed; the message says which and where its logs are."""


# -- environment ---------------------------------------------------------------------


def child_env(code: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if code is not None:
        # Ahead of site-packages (and of an editable install's finder): the snapshot wins.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH")) if p)
    elif importlib.util.find_spec("teepsi") is None:
        raise BenchError("teepsi is neither installed nor next to bench/ (src/teepsi)")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def snapshot_sources(run_dir: Path, max_wait: float) -> tuple[Path | None, str]:
    """Copy src/teepsi for this run; returns (PYTHONPATH entry, digest of the copy).

    Every job of one run then measures the same code even while the checkout is being
    edited, and the sim MRENCLAVE (a digest of the installed files) stays put. Retried
    until the copy imports, since a copy taken mid-edit may not.
    """
    source = ROOT / "src" / "teepsi"
    if not source.is_dir():
        return None, "installed teepsi"
    deadline = time.monotonic() + max_wait
    target = run_dir / "src"
    while True:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target / "teepsi", ignore=shutil.ignore_patterns("__pycache__"))
        probe = [sys.executable, "-c", "import teepsi.cli, teepsi.server.app, teepsi.client.party"]
        env = dict(os.environ, PYTHONPATH=str(target))
        done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"src/teepsi does not import: {done.stderr.strip().splitlines()[-1]}")
        log("src/teepsi does not import right now (being edited?); retrying in 15 s")
        time.sleep(15)
    digest = hashlib.sha256()
    for path in sorted(target.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(target)).encode() + b"\0" + path.read_bytes())
    return target, digest.hexdigest()


def teepsi(*args: str) -> list[str]:
    return [sys.executable, "-m", "teepsi", *args]


def machine() -> Json:
    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: Json = {}
    for package in ("teepsi", "polars", "numpy", "grpcio", "pyarrow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed" if package != "teepsi" else "source checkout"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round((status_meminfo_kib() or 0) / MIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def status_meminfo_kib() -> int | None:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def prewarm(paths: list[Path]) -> None:
    """Read the inputs once so neither teepsi nor the reference pays for the disk."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(16 * MIB):
                pass


# -- data ------------------------------------------------------------------------------


def generate(rows: int, seed: int, formats: list[str], timeout: float) -> Json:
    """Run datagen.py in its own process: this one stays small (see procmon.py)."""
    cmd = [
        sys.executable,
        str(BENCH / "datagen.py"),
        "--root",
        str(DATA),
        "--rows",
        str(rows),
        "--seed",
        str(seed),
        "--formats",
        ",".join(formats),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise BenchError(f"data generation failed: {done.stderr.strip()[-2000:]}")
    manifest: Json = json.loads(done.stdout.strip().splitlines()[-1])
    log(
        f"data {rows:,} rows/party: "
        + (
            "cached"
            if manifest.get("cached")
            else f"generated in {manifest['generated_seconds']} s"
        )
        + f" in {Path(manifest['files'][formats[0]][0]).parent}"
    )
    return manifest


def sample_keys(paths: list[Path], count: int) -> list[bytes]:
    """Keys from the head of each party's file, to look for on disk."""
    keys: list[bytes] = []
    per_file = count // len(paths)
    for path in paths:
        with open(path, "rb") as handle:
            header = handle.readline().split(b",")
            column = header.index(KEY.encode())
            for _ in range(per_file):
                line = handle.readline()
                if not line:
                    break
                keys.append(line.split(b",")[column].strip())
    return keys


# -- one teepsi job ---------------------------------------------------------------------


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
class JobSpec:
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


SERVER_JOINED = "joined ("
SERVER_UPLOADED = " uploaded "
SERVER_INTERSECTION = "intersection of "
SERVER_DELIVERED = "every party has its result"


def _event_time(lines: list[tuple[float, str]], job: str, marker: str) -> list[float]:
    return [t for t, line in lines if f"job {job}" in line and marker in line]


def _client_timings(lines: list[tuple[float, str]]) -> dict[str, float]:
    """``timing: NAME SECONDS s`` lines, if the client logs them (see docs/benchmarks.md)."""
    found: dict[str, float] = {}
    for _, line in lines:
        _, sep, rest = line.partition("timing: ")
        parts = rest.split()
        if sep and len(parts) >= 2:
            try:
                found[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return found


def _intersection_from(lines: list[tuple[float, str]]) -> int | None:
    for _, line in lines:
        _, sep, rest = line.partition(", intersection ")
        if sep:
            return int(rest.split(",")[0])
    return None


def run_teepsi(spec: JobSpec, env: dict[str, str]) -> Json:
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
    job = f"bench-{spec.parties}p-{spec.rows}"
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
                "--key",
                KEY,
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
        t0 = time.monotonic()
        clients = [
            Child(f"p{i}", cmd, env=env, log_path=spec.workdir / f"client_{i}.log")
            for i, cmd in enumerate(client_cmds, start=1)
        ]
        children += clients
        deadline = t0 + spec.timeout + 30
        for client in clients:
            if not client.wait(deadline - time.monotonic()):
                raise BenchError(f"{spec.label}: {client.name} still running after the timeout")
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
        failed = [c for c in clients if c.returncode != 0]
        if failed:
            for c in clients:
                c.finish()
            tail = failed[0].stderr_text().strip().splitlines()[-3:]
            raise BenchError(
                f"{spec.label}: client {failed[0].name} exited {failed[0].returncode}: "
                f"{' | '.join(tail)} (logs in {spec.workdir})"
            )
        # The job is wiped when the server has seen every delivery; wait for that log line.
        wiped_by = time.monotonic() + 30
        while not _event_time(server.stderr_lines, job, SERVER_DELIVERED):
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

    lines = server.stderr_lines
    joins = _event_time(lines, job, SERVER_JOINED)
    uploads = _event_time(lines, job, SERVER_UPLOADED)
    computed = _event_time(lines, job, SERVER_INTERSECTION)
    phases: dict[str, float | None] = {
        "start+read+attest": None,
        "hash+upload": None,
        "intersect": None,
        "result+rows+write": None,
    }
    if len(joins) == spec.parties and len(uploads) == spec.parties and computed:
        # Critical path: each phase ends when its last party (or the server) is done.
        phases = {
            "start+read+attest": max(joins) - t0,
            "hash+upload": max(uploads) - max(joins),
            "intersect": computed[0] - max(uploads),
            "result+rows+write": t_end - computed[0],
        }
    wall = t_end - t0
    timings = [_client_timings(c.stderr_lines) for c in clients]
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
        "client_rss_sources_kib": [
            {
                "vmhwm_polled": c.vmhwm_kib,
                "ru_maxrss": c.ru_maxrss_kib,
                "parent_hwm": c.parent_hwm_kib,
            }
            for c in clients
        ],
        "loopback_bytes": net_after - net_before,
        "intersection": _intersection_from(clients[0].stderr_lines),
        "spilled": any("spilled to disk" in line for _, line in lines),
        "outputs": [str(p) for p in outputs],
        "output_sha256": [sha256_file(p) for p in outputs],
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


def run_reference(
    label: str,
    files: list[Path],
    workdir: Path,
    env: dict[str, str],
    timeout: float,
    quiet_wait: float,
) -> Json:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(BENCH / "reference.py"), KEY, str(workdir), *map(str, files)]
    quiet = wait_for_quiet(quiet_wait) if quiet_wait > 0 else None
    busy0, own0 = cpu_busy_seconds(), process_cpu_seconds("self")
    child = Child("reference", cmd, env=env, log_path=workdir / "reference.log")
    try:
        if not child.wait(timeout):
            raise BenchError(f"{label}: reference still running after {timeout:.0f} s")
        ours = child.cpu_now() + process_cpu_seconds("self") - own0
        others = max(0.0, cpu_busy_seconds() - busy0 - ours) / (time.monotonic() - child.started)
    finally:
        child.kill()
        child.wait(10)
        child.finish()
    if child.returncode != 0:
        raise BenchError(f"{label}: reference failed: {child.stderr_text()[-500:]}")
    report = json.loads(child.stdout_lines[-1][1])
    outputs = [Path(p) for p in report["outputs"]]
    wall = child.wall or 0.0
    return {
        "wall_s": wall,
        "cpu_s": child.cpu_seconds,
        "other_load_cores": others,
        "idle_before_cores": quiet,
        "peak_rss": child.peak_rss_kib * KIB,
        "intersection": report["intersection"],
        "outputs": [str(p) for p in outputs],
        "output_sha256": [sha256_file(p) for p in outputs],
    }


# -- openmined-psi ----------------------------------------------------------------------


def openmined_python(timeout: float) -> Path:
    """bench/out/venv-openmined/bin/python with openmined-psi installed (created once)."""
    venv = OUT / "venv-openmined"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import private_set_intersection.python as p; print(p.__version__)"]
    if python.exists():
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 0 and done.stdout.strip() == OPENMINED_VERSION:
            return python
    log(f"creating {venv} with openmined-psi=={OPENMINED_VERSION} (separate: it pins protobuf 6)")
    # The base interpreter, not this venv's: a venv made from a venv works but is fragile.
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run(
        [str(base), "-m", "venv", "--clear", str(venv)],
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"openmined-psi=={OPENMINED_VERSION}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"pip install openmined-psi failed: {done.stderr.strip()[-500:]}")
    return python


def run_openmined(
    source_rows: int, sample: int, seed: int, structure: str, timeout: float, quiet_wait: float
) -> Json:
    python = openmined_python(timeout=900)
    sample_dir = OUT / "openmined-sample" / f"rows{source_rows}-seed{seed}-n{sample}"
    cmd = [
        sys.executable,
        str(BENCH / "datagen.py"),
        "--root",
        str(DATA),
        "--rows",
        str(source_rows),
        "--seed",
        str(seed),
        "--openmined-sample",
        str(sample),
        "--openmined-out",
        str(sample_dir),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise BenchError(f"openmined sample failed: {done.stderr.strip()[-500:]}")
    quiet = wait_for_quiet(quiet_wait) if quiet_wait > 0 else None
    busy0, own0 = cpu_busy_seconds(), process_cpu_seconds("self")
    started = time.monotonic()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [
        str(python),
        str(BENCH / "openmined_psi_bench.py"),
        str(sample_dir / "server_keys.txt"),
        str(sample_dir / "client_keys.txt"),
        structure,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    ours = cpu + process_cpu_seconds("self") - own0
    others = max(0.0, cpu_busy_seconds() - busy0 - ours) / (time.monotonic() - started)
    if done.returncode != 0:
        raise BenchError(f"openmined-psi run failed: {done.stderr.strip()[-500:]}")
    report: Json = json.loads(done.stdout.strip().splitlines()[-1])
    if report["intersection"] != sample // 2:
        raise BenchError(f"openmined-psi found {report['intersection']} of {sample // 2}")
    report["cpu_s"] = cpu
    report["other_load_cores"] = others
    report["idle_before_cores"] = quiet
    report["scale_to_rows"] = 1_000_000
    report["scaled_seconds"] = report["seconds"] * 1_000_000 / sample
    return report


# -- report ---------------------------------------------------------------------------


def fmt_rows(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def fmt_s(s: float | None) -> str:
    return "n/a" if s is None else f"{s:.2f}"


def median_run(runs: list[Json]) -> Json:
    walls = sorted(r["wall_s"] for r in runs)
    middle = walls[(len(walls) - 1) // 2]
    return next(r for r in runs if r["wall_s"] == middle)


TABLE_COLUMNS = [
    "configuration", "rows/party", "parties", "intersection", "wall s", "start+read+attest s",
    "hash+upload s", "intersect s", "result+rows+write s", "items/s", "server peak RSS",
    "max client peak RSS", "loopback bytes", "CPU s", "reference wall s", "reference peak RSS",
    "reference CPU s", "teepsi / reference", "openmined / teepsi", "other load (cores)",
]  # fmt: skip


def _teepsi_cells(label: str, rows: int, parties: int, t: Json) -> list[str]:
    ph = t["phases_s"]
    return [
        label, f"{rows:,}", str(parties), f"{t['intersection']:,}", f"{t['wall_s']:.2f}",
        fmt_s(ph["start+read+attest"]), fmt_s(ph["hash+upload"]), fmt_s(ph["intersect"]),
        fmt_s(ph["result+rows+write"]), f"{t['items_per_s']:,.0f}",
        fmt_bytes(t["server_peak_rss"]), fmt_bytes(max(t["client_peak_rss"])),
        f"{t['loopback_bytes'] / MIB:,.0f} MiB", f"{t['cpu_s']:.1f}",
    ]  # fmt: skip


def build_table(results: Json) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    openmined = results.get("openmined") or {}
    for config in results["configs"]:
        t = median_run(config["teepsi"])
        ref = median_run(config["reference"])
        om = "—"
        if openmined.get("scaled_seconds") and (config["rows"], config["parties"]) == (
            1_000_000,
            2,
        ):
            speedup = openmined["scaled_seconds"] / t["wall_s"]
            om = f"{speedup:.0f}x (sampled at 100k, scaled linearly)"
        repeats = f" (median of {len(config['teepsi'])})" if len(config["teepsi"]) > 1 else ""
        cells = _teepsi_cells(config["label"] + repeats, config["rows"], config["parties"], t)
        cells += [
            f"{ref['wall_s']:.2f}",
            fmt_bytes(ref["peak_rss"]),
            f"{ref['cpu_s']:.1f}",
            f"{t['wall_s'] / ref['wall_s']:.2f}x",
            om,
            f"{t['other_load_cores']:.2f} / {ref['other_load_cores']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    budget = results.get("budget")
    if budget:
        t = budget["teepsi"]
        cells = _teepsi_cells(budget["label"], budget["rows"], 2, t)
        cells += ["—", "—", "—", "—", "—", f"{t['other_load_cores']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_warning(results: Json) -> str:
    """Say so when other processes used the CPU while we measured."""
    worst = 0.0
    runs = [r for c in results["configs"] for r in c["teepsi"] + c["reference"]]
    runs += [results["budget"]["teepsi"]] if results.get("budget") else []
    runs += [results["openmined"]] if (results.get("openmined") or {}).get("cpu_s") else []
    for run in runs:
        worst = max(worst, run["other_load_cores"])
    if worst < 0.2:
        return ""
    return (
        f"**Warning:** other processes used up to {worst:.2f} CPU cores during some timed runs "
        "(column *other load*, teepsi / reference); those ratios are skewed. Re-run on an idle "
        "machine."
    )


def client_timing_table(results: Json) -> str:
    """Per-phase client timings, when the client logs ``timing:`` lines."""
    names: list[str] = []
    for config in results["configs"]:
        for timing in median_run(config["teepsi"])["client_timings_s"]:
            names += [n for n in timing if n not in names]
    if not names:
        return ""
    lines = [
        "| configuration | " + " | ".join(f"{n} s (max over parties)" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for config in results["configs"]:
        timings = median_run(config["teepsi"])["client_timings_s"]
        cells = [fmt_s(max((t[n] for t in timings if n in t), default=None)) for n in names]
        lines.append(f"| {config['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Check:
    name: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{verdict}  {self.name}: {self.detail}"


def acceptance(results: Json) -> list[Check]:
    configs = {(c["rows"], c["parties"]): c for c in results["configs"]}
    sizes = sorted({c["rows"] for c in results["configs"]})
    big = max(sizes)
    note = "" if big >= 10_000_000 else f" [at {fmt_rows(big)}: quick run, not the acceptance size]"
    checks: list[Check] = []

    for (rows, parties), c in sorted(configs.items()):
        t, ref = median_run(c["teepsi"]), median_run(c["reference"])
        same = t["output_sha256"] == ref["output_sha256"]
        checks.append(
            Check(
                f"{parties}x{fmt_rows(rows)} outputs byte-identical to the reference",
                same,
                "identical" if same else "DIFFERENT",
            )
        )

    if (big, 2) in configs:
        c = configs[(big, 2)]
        t, ref = median_run(c["teepsi"]), median_run(c["reference"])
        ratio = t["wall_s"] / ref["wall_s"]
        checks.append(
            Check(
                f"2x{fmt_rows(big)} wall ≤ 1.0x in-process reference",
                ratio <= 1.0,
                f"{t['wall_s']:.2f} s vs {ref['wall_s']:.2f} s = {ratio:.2f}x{note}",
            )
        )
        checks.append(
            Check(
                f"server peak RSS at 2x{fmt_rows(big)} ≤ 1.5 GiB",
                t["server_peak_rss"] <= 1.5 * GIB,
                f"{fmt_bytes(t['server_peak_rss'])}{note}",
            )
        )
    om = results.get("openmined")
    if (1_000_000, 2) in configs and om and om.get("scaled_seconds"):
        t = median_run(configs[(1_000_000, 2)]["teepsi"])
        speedup = om["scaled_seconds"] / t["wall_s"]
        checks.append(
            Check(
                "1Mx1M ≥ 100x faster than openmined-psi",
                speedup >= 100,
                f"openmined {om['scaled_seconds']:.0f} s (sampled at "
                f"{om['server_items'] // 1000}k, scaled linearly) vs teepsi "
                f"{t['wall_s']:.2f} s = {speedup:.0f}x",
            )
        )
    else:
        reason = (om or {}).get("error", "not run")
        checks.append(Check("1Mx1M ≥ 100x faster than openmined-psi", None, reason))
    budget = results.get("budget")
    if budget:
        t = budget["teepsi"]
        spill = t["spill"]
        identical = t["output_sha256"] == budget["default_output_sha256"]
        limit = budget["server_rss_limit"]
        on_disk_clean = not spill["plaintext_hits"] and not spill["structured_files"]
        emptied = not spill["files_left_after_job"] and not spill["dirs_left_after_server_stop"]
        checks.append(
            Check(
                f"--memory-budget {budget['budget_text']} at 2x{fmt_rows(budget['rows'])}: "
                "identical output",
                identical,
                ("byte-identical to the default run" if identical else "DIFFERENT")
                + (" (spilled)" if t["spilled"] else " (NO SPILL happened)"),
            )
        )
        checks.append(
            Check(
                f"--memory-budget {budget['budget_text']}: server peak RSS ≤ {fmt_bytes(limit)}",
                t["server_peak_rss"] <= limit,
                f"{fmt_bytes(t['server_peak_rss'])}{budget['note']}",
            )
        )
        checks.append(
            Check(
                f"--memory-budget {budget['budget_text']}: no plaintext on disk, spill dir emptied",
                on_disk_clean and emptied and t["spilled"],
                f"{spill['files_seen']} spill files ({spill['bytes_scanned'] / MIB:.0f} MiB) "
                f"scanned for {spill['sample_keys']} sample keys and record structure: "
                f"{len(spill['plaintext_hits'])} with a key, "
                f"{len(spill['structured_files'])} non-random; files left after the job: "
                f"{len(spill['files_left_after_job'] or [])}, "
                f"after server stop: {len(spill['dirs_left_after_server_stop'])} dirs",
            )
        )
    for rows in sizes:
        if (rows, 2) in configs and (rows, 3) in configs:
            w2 = median_run(configs[(rows, 2)]["teepsi"])["wall_s"]
            w3 = median_run(configs[(rows, 3)]["teepsi"])["wall_s"]
            checks.append(
                Check(
                    f"3 parties ≤ 1.6x 2 parties at {fmt_rows(rows)}",
                    w3 / w2 <= 1.6,
                    f"{w3:.2f} s vs {w2:.2f} s = {w3 / w2:.2f}x",
                )
            )
    return checks


def chart(results: Json, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    labels = [c["label"] for c in results["configs"]]
    ours = [median_run(c["teepsi"])["wall_s"] for c in results["configs"]]
    ref = [median_run(c["reference"])["wall_s"] for c in results["configs"]]
    x = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars_t = ax.bar(
        [i - 0.2 for i in x], ours, 0.4, label="teepsi (server + clients, attested TLS)"
    )
    bars_r = ax.bar(
        [i + 0.2 for i in x], ref, 0.4, label="in-process polars reference (no privacy)"
    )
    ax.bar_label(bars_t, fmt="%.1f s", fontsize=8)
    ax.bar_label(bars_r, fmt="%.1f s", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_ylabel("end-to-end wall time (s)")
    ax.set_xlabel("parties x rows per party")
    m = results["machine"]
    title = f"teepsi PSI, {m['nproc']} cores, {m['cpu']}"
    om = results.get("openmined") or {}
    if om.get("scaled_seconds"):
        title += f"\nopenmined-psi 1Mx1M: {om['scaled_seconds']:.0f} s (100k sample, scaled)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report_text(results: Json, checks: list[Check]) -> str:
    parts = [build_table(results)]
    warning = load_warning(results)
    if warning:
        parts += ["", warning]
    timings = client_timing_table(results)
    if timings:
        parts += ["", "Client phases (from its `timing:` log lines):", "", timings]
    om = results.get("openmined") or {}
    if om.get("scaled_seconds"):
        parts += [
            "",
            (
                f"openmined-psi {om['version']} (ECDH, {om['data_structure'].upper()}, fpr "
                f"{om['fpr']:g}): {om['server_items']:,}x{om['client_items']:,} keys in "
                f"{om['seconds']:.1f} s (protocol only, one process, no network), "
                f"{om['message_bytes'] / MIB:.1f} MiB of messages; 1Mx1M **sampled at 100k, scaled "
                f"linearly**: {om['scaled_seconds']:.0f} s (other load "
                f"{om.get('other_load_cores', 0.0):.2f} cores)."
            ),
        ]
    elif om.get("error"):
        parts += ["", f"openmined-psi: not measured ({om['error']})."]
    peaks = [
        f"{c['label']}: {peak['server_rss_peak_phase']}"
        for c in results["configs"]
        for peak in [median_run(c["teepsi"])]
    ]
    if results.get("budget"):
        peaks.append(
            f"{results['budget']['label']}: {results['budget']['teepsi']['server_rss_peak_phase']}"
        )
    parts += ["", "Server RSS peaked in: " + "; ".join(peaks) + "."]
    parts += ["", "```", *(c.line() for c in checks), "```"]
    return "\n".join(parts)


def write_docs(results: Json, report: str, chart_path: Path | None) -> None:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    image = ""
    if chart_path is not None:
        shutil.copyfile(chart_path, DOCS / "benchmarks.png")
        image = "![wall time per configuration](benchmarks.png)\n"
    text = f"""# Benchmarks

Generated by `{results["command"]}` on {results["date"]} (raw results:
`bench/out/{Path(results["json"]).name}`, not committed). Re-run with `make bench`
(1M and 10M rows per party, median of 3 runs each) or `make bench-quick` (100k and 1M, one
run each).

**Machine:** {m["nproc"]} CPUs ({m["cpu"]}), {m["memory_gib"]} GiB RAM, Linux {m["kernel"]},
Python {m["python"]}; {versions}.

{image}
{report}

## What is measured

* **Data:** seeded tables (`bench/datagen.py`) with an e-mail-like key
  (`user{{id}}@example{{id % 97}}.com`) and three more columns (amount, name, date), rows
  shuffled, one CSV file per party. Every pair of parties shares 50% of its keys; the
  3-party intersection is 25% (the 2-party configuration uses parties 1 and 2 of the same
  files). The intersection column is the size each run reported.
* **teepsi:** for each configuration a fresh `teepsi server` process and one `teepsi client`
  process per party, all clients started together, gRPC over TLS on 127.0.0.1 with
  SIMULATED attestation (the same verification code as on hardware, evidence from the
  simulated platform). **Wall** runs from the first client's start to the last client's exit,
  i.e. the last result file written; it includes interpreter start-up, reading the CSV,
  attestation, hashing, upload, intersection, download, selecting rows and writing them.
* **Phases** are the critical path, from the server's log lines (time-stamped as they arrive):
  start+read+attest ends when the last party has joined, hash+upload when the last upload is
  complete, intersect when the server has the result, result+rows+write when the last client
  has exited.
* **Peak RSS** is each process's `VmHWM` (server: read while it is still running, so exact;
  clients: `wait4`'s `ru_maxrss` and `VmHWM` polled every 20 ms). **Loopback bytes** are
  `/proc/net/dev` counters of `lo` (everything on loopback during the run, not only teepsi).
* **In-process reference** (`bench/reference.py`): one Python process reads every party's
  file with polars, takes the unique keys, semi-joins them, and writes each party's matching
  rows ordered by key: the same outputs, checked byte for byte against teepsi's. Timed and
  measured the same way (process start to exit). Inputs are read once beforehand so that
  neither side pays for the disk.
* **openmined-psi** {OPENMINED_VERSION} (ECDH) in its own venv: server setup, client request,
  server response and client intersection in one process (no network: this flatters it), on
  100k keys per party drawn from the same files with the same 50% overlap; the 1Mx1M time is
  **sampled at 100k and scaled linearly** (ECDH costs a constant per item).
* **Memory budget:** the largest 2-party job again with `--memory-budget` and `--spill-dir`;
  the output must be byte-identical to the default run. While the job runs every file in the
  spill directory is scanned for sample keys (all of them contain `@example`, so one search
  per file covers every key) and for the 16-byte record structure a plaintext spill segment
  would show; the directory must be empty after the job and gone after the server stops.
  Nothing but 128-bit keyed digests ever reaches the server, so the key search is a
  tripwire; the structure test is what would catch an unencrypted segment.
* **Fairness:** one untimed warm-up job first (bytecode, page cache); teepsi and the
  reference alternate configuration by configuration; before each timed run the harness
  waits (up to `--quiet-wait` seconds) for the machine to be idle, and **other load** reports
  the CPU other processes used during each run, in cores (`/proc/stat` minus our processes).
  Ratios from runs with other load are skewed. **CPU s** is the CPU time of the server and
  clients (or of the reference), which other load disturbs much less than wall time.
* **Code measured:** a copy of `src/teepsi` taken at the start of the run (digest in the
  JSON), so that every job of one run measures the same code.
* **Client phases** come from the clients' `timing: PHASE SECONDS s (cpu SECONDS s)` lines
  (logged at DEBUG, `-v`): the slowest party's wall time per phase.

## Where the time goes, and what keeps it low

On 2 cores three or four processes share the CPU, so teepsi wins on CPU time per row, not
on parallelism. What each part costs at 10M rows per party, and the choices behind it:

* **Reading** (about 3 CPU-s per party): polars reads the CSV from its path (parallel),
  the frame is made one contiguous chunk (gathering rows later from the hundreds of chunks
  a parallel read leaves costs ten times more), and keys are normalised in one pass.
* **Hashing** (about 1 CPU-s): two keyed XXH3-64 digests per key, sorted and de-duplicated
  as 128-bit values; the client uploads its records sorted.
* **Server**: an upload is checked to be ascending and distinct (linear) and hashed for its
  set digest as it arrives, then split into partitions by AES-128 of each record under a key
  drawn per job (one 8-bit radix permutation and one gather, which replaces the decoding
  copy; each partition stays sorted); per partition the smaller set's records are looked up
  in the larger by binary search on the first digest (exact on all 128 bits); the result is
  sorted once at the end. About 1.3 CPU-s for 2 x 10M records (1.0 with the old, steerable split).
* **Matching rows** (about 4 CPU-s for 5M matches): the result's records select rows by a
  hash lookup; the keys are then ordered by sorting their UTF-8 bytes as 128-bit columns of
  big-endian words, then length, then position (1.7 CPU-s for 5M keys against 5.5 for a
  string sort; keys over 128 bytes take polars' string sort); one gather in key order,
  then long strings are copied into contiguous buffers so that writing them is sequential
  (writing 5M rows: 3.5 CPU-s before, under 1 after).
"""
    (DOCS / "benchmarks.md").write_text(text)
    log(f"wrote {DOCS / 'benchmarks.md'}" + (" and benchmarks.png" if image else ""))


# -- main -----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"kib": KIB, "mib": MIB, "gib": GIB}
    lower = text.lower()
    for unit, factor in units.items():
        if lower.endswith(unit):
            return int(float(lower[: -len(unit)]) * factor)
    return int(text)


def warm_up(run_dir: Path, env: dict[str, str], seed: int, fmt: str) -> None:
    """An untimed 2-party job and reference on 1000 rows.

    It compiles bytecode and warms the page cache for teepsi and polars alike, so the
    first timed configuration does not pay for it; and it proves the code works at all.
    """
    small = generate(1000, seed, [fmt], timeout=300)
    files = [Path(f) for f in small["files"][fmt]][:2]
    warm = JobSpec("warm-up", 1000, 2, files, fmt, run_dir / "warm-up", 120)
    dropped = run_teepsi(warm, env)["outputs"]
    ref = run_reference("warm-up", files, run_dir / "warm-up" / "reference", env, 120, 0)
    for path in dropped + ref["outputs"]:
        Path(path).unlink(missing_ok=True)
    log("warm-up job done (not timed)")


def prepare_code(
    args: argparse.Namespace, run_dir: Path
) -> tuple[Path | None, str, dict[str, str]]:
    """Which teepsi the run measures: a working snapshot of src/teepsi, or the installed one."""
    if args.code:
        code: Path | None = Path(args.code).resolve()
        digest = f"given: {code}"
    elif args.no_snapshot:
        code, digest = None, "installed teepsi"
    else:
        code, digest = snapshot_sources(run_dir, args.snapshot_wait)
    deadline = time.monotonic() + args.snapshot_wait
    while True:
        env = child_env(code)
        if args.no_warmup:
            return code, digest, env
        try:
            warm_up(run_dir, env, args.seed, args.format)
            return code, digest, env
        except BenchError as exc:
            if args.code or args.no_snapshot or time.monotonic() > deadline:
                raise
            # A snapshot taken mid-edit can import yet not work: take another one.
            log(f"warm-up failed ({str(exc)[-300:]}); new snapshot of src/teepsi in 30 s")
            time.sleep(30)
            code, digest = snapshot_sources(run_dir, args.snapshot_wait)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100k and 1M rows per party")
    parser.add_argument("--sizes", help="rows per party, comma-separated (overrides --quick)")
    parser.add_argument("--parties", default="2,3", help="party counts (default 2,3)")
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--budget", default="256MiB", help="memory budget of the spill run")
    parser.add_argument("--no-budget-run", action="store_true")
    parser.add_argument("--no-openmined", action="store_true")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up job")
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run the installed teepsi instead of a copy of src/teepsi taken at the start",
    )
    parser.add_argument("--code", help="a directory holding the teepsi package to measure")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the server only (experiments, e.g. MALLOC_ARENA_MAX=2)",
    )
    parser.add_argument(
        "--snapshot-wait",
        type=float,
        default=600.0,
        help="how long to retry when src/teepsi does not import (default 600 s)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each timed run, wait up to this many seconds for the machine to be idle "
        "(other processes' CPU skews timings); 0 to start at once",
    )
    parser.add_argument("--openmined-sample", type=int, default=100_000)
    parser.add_argument("--openmined-structure", choices=["raw", "gcs"], default="raw")
    parser.add_argument("--keep-outputs", action="store_true", help="keep result files")
    parser.add_argument(
        "--write-docs", action="store_true", help="write docs/benchmarks.md and docs/benchmarks.png"
    )
    args = parser.parse_args(argv)

    if not sys.platform.startswith("linux"):
        print("bench/run.py measures through /proc: Linux only", file=sys.stderr)
        return 2

    # SIGTERM becomes an exception so every finally-block kills its children.
    def _on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _on_term)

    if args.sizes:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    else:
        sizes = [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000]
    party_counts = [int(p) for p in args.parties.split(",")]
    server_env = dict(item.split("=", 1) for item in args.server_env)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = OUT / "runs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        code, code_digest, env = prepare_code(args, run_dir)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: Json = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command.strip(),
        "machine": machine(),
        "code": {"pythonpath": str(code) if code else None, "sha256": code_digest},
        "sizes": sizes,
        "parties": party_counts,
        "format": args.format,
        "server_env": server_env,
        "configs": [],
    }
    log(f"machine: {results['machine']}")
    log(f"runs and logs in {run_dir}; teepsi code: {code or 'installed'} ({code_digest[:16]})")

    manifests: dict[int, Json] = {}
    for rows in sizes:
        manifests[rows] = generate(rows, args.seed, [args.format], timeout=1800)

    outputs_to_drop: list[Path] = []
    try:
        for rows in sizes:
            files = [Path(f) for f in manifests[rows]["files"][args.format]]
            prewarm(files)
            timeout = 120 + 40 * rows * max(party_counts) / 1_000_000
            for parties in party_counts:
                label = f"{parties}x{fmt_rows(rows)}"
                config: Json = {
                    "label": label,
                    "rows": rows,
                    "parties": parties,
                    "expected_intersection": manifests[rows]["intersection"][str(parties)],
                    "teepsi": [],
                    "reference": [],
                }
                for rep in range(args.repeat):
                    workdir = run_dir / f"{parties}p-{rows}-{rep}"
                    spec = JobSpec(
                        label,
                        rows,
                        parties,
                        files[:parties],
                        args.format,
                        workdir,
                        timeout,
                        args.quiet_wait,
                        server_env=server_env,
                    )
                    t = run_teepsi(spec, env)
                    ref = run_reference(
                        label, files[:parties], workdir / "reference", env, timeout, args.quiet_wait
                    )
                    config["teepsi"].append(t)
                    config["reference"].append(ref)
                    outputs_to_drop += [Path(p) for p in t["outputs"] + ref["outputs"]]
                    same = (
                        "identical" if t["output_sha256"] == ref["output_sha256"] else "DIFFERENT"
                    )
                    log(
                        f"{label}: teepsi {t['wall_s']:.2f} s, reference {ref['wall_s']:.2f} s "
                        f"({t['wall_s'] / ref['wall_s']:.2f}x), server peak "
                        f"{fmt_bytes(t['server_peak_rss'])}, intersection {t['intersection']:,}, "
                        f"outputs {same}"
                    )
                results["configs"].append(config)

        if not args.no_budget_run and 2 in party_counts:
            rows = max(sizes)
            budget = parse_size(args.budget)
            note = ""
            rss_limit = 600 * MIB
            if rows < 10_000_000:
                # Quick run: scale the budget down so that the job still spills.
                budget = max(8 * MIB, budget * rows // 10_000_000)
                note = " [quick run: budget scaled to the size; acceptance is at 10M/256MiB]"
            budget_text = f"{budget / MIB:g}MiB"
            files = [Path(f) for f in manifests[rows]["files"][args.format]][:2]
            spill_root = OUT / f"spill-{stamp}"
            spill_root.mkdir(parents=True, exist_ok=True)
            label = f"2x{fmt_rows(rows)} --memory-budget {budget_text}"
            scan = SpillScan(spill_root, sample_keys(files, 1000))
            spec = JobSpec(
                label,
                rows,
                2,
                files,
                args.format,
                run_dir / f"budget-{rows}",
                120 + 80 * rows / 1_000_000,
                args.quiet_wait,
                ["--memory-budget", str(budget), "--spill-dir", str(spill_root)],
                scan,
                server_env,
            )
            t = run_teepsi(spec, env)
            outputs_to_drop += [Path(p) for p in t["outputs"]]
            default = next(c for c in results["configs"] if c["rows"] == rows and c["parties"] == 2)
            results["budget"] = {
                "label": label,
                "rows": rows,
                "budget_bytes": budget,
                "budget_text": budget_text,
                "server_rss_limit": rss_limit,
                "note": note,
                "teepsi": t,
                "default_output_sha256": default["teepsi"][0]["output_sha256"],
            }
            log(
                f"{label}: {t['wall_s']:.2f} s, server peak {fmt_bytes(t['server_peak_rss'])}, "
                f"spilled={t['spilled']}, {t['spill']['files_seen']} spill files scanned"
            )
            if not any(spill_root.iterdir()):
                spill_root.rmdir()

        if not args.no_openmined:
            try:
                source = 1_000_000
                if source not in manifests:
                    manifests[source] = generate(source, args.seed, ["csv"], timeout=1800)
                log(
                    f"openmined-psi: {args.openmined_sample:,}x{args.openmined_sample:,} keys "
                    "(this takes a while: ECDH costs ~0.4 ms per item)"
                )
                results["openmined"] = run_openmined(
                    source,
                    args.openmined_sample,
                    args.seed,
                    args.openmined_structure,
                    timeout=3600,
                    quiet_wait=args.quiet_wait,
                )
                om = results["openmined"]
                log(
                    f"openmined-psi: {om['seconds']:.1f} s at {args.openmined_sample:,}, "
                    f"scaled to 1M: {om['scaled_seconds']:.0f} s "
                    f"(other load {om['other_load_cores']:.2f} cores)"
                )
            except (BenchError, subprocess.SubprocessError, OSError) as exc:
                log(f"openmined-psi not measured: {exc}")
                results["openmined"] = {"error": str(exc)}
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        if not args.keep_outputs:
            for path in outputs_to_drop:
                path.unlink(missing_ok=True)

    checks = acceptance(results)
    results["checks"] = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
    json_path = OUT / f"results-{stamp}.json"
    results["json"] = str(json_path)
    json_path.write_text(json.dumps(results, indent=2, default=str))
    chart_path: Path | None = OUT / f"chart-{stamp}.png"
    assert chart_path is not None
    if not chart(results, chart_path):
        chart_path = None
    report = report_text(results, checks)
    print(report)
    log(f"results: {json_path}" + (f", chart: {chart_path}" if chart_path else ""))
    if args.write_docs:
        write_docs(results, report, chart_path)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupted:
        # The finally-blocks have already stopped every child process by now.
        log(f"interrupted ({interrupted or 'Ctrl-C'}); child processes stopped")
        sys.exit(130)
