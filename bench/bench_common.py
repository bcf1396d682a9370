"""What every part of the benchmark shares: paths, units, logging, commands, digests."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

Json = dict[str, Any]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
DATA = OUT / "data"
DOCS = ROOT / "docs"
KIB = 1024
MIB = 1024**2
GIB = 1024**3
KEY = "email"
#: Input formats by file extension: what the data generator writes and teepsi reads.
FORMATS = ("txt", "csv", "parquet")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A run failed; the message says which and where its logs are."""


def child_env(code: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if code is not None:
        # Ahead of site-packages (and of an editable install's finder): the snapshot wins.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH")) if p)
    elif importlib.util.find_spec("teepsi") is None:
        raise BenchError("teepsi is neither installed nor next to bench/ (src/teepsi)")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def teepsi(*args: str) -> list[str]:
    return [sys.executable, "-m", "teepsi", *args]


def datagen_command(rows: int, seed: int, *options: str) -> list[str]:
    """bench/datagen.py for ``rows`` per party into bench/out/data, in its own process."""
    return [
        sys.executable,
        str(BENCH / "datagen.py"),
        "--root",
        str(DATA),
        "--rows",
        str(rows),
        "--seed",
        str(seed),
        *options,
    ]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


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


#: Parquet files written by different libraries differ in bytes (metadata, encodings):
#: they are compared by content, every row and column as text, in order.
_PARQUET_DIGEST = """
import hashlib, json, sys
import polars as pl
digests = []
for path in sys.argv[1:]:
    frame = pl.read_parquet(path)
    body = frame.cast(pl.String).write_csv().encode()
    digests.append("rows:" + hashlib.sha256(body).hexdigest())
print(json.dumps(digests))
"""


def output_digests(paths: list[Path], env: dict[str, str]) -> list[str]:
    """One digest per output: its bytes' SHA-256, or for Parquet its content's.

    Parquet is decoded in a child process so that this one stays small (see procmon.py).
    """
    parquet = [p for p in paths if p.suffix == ".parquet"]
    by_content: dict[Path, str] = {}
    if parquet:
        done = subprocess.run(
            [sys.executable, "-c", _PARQUET_DIGEST, *map(str, parquet)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"cannot read Parquet output: {done.stderr.strip()[-500:]}")
        by_content = dict(zip(parquet, json.loads(done.stdout), strict=True))
    return [by_content[p] if p in by_content else sha256_file(p) for p in paths]
