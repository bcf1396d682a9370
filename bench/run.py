"""teepsi benchmark: separate server and client processes vs the references, on every format.

    python bench/run.py --quick          # 100k and 1M rows per party
    python bench/run.py                  # 1M and 10M rows per party (make bench)
    python bench/run.py --huge           # 100M x 100M, text and CSV (make bench-huge)
    python bench/run.py --write-docs     # also refresh docs/benchmarks.md and .png

Every number in one report comes from the same run on the same files: teepsi (one
``teepsi server`` and one ``teepsi client`` process per party, attested TLS on loopback,
SIMULATED attestation), the in-process references polars and DuckDB (bench/reference.py,
each its own process) and openmined-psi (ECDH) on a 100k sample, scaled linearly to 1M.
Inputs are text (one key per line), 5-column CSV and Parquet (bench/datagen.py); 2 and 3
parties. Results go to bench/out/results-<timestamp>.json and bench/out/chart-<timestamp>.png.

The parts: this file (the command line), bench_runs.py (the runs: code, data, each
timed job), teepsi_job.py (one teepsi job, timings read from the clients' JSON log
records), bench_references.py (polars, DuckDB, openmined-psi), bench_checks.py (the
acceptance checks), bench_report.py (tables, chart, docs), procmon.py (measuring a
process), bench_common.py (paths, units, digests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_checks import acceptance
from bench_common import FORMATS, OUT, BenchError, Json, log
from bench_report import chart, report_text, write_docs, write_huge_docs
from bench_runs import (
    budget_run,
    check_disk,
    generate,
    machine,
    openmined,
    prepare_code,
    run_configs,
)

#: make bench-huge: rows per party, and the formats it runs (the issue's 100M x 100M).
HUGE_ROWS = 100_000_000
HUGE_FORMATS = ["txt", "csv"]


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"{text!r}: formats are {', '.join(FORMATS)}")
    return formats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100k and 1M rows per party")
    parser.add_argument(
        "--huge",
        action="store_true",
        help=f"make bench-huge: {HUGE_ROWS:,} rows per party (or --sizes), 2 parties, "
        "text and CSV, no openmined or budget run; docs get only the 100M section",
    )
    parser.add_argument("--sizes", help="rows per party, comma-separated (overrides --quick)")
    parser.add_argument("--parties", default="2,3", help="party counts (default 2,3)")
    parser.add_argument(
        "--formats",
        type=parse_formats,
        default=list(FORMATS),
        help="input formats, comma-separated (default txt,csv,parquet)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--budget", default="256MiB", help="memory budget of the spill run")
    parser.add_argument("--no-budget-run", action="store_true")
    parser.add_argument("--no-openmined", action="store_true")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up job")
    parser.add_argument(
        "--delete-data",
        action="store_true",
        help="delete the generated input files at the end (make bench-huge: GBs each)",
    )
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
        "--report-from",
        nargs="+",
        metavar="RESULTS_JSON",
        help="no runs: report (and with --write-docs write the docs) from saved results, "
        "merged (bench/out/results-*.json)",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="write docs/benchmarks.md and docs/benchmarks.png"
    )
    args = parser.parse_args(argv)
    if args.huge:
        args.no_openmined = args.no_budget_run = True
        if args.parties == "2,3":
            args.parties = "2"
        if args.formats == list(FORMATS):
            args.formats = list(HUGE_FORMATS)
    if args.sizes:
        args.size_list = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    elif args.huge:
        args.size_list = [HUGE_ROWS]
    else:
        args.size_list = [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000]
    args.party_counts = [int(p) for p in args.parties.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_from:
        try:
            results = merge_results([Path(p) for p in args.report_from])
        except (OSError, ValueError, KeyError) as exc:
            print(f"--report-from: {exc}", file=sys.stderr)
            return 2
        return finish(args, results, dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if not sys.platform.startswith("linux"):
        print("bench/run.py measures through /proc: Linux only", file=sys.stderr)
        return 2

    # SIGTERM becomes an exception so every finally-block kills its children.
    def _on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _on_term)

    args.server_env_map = dict(item.split("=", 1) for item in args.server_env)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = OUT / "runs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    manifests: dict[int, Json] = {}
    try:
        for rows in args.size_list:
            check_disk(rows, args.formats, max(args.party_counts))
        code, code_digest, env = prepare_code(args, run_dir)
        command = "python bench/run.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        results: Json = {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command.strip(),
            "huge": args.huge,
            "machine": machine(),
            "code": {"pythonpath": str(code) if code else None, "sha256": code_digest},
            "sizes": args.size_list,
            "parties": args.party_counts,
            "formats": args.formats,
            "server_env": args.server_env_map,
            "configs": [],
            "failed": [],
        }
        log(f"machine: {results['machine']}")
        log(f"runs and logs in {run_dir}; teepsi code: {code or 'installed'} ({code_digest[:16]})")
        for rows in args.size_list:
            manifests[rows] = generate(
                rows, args.seed, args.formats, 4 * 3600, max(args.party_counts)
            )
        partial = OUT / f"results-{stamp}.partial.json"
        run_configs(args, env, manifests, run_dir, results, partial)
        if not args.no_budget_run and 2 in args.party_counts:
            try:
                results["budget"] = budget_run(
                    args, env, manifests, run_dir, stamp, results["configs"]
                )
            except BenchError as exc:
                log(f"budget run FAILED: {exc}")
                results["failed"].append({"label": "--memory-budget run", "error": str(exc)})
        if not args.no_openmined:
            results["openmined"] = openmined(args)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        if args.delete_data:
            for rows in manifests:
                directory = Path(next(iter(manifests[rows]["files"].values()))[0]).parent
                shutil.rmtree(directory, ignore_errors=True)
                log(f"deleted the input files in {directory}")

    return finish(args, results, stamp)


def merge_results(paths: list[Path]) -> Json:
    """Several runs' results JSON as one report (e.g. a 1M and a 10M run of one session)."""
    runs = [json.loads(p.read_text()) for p in paths]
    merged: Json = dict(runs[0])
    merged["configs"] = [c for r in runs for c in r["configs"]]
    merged["command"] = " and ".join(f"`{r['command']}`" for r in runs).strip("`")
    merged["date"] = runs[-1]["date"]
    merged["sources"] = [str(p) for p in paths]
    merged["huge"] = all(r.get("huge") for r in runs)
    merged["sizes"] = sorted({n for r in runs for n in r["sizes"]})
    merged["formats"] = sorted({f for r in runs for f in r["formats"]})
    merged["parties"] = sorted({n for r in runs for n in r["parties"]})
    for key in ("budget", "openmined"):
        merged[key] = next((r[key] for r in runs if r.get(key)), None)
    return merged


def finish(args: argparse.Namespace, results: Json, stamp: str) -> int:
    """Checks, results JSON, chart, printed report and (with --write-docs) the docs."""
    checks = acceptance(results)
    results["checks"] = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
    json_path = OUT / f"results-{stamp}.json"
    results["json"] = str(json_path)
    json_path.write_text(json.dumps(results, indent=2, default=str))
    (OUT / f"results-{stamp}.partial.json").unlink(missing_ok=True)  # superseded
    chart_path: Path | None = OUT / f"chart-{stamp}.png"
    assert chart_path is not None
    if args.huge or not results["configs"] or not chart(results, chart_path):
        chart_path = None
    report = report_text(results, checks)
    print(report)
    log(f"results: {json_path}" + (f", chart: {chart_path}" if chart_path else ""))
    if args.write_docs:
        if args.huge and max(args.size_list) < HUGE_ROWS:
            log(f"a trial below {HUGE_ROWS:,} rows: docs/benchmarks.md left as it is")
        elif args.huge:
            write_huge_docs(results, report)
        else:
            write_docs(results, report, chart_path)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupted:
        # The finally-blocks have already stopped every child process by now.
        log(f"interrupted ({interrupted or 'Ctrl-C'}); child processes stopped")
        sys.exit(130)
