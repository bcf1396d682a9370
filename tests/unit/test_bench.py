"""The benchmark's own parts, at tiny sizes (a few seconds; no teepsi processes).

The data generator's formats and overlaps, the references' outputs (polars and, when
installed, DuckDB: identical to each other), the acceptance checks (the ratio against the
fastest reference, per-process memory, make bench-huge's limits) and docs/benchmarks.md's
100M section surviving a regular run. The full harness runs with ``make bench-quick``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_checks  # noqa: E402
import bench_report  # noqa: E402
import datagen  # noqa: E402
from bench_common import GIB, MIB, BenchError  # noqa: E402

ROWS = 1000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("data")
    return datagen.generate(root, ROWS, 7, list(datagen.FORMATS))


def _keys(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    if path.suffix == ".csv":
        return [line.split(",")[0] for line in lines[1:]]
    return lines


def test_datagen_writes_every_format_with_the_documented_overlap(dataset: dict[str, Any]) -> None:
    files = {fmt: [Path(f) for f in paths] for fmt, paths in dataset["files"].items()}
    assert set(files) == {"txt", "csv", "parquet"}
    header = files["csv"][0].read_text().splitlines()[0]
    assert header == "email,amount,name,date,country"  # five columns, the key first
    keys = [_keys(p) for p in files["txt"]]
    assert [_keys(p) for p in files["csv"]] == keys  # the same keys in the same order
    assert all(len(k) == len(set(k)) == ROWS for k in keys)
    assert keys[0] != sorted(keys[0])  # shuffled
    p1, p2, p3 = (set(k) for k in keys)
    assert len(p1 & p2) == dataset["intersection"]["2"] == ROWS // 2
    assert len(p1 & p2 & p3) == dataset["intersection"]["3"] == ROWS // 4


def test_datagen_is_chunked_and_only_writes_the_parties_asked_for(tmp_path: Path) -> None:
    old = datagen.CHUNK_ROWS
    datagen.CHUNK_ROWS = 300  # several chunks: header once, every row once
    try:
        manifest = datagen.generate(tmp_path, ROWS, 7, ["csv", "parquet"], parties=2)
    finally:
        datagen.CHUNK_ROWS = old
    assert [Path(f).name for f in manifest["files"]["csv"]] == ["party1.csv", "party2.csv"]
    lines = Path(manifest["files"]["csv"][0]).read_text().splitlines()
    assert len(lines) == ROWS + 1 and lines.count(lines[0]) == 1
    import pyarrow.parquet as pq

    assert pq.read_table(manifest["files"]["parquet"][0]).num_rows == ROWS


# -- acceptance checks on constructed results ------------------------------------------


def _teepsi(wall: float, clients: list[float], server: float = 300 * MIB) -> dict[str, Any]:
    return {
        "wall_s": wall,
        "client_peak_rss": [int(c) for c in clients],
        "server_peak_threads": 20,
        "client_peak_threads": [12 for _ in clients],
        "server_peak_rss": int(server),
        "output_digests": ["d1", "d2"],
        "intersection": 5,
        "spilled": False,
        "phases_s": {},
        "client_timings_s": [],
        "other_load_cores": 0.0,
        "cpu_s": 1.0,
        "loopback_bytes": 0,
    }


def _ref(engine: str, wall: float, digests: list[str] | None = None) -> dict[str, Any]:
    return {
        "engine": engine,
        "wall_s": wall,
        "peak_rss": GIB,
        "output_digests": digests or ["d1", "d2"],
        "other_load_cores": 0.0,
    }


def _config(fmt: str, parties: int, t: dict[str, Any], refs: dict[str, Any]) -> dict[str, Any]:
    return {
        "label": f"{parties}x10M {fmt}",
        "rows": 10_000_000,
        "parties": parties,
        "format": fmt,
        "expected_intersection": 5,
        "teepsi": [t],
        "references": {engine: [ref] for engine, ref in refs.items()},
    }


def _checks(configs: list[dict[str, Any]], huge: bool = False) -> dict[str, bool | None]:
    results = {"configs": configs, "huge": huge, "machine": {"nproc": 2}}
    return {c.name: c.passed for c in bench_checks.acceptance(results)}


def test_the_ratio_that_counts_is_against_the_fastest_reference() -> None:
    # 10 s is within 1.5x of polars (8 s) but not of DuckDB (5 s): it fails.
    checks = _checks(
        [
            _config(
                "txt",
                2,
                _teepsi(10.0, [0.5 * GIB] * 2),
                {"polars": _ref("polars", 8.0), "duckdb": _ref("duckdb", 5.0)},
            ),
            _config(
                "csv",
                2,
                _teepsi(7.0, [0.5 * GIB] * 2),
                {"polars": _ref("polars", 8.0), "duckdb": _ref("duckdb", 5.0)},
            ),
        ]
    )
    assert checks["2x10M txt wall ≤ 1.5x the fastest reference"] is False
    assert checks["2x10M csv wall ≤ 1.5x the fastest reference"] is True
    assert checks["3 parties ≤ 1.3x 2 parties at 10M txt"] is None  # not run: SKIP, said so


def test_memory_three_party_and_output_checks_fail_when_they_should() -> None:
    refs = {"polars": _ref("polars", 8.0)}
    wrong = {"polars": _ref("polars", 8.0, ["d1", "other"])}
    checks = _checks(
        [
            _config("txt", 2, _teepsi(8.0, [0.9 * GIB, 0.9 * GIB], server=1.1 * GIB), refs),
            _config("txt", 3, _teepsi(11.0, [0.9 * GIB, 1.2 * GIB, 0.9 * GIB]), wrong),
        ]
    )
    assert checks["data provider peak RSS at 10M txt ≤ 1 GiB"] is False  # one party of three
    assert checks["server peak RSS at 2x10M ≤ 1 GiB (default budget)"] is False
    assert checks["3 parties ≤ 1.3x 2 parties at 10M txt"] is False  # 1.375x
    assert checks["2x10M txt outputs identical to polars's, byte for byte"] is True
    assert checks["3x10M txt outputs identical to polars's, byte for byte"] is False
    assert checks["2x10M csv wall ≤ 1.5x the fastest reference"] is None  # not run: said so


def test_bench_huge_checks_every_data_provider_and_the_server_budget() -> None:
    refs = {"polars": _ref("polars", 80.0)}
    config = _config("txt", 2, _teepsi(300.0, [1.5 * GIB, 2.1 * GIB], server=0.9 * GIB), refs)
    config["label"] = "2x100M txt"
    checks = _checks([config], huge=True)
    assert checks["2x100M txt: every data provider under 2 GiB"] is False
    assert checks["2x100M txt: server peak RSS within its 1 GiB budget"] is True
    assert not any("10M" in name and "100M" not in name for name in checks)


def test_the_100m_section_survives_a_regular_docs_run(tmp_path: Path) -> None:
    config = _config("txt", 2, _teepsi(8.0, [0.5 * GIB] * 2), {"polars": _ref("polars", 8.0)})
    results = {
        "command": "python bench/run.py",
        "date": "today",
        "json": str(tmp_path / "r.json"),
        "huge": False,
        "configs": [config],
        "machine": {
            "nproc": 2, "cpu": "cpu", "memory_gib": 1, "kernel": "k", "python": "3.11",
            "versions": {},
        },
    }  # fmt: skip
    bench_report.write_docs(results, "REGULAR-1", None, docs=tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "REGULAR-1" in text and bench_report.HUGE_PLACEHOLDER in text
    bench_report.write_huge_docs({**results, "huge": True}, "HUGE-FIGURES", docs=tmp_path)
    bench_report.write_docs(results, "REGULAR-2", None, docs=tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "REGULAR-2" in text and "REGULAR-1" not in text
    assert "HUGE-FIGURES" in text and bench_report.HUGE_PLACEHOLDER not in text
    assert text.count(bench_report.HUGE_BEGIN) == 1


def test_disk_check_refuses_a_size_that_does_not_fit() -> None:
    import bench_runs

    with pytest.raises(BenchError, match="free space or use ROWS"):
        bench_runs.check_disk(10**15, ["txt", "csv"], 2)
    bench_runs.check_disk(1000, ["txt"], 2)  # fits: no error


def test_a_partial_run_says_what_it_lacks_and_saved_runs_merge(tmp_path: Path) -> None:
    import run

    def config(rows: int, fmt: str, parties: int) -> dict[str, Any]:
        c = _config(fmt, parties, _teepsi(1.0, [GIB / 4] * parties), {"polars": _ref("p", 1.0)})
        c.update(rows=rows, label=f"{parties}x{rows} {fmt}", teepsi=[c["teepsi"][0]] * 3)
        return c

    full = [config(r, f, p) for r in (10**6, 10**7) for f in datagen.FORMATS for p in (2, 3)]
    complete = {"configs": full, "openmined": {"scaled_seconds": 400.0}, "budget": {"x": 1}}
    assert bench_report.coverage_note(complete) == ""
    note = bench_report.coverage_note({"configs": full[:-1]})
    assert "3x10M parquet" in note and "openmined-psi" in note and "spill run" in note
    assert "2x10M parquet" not in note
    saved = []
    for index, configs in enumerate((full[:2], full[2:3])):
        path = tmp_path / f"results-{index}.json"
        path.write_text(
            json.dumps(
                {"command": f"run {index}", "date": "d", "huge": index == 0, "configs": configs,
                 "sizes": [10**6], "formats": ["txt"], "parties": [2, 3]}
            )
        )  # fmt: skip
        saved.append(path)
    merged = run.merge_results(saved)
    assert [c["label"] for c in merged["configs"]] == [c["label"] for c in full[:3]]
    assert merged["huge"] is False  # one of them was a regular run
    assert "run 0" in merged["command"] and "run 1" in merged["command"]


def test_a_failed_configuration_fails_completion_and_the_rest_is_still_judged() -> None:
    ok = _config("txt", 2, _teepsi(8.0, [0.5 * GIB] * 2), {"polars": _ref("polars", 8.0)})
    results = {
        "configs": [ok],
        "failed": [{"label": "2x10M csv", "error": "2x10M csv: client p2 exited 1: out of memory"}],
        "machine": {"nproc": 2},
    }
    checks = {c.name: c for c in bench_checks.acceptance(results)}
    assert checks["every configuration completed"].passed is False
    assert "2x10M csv: client p2 exited 1" in checks["every configuration completed"].detail
    assert checks["2x10M txt wall ≤ 1.5x the fastest reference"].passed is True
    assert bench_checks.acceptance({**results, "failed": []})[0].passed is True


def test_client_timings_and_intersection_come_from_json_log_records() -> None:
    """The figures are the client's structured fields; its message text is not parsed."""
    import logging

    from teepsi_job import client_intersection, client_timings, log_records

    from teepsi.client.progress import timed
    from teepsi.logformat import JsonFormatter

    captured: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(self.format(record))

    handler = Lines()
    handler.setFormatter(JsonFormatter("client"))
    client_log = logging.getLogger("teepsi.client")
    client_log.addHandler(handler)
    old_level = client_log.level
    client_log.setLevel(logging.DEBUG)
    try:
        with timed("reading"):
            pass
        client_log.info("summary", extra={"intersection_size": 42})
    finally:
        client_log.removeHandler(handler)
        client_log.setLevel(old_level)
    lines = [(0.0, "a warning that is not JSON"), (0.1, "[1, 2]")]
    lines += [(0.2 + i, line) for i, line in enumerate(captured)]
    records = log_records(lines)
    assert len(records) == 2  # only the JSON objects
    timings = client_timings(records)
    assert list(timings) == ["reading"] and 0 <= timings["reading"] < 5
    assert client_intersection(records) == 42
    # A withheld result (null) is no size; the phase's text in "msg" is never read.
    assert client_intersection([{"msg": "intersection 7", "intersection_size": None}]) is None
    assert client_timings([{"msg": "timing: reading 1.0 s"}]) == {}
