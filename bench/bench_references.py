"""The references, each run as its own measured process: polars, DuckDB, openmined-psi."""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_common import (
    BENCH,
    KEY,
    KIB,
    OUT,
    BenchError,
    Json,
    datagen_command,
    log,
    output_digests,
)
from procmon import Child, cpu_busy_seconds, process_cpu_seconds, wait_for_quiet

OPENMINED_VERSION = "2.0.6"


def available_engines() -> list[str]:
    """The in-process references this interpreter can run (DuckDB is in the bench extra)."""
    engines = ["polars"]
    if importlib.util.find_spec("duckdb") is not None:
        engines.append("duckdb")
    else:
        log("duckdb is not installed: no DuckDB reference (pip install -e '.[bench]')")
    return engines


def run_reference(
    engine: str,
    label: str,
    files: list[Path],
    workdir: Path,
    env: dict[str, str],
    timeout: float,
    quiet_wait: float,
) -> Json:
    """One in-process reference (bench/reference.py ENGINE) as its own measured process."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(BENCH / "reference.py"), engine, KEY, str(workdir)]
    cmd += [str(f) for f in files]
    quiet = wait_for_quiet(quiet_wait) if quiet_wait > 0 else None
    busy0, own0 = cpu_busy_seconds(), process_cpu_seconds("self")
    child = Child(engine, cmd, env=env, log_path=workdir / f"{engine}.log")
    try:
        if not child.wait(timeout):
            raise BenchError(f"{label}: {engine} reference still running after {timeout:.0f} s")
        ours = child.cpu_now() + process_cpu_seconds("self") - own0
        others = max(0.0, cpu_busy_seconds() - busy0 - ours) / (time.monotonic() - child.started)
    finally:
        child.kill()
        child.wait(10)
        child.finish()
    if child.returncode != 0:
        raise BenchError(f"{label}: {engine} reference failed: {child.stderr_text()[-500:]}")
    report = json.loads(child.stdout_lines[-1][1])
    outputs = [Path(p) for p in report["outputs"]]
    return {
        "engine": engine,
        "wall_s": child.wall or 0.0,
        "cpu_s": child.cpu_seconds,
        "other_load_cores": others,
        "idle_before_cores": quiet,
        "peak_rss": child.peak_rss_kib * KIB,
        "peak_threads": child.peak_threads,
        "intersection": report["intersection"],
        "outputs": [str(p) for p in outputs],
        "output_digests": output_digests(outputs, env),
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
    cmd = datagen_command(
        source_rows, seed, "--openmined-sample", str(sample), "--openmined-out", str(sample_dir)
    )
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
