"""Run fuzz harnesses for a while each and print a table of what happened.

    python fuzz/run.py                      # every harness, 5 minutes each
    python fuzz/run.py --time 3600 spec     # one harness, one hour
    python fuzz/run.py --strict             # stop at known issues too

Each harness runs as ``python fuzz/fuzz_<name>.py -max_total_time=T
-artifact_prefix=fuzz/crashes/<name>/ fuzz/work/<name> fuzz/corpus/<name>``: what the
fuzzer discovers goes to ``fuzz/work/<name>/`` (not committed), the committed seeds in
``fuzz/corpus/<name>/`` are only read, and crash reproducers land in
``fuzz/crashes/<name>/``. Unless ``--strict``, known issues (fuzz/_support.py) are
tolerated, so a run goes on looking for new ones; the table counts how often each was hit.
Exit status 1 if any harness crashed on something new.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
HARNESSES = ("ratls", "quote", "policy", "spec", "upload", "receipt", "audit")

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STATUS = re.compile(r"^#(\d+)\s+\S+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.MULTILINE)
_TOLERATED = re.compile(r"TOLERATED known issue (\w+) \((\d+)x\)")


def run_one(name: str, seconds: int, *, strict: bool, extra: list[str]) -> dict[str, object]:
    work = FUZZ / "work" / name
    crashes = FUZZ / "crashes" / name
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(FUZZ / f"fuzz_{name}.py"),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={crashes}/",
        *extra,
        str(work),
        str(FUZZ / "corpus" / name),
    ]
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    if not strict:
        env["TEEPSI_FUZZ_TOLERATE_KNOWN"] = "1"
    log_path = work.parent / f"{name}.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    elapsed = time.monotonic() - started
    text = log_path.read_text(errors="replace")
    done = _DONE.search(text)
    statuses = _STATUS.findall(text)
    tolerated: dict[str, int] = {}
    for key, count in _TOLERATED.findall(text):
        tolerated[key] = max(tolerated.get(key, 0), int(count))
    return {
        "name": name,
        "command": " ".join(
            [
                "python",
                f"fuzz/fuzz_{name}.py",
                f"-max_total_time={seconds}",
                f"-artifact_prefix=fuzz/crashes/{name}/",
                *extra,
                f"fuzz/work/{name}",
                f"fuzz/corpus/{name}",
            ]
        ),
        "exit": status,
        "runs": int(done.group(1)) if done else int(statuses[-1][0]) if statuses else 0,
        "seconds": round(elapsed),
        "cov": int(statuses[-1][1]) if statuses else 0,
        "ft": int(statuses[-1][2]) if statuses else 0,
        "corpus": int(statuses[-1][3]) if statuses else 0,
        "tolerated": tolerated,
        "log": str(log_path),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(HARNESSES))
    parser.add_argument("--time", type=int, default=300, help="seconds per harness (300)")
    parser.add_argument("--strict", action="store_true", help="stop at known issues too")
    parser.add_argument(
        "--libfuzzer",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra libFuzzer flag, e.g. --libfuzzer=-jobs=2 (repeatable)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(HARNESSES))
    if unknown:
        parser.error(f"unknown harness {unknown[0]!r}: choose from {', '.join(HARNESSES)}")
    print("| harness | runs | time (s) | exec/s | cov | ft | corpus | exit | known issues hit |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for name in args.names or HARNESSES:
        row = run_one(name, args.time, strict=args.strict, extra=args.libfuzzer)
        runs, seconds = int(row["runs"]), max(int(row["seconds"]), 1)  # type: ignore[call-overload]
        tolerated = row["tolerated"]
        assert isinstance(tolerated, dict)
        hits = ", ".join(f"{k} (>= {v}x)" for k, v in sorted(tolerated.items())) or "none"
        print(
            f"| {name} | {runs} | {seconds} | {runs // seconds} | {row['cov']} | {row['ft']} "
            f"| {row['corpus']} | {row['exit']} | {hits} |",
            flush=True,
        )
        print(f"<!-- {row['command']} ; log {row['log']} -->", flush=True)
        failed = failed or row["exit"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
