"""The runs of a benchmark: the code measured, the data, and every timed job in turn.

bench/run.py parses the command line and calls these; each function runs one kind of job
(the warm-up, one configuration's teepsi job and references, the spill run, openmined-psi)
and returns or records what it measured.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import (
    DATA,
    MIB,
    OUT,
    ROOT,
    BenchError,
    Json,
    child_env,
    datagen_command,
    fmt_bytes,
    fmt_rows,
    log,
)
from bench_references import available_engines, run_openmined, run_reference
from teepsi_job import BenchJobSetup, SpillScan, run_teepsi, sample_keys

from teepsi.sizes import parse_size

#: Bytes per row on disk per format at 100M rows (bench/datagen.py), for the disk check.
BYTES_PER_ROW = {"txt": 28, "csv": 64, "parquet": 32}


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
    # Byte-compiled, as pip installs a package: else every process of every job compiles
    # teepsi's sources at start-up where PYTHONDONTWRITEBYTECODE is set (0.2 s of CPU
    # each), which the references' installed libraries never do. The sim measurement
    # leaves the .pyc files out.
    compileall.compile_dir(target, quiet=1)
    return target, digest.hexdigest()


def machine() -> Json:
    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: Json = {}
    for package in ("teepsi", "polars", "duckdb", "numpy", "grpcio", "pyarrow"):
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


def prewarm(paths: list[Path]) -> None:
    """Read the inputs once so neither teepsi nor the reference pays for the disk."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(16 * MIB):
                pass


# -- data ------------------------------------------------------------------------------


def generate(rows: int, seed: int, formats: list[str], timeout: float, parties: int = 3) -> Json:
    """Run datagen.py in its own process: this one stays small (see procmon.py)."""
    cmd = datagen_command(rows, seed, "--formats", ",".join(formats), "--parties", str(parties))
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


def check_disk(rows: int, formats: list[str], parties: int) -> None:
    """Fail before generating when the data and outputs would not fit on the disk."""
    DATA.mkdir(parents=True, exist_ok=True)
    # One file per party and format, plus one run's outputs of teepsi and the two
    # references (half the rows match; outputs are deleted once compared).
    inputs = sum(BYTES_PER_ROW[f] for f in formats) * rows * parties
    need = inputs + max(BYTES_PER_ROW[f] for f in formats) * rows // 2 * parties * 3
    free = shutil.disk_usage(DATA).free
    if need > free:
        raise BenchError(
            f"{DATA}: {fmt_bytes(free)} free, {rows:,} rows per party in "
            f"{','.join(formats)} need about {fmt_bytes(need)}; free space or use ROWS=..."
        )
    log(f"disk: {fmt_bytes(free)} free in {DATA}, about {fmt_bytes(need)} needed")


def drop_outputs(paths: list[Path], keep: bool) -> None:
    if not keep:
        for path in paths:
            path.unlink(missing_ok=True)


def warm_up(run_dir: Path, env: dict[str, str], seed: int, fmt: str) -> None:
    """An untimed 2-party job and references on 1000 rows.

    It compiles bytecode and warms the page cache for teepsi and the references alike, so
    the first timed configuration does not pay for it; and it proves the code works at all.
    """
    small = generate(1000, seed, [fmt], timeout=300)
    files = [Path(f) for f in small["files"][fmt]][:2]
    warm = BenchJobSetup("warm-up", 1000, 2, files, fmt, run_dir / "warm-up", 120)
    dropped = run_teepsi(warm, env)["outputs"]
    for engine in available_engines():
        ref = run_reference(engine, "warm-up", files, run_dir / "warm-up" / engine, env, 120, 0)
        dropped += ref["outputs"]
    for path in dropped:
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
            warm_up(run_dir, env, args.seed, args.formats[0])
            return code, digest, env
        except BenchError as exc:
            if args.code or args.no_snapshot or time.monotonic() > deadline:
                raise
            # A snapshot taken mid-edit can import yet not work: take another one.
            log(f"warm-up failed ({str(exc)[-300:]}); new snapshot of src/teepsi in 30 s")
            time.sleep(30)
            code, digest = snapshot_sources(run_dir, args.snapshot_wait)


def run_configs(
    args: argparse.Namespace,
    env: dict[str, str],
    manifests: dict[int, Json],
    run_dir: Path,
    results: Json,
    partial: Path,
) -> None:
    """Every (rows, format, parties) configuration: teepsi, then each reference, alternating.

    Fills ``results["configs"]``, and ``results["failed"]`` with the configurations whose
    runs failed (the others go on: a 100M run takes hours); ``partial`` is rewritten after
    each configuration so that no finished measurement is lost.
    """
    engines = available_engines()
    for rows in args.size_list:
        timeout = 120 + 40 * rows * max(args.party_counts) / 1_000_000
        for fmt in args.formats:
            files = [Path(f) for f in manifests[rows]["files"][fmt]]
            prewarm(files)
            for parties in args.party_counts:
                label = f"{parties}x{fmt_rows(rows)} {fmt}"
                config: Json = {
                    "label": label,
                    "rows": rows,
                    "parties": parties,
                    "format": fmt,
                    "expected_intersection": manifests[rows]["intersection"][str(parties)],
                    "teepsi": [],
                    "references": {engine: [] for engine in engines},
                }
                try:
                    for rep in range(args.repeat):
                        workdir = run_dir / f"{parties}p-{rows}-{fmt}-{rep}"
                        run_repetition(args, env, config, files[:parties], workdir, timeout)
                    results["configs"].append(config)
                except BenchError as exc:
                    log(f"{label} FAILED: {exc}")
                    results["failed"].append({"label": label, "error": str(exc)})
                    for path in run_dir.glob(f"{parties}p-{rows}-{fmt}-*/**/*_[0-9]*.{fmt}"):
                        path.unlink(missing_ok=True)  # outputs of the failed run
                partial.write_text(json.dumps(results, indent=2, default=str))


def run_repetition(
    args: argparse.Namespace,
    env: dict[str, str],
    config: Json,
    files: list[Path],
    workdir: Path,
    timeout: float,
) -> None:
    """One teepsi job and each reference on the same files; outputs compared, then deleted."""
    label, fmt = config["label"], config["format"]
    setup = BenchJobSetup(
        label,
        config["rows"],
        config["parties"],
        files,
        fmt,
        workdir,
        timeout,
        args.quiet_wait,
        server_env=args.server_env_map,
    )
    t = run_teepsi(setup, env)
    config["teepsi"].append(t)
    outputs = [Path(p) for p in t["outputs"]]
    line = f"{label}: teepsi {t['wall_s']:.2f} s"
    for engine, runs in config["references"].items():
        ref = run_reference(engine, label, files, workdir / engine, env, timeout, args.quiet_wait)
        runs.append(ref)
        outputs += [Path(p) for p in ref["outputs"]]
        same = t["output_digests"] == ref["output_digests"]
        line += (
            f", {engine} {ref['wall_s']:.2f} s ({t['wall_s'] / ref['wall_s']:.2f}x, "
            f"outputs {'identical' if same else 'DIFFERENT'})"
        )
    # Compared by digest already; at 100M rows they are GBs each.
    drop_outputs(outputs, args.keep_outputs)
    peaks = ", ".join(fmt_bytes(b) for b in t["client_peak_rss"])
    log(
        f"{line}; server peak {fmt_bytes(t['server_peak_rss'])}, "
        f"clients {peaks}, intersection {t['intersection']}"
    )


def budget_run(
    args: argparse.Namespace, env: dict[str, str], manifests: dict[int, Json], run_dir: Path,
    stamp: str, configs: list[Json],
) -> Json:  # fmt: skip
    """The largest 2-party job again with a small server --memory-budget: it must spill."""
    rows = max(args.size_list)
    fmt = args.formats[0]
    budget = parse_size(args.budget)
    note = ""
    if rows < 10_000_000:
        # Quick run: scale the budget down so that the job still spills.
        budget = max(8 * MIB, budget * rows // 10_000_000)
        note = " [quick run: budget scaled to the size; acceptance is at 10M/256MiB]"
    budget_text = f"{budget / MIB:g}MiB"
    files = [Path(f) for f in manifests[rows]["files"][fmt]][:2]
    spill_root = OUT / f"spill-{stamp}"
    spill_root.mkdir(parents=True, exist_ok=True)
    label = f"2x{fmt_rows(rows)} {fmt} --memory-budget {budget_text}"
    setup = BenchJobSetup(
        label,
        rows,
        2,
        files,
        fmt,
        run_dir / f"budget-{rows}",
        120 + 80 * rows / 1_000_000,
        args.quiet_wait,
        ["--memory-budget", str(budget), "--spill-dir", str(spill_root)],
        SpillScan(spill_root, sample_keys(files, 1000)) if fmt != "parquet" else None,
        args.server_env_map,
    )
    default = next(
        (c for c in configs if (c["rows"], c["parties"], c["format"]) == (rows, 2, fmt)), None
    )
    if default is None:
        raise BenchError(f"{label}: no default run of 2x{fmt_rows(rows)} {fmt} to compare with")
    t = run_teepsi(setup, env)
    drop_outputs([Path(p) for p in t["outputs"]], args.keep_outputs)
    log(
        f"{label}: {t['wall_s']:.2f} s, server peak {fmt_bytes(t['server_peak_rss'])}, "
        f"spilled={t['spilled']}"
    )
    if not any(spill_root.iterdir()):
        spill_root.rmdir()
    return {
        "label": label,
        "rows": rows,
        "budget_bytes": budget,
        "budget_text": budget_text,
        "server_rss_limit": 600 * MIB,
        "note": note,
        "teepsi": t,
        "default_output_digests": default["teepsi"][0]["output_digests"],
    }


def openmined(args: argparse.Namespace) -> Json:
    """openmined-psi on a sample of the 1M-row CSV keys; an error is recorded, not raised."""
    try:
        source = 1_000_000
        generate(source, args.seed, ["csv"], timeout=1800)
        log(
            f"openmined-psi: {args.openmined_sample:,}x{args.openmined_sample:,} keys "
            "(this takes a while: ECDH costs ~0.4 ms per item)"
        )
        om = run_openmined(
            source,
            args.openmined_sample,
            args.seed,
            args.openmined_structure,
            timeout=3600,
            quiet_wait=args.quiet_wait,
        )
        log(
            f"openmined-psi: {om['seconds']:.1f} s at {args.openmined_sample:,}, "
            f"scaled to 1M: {om['scaled_seconds']:.0f} s "
            f"(other load {om['other_load_cores']:.2f} cores)"
        )
        return om
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        log(f"openmined-psi not measured: {exc}")
        return {"error": str(exc)}
