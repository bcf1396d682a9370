"""The benchmark's reference runners and process monitor, as separate processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit import test_bench
from tests.unit.test_bench import BENCH, ROWS, _keys

sys.path.insert(0, str(BENCH))

from bench_common import MIB, output_digests

# The unit module's data set, generated once per module here too.
dataset = test_bench.dataset

HAS_DUCKDB = importlib.util.find_spec("duckdb") is not None


def _reference(engine: str, files: list[str], out: Path) -> dict[str, Any]:
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(BENCH / "reference.py"), engine, "email", str(out), *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.parametrize("fmt", ["txt", "csv", "parquet"])
def test_references_agree_and_find_the_intersection(
    dataset: dict[str, Any], tmp_path: Path, fmt: str
) -> None:
    files = dataset["files"][fmt]
    engines = ["polars", "duckdb"] if HAS_DUCKDB else ["polars"]
    reports = {e: _reference(e, files, tmp_path / e) for e in engines}
    for report in reports.values():
        assert report["intersection"] == ROWS // 4  # three parties
    digests = {
        e: output_digests([Path(p) for p in r["outputs"]], dict(os.environ))
        for e, r in reports.items()
    }
    assert len({tuple(d) for d in digests.values()}) == 1, digests
    first = Path(reports["polars"]["outputs"][0])
    if fmt == "txt":
        lines = first.read_text().splitlines()
        assert lines == sorted(set(lines)) and len(lines) == ROWS // 4
    elif fmt == "csv":
        keys = _keys(first)
        assert keys == sorted(keys) and len(keys) == ROWS // 4


def test_parquet_outputs_compare_by_content_and_see_a_changed_row(tmp_path: Path) -> None:
    import polars as pl

    frame = pl.DataFrame({"email": ["a@x", "b@x"], "amount": ["1.5", "2"]})
    same_a, same_b, changed = (tmp_path / n for n in ("a.parquet", "b.parquet", "c.parquet"))
    frame.write_parquet(same_a, compression="zstd")
    frame.write_parquet(same_b, compression="snappy")  # other bytes, same content
    frame.with_columns(pl.lit("3").alias("amount")).write_parquet(changed)
    a, b, c = output_digests([same_a, same_b, changed], dict(os.environ))
    assert same_a.read_bytes() != same_b.read_bytes()
    assert a == b != c


def test_procmon_records_peak_threads_and_rss(tmp_path: Path) -> None:
    from procmon import Child

    script = (
        "import threading, time\n"
        "stop = threading.Event()\n"
        "threads = [threading.Thread(target=stop.wait) for _ in range(6)]\n"
        "[t.start() for t in threads]\n"
        "block = bytearray(64 * 1024 * 1024)\n"  # 64 MiB, touched
        "time.sleep(0.5)\n"
        "stop.set()\n"
    )
    child = Child(
        "t", [sys.executable, "-c", script], env=dict(os.environ), log_path=tmp_path / "l"
    )
    assert child.wait(30)
    child.finish()
    assert child.returncode == 0
    assert child.peak_threads >= 7  # the main thread and six more
    assert child.peak_rss_kib * 1024 >= 64 * MIB
