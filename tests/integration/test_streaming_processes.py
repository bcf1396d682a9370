"""The streaming data provider as separate processes: memory follows --memory-budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_streaming import (
    _frames,
    _reference,
    _write,
)

_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from teepsi.engine.matching import matching_rows
from teepsi.engine.tables import TableSpec, read_table
table = read_table(TableSpec(path=Path(sys.argv[1])), memory_budget=int(sys.argv[2]))
table.hash((1, 2))
parts = list(table.distinct_records())
hi, lo = parts[0][0][:10], parts[0][1][:10]
del parts
rows = matching_rows(table, (1, 2), hi, lo)
# VmHWM, not ru_maxrss: the latter starts from the (large) parent's when spawned by vfork.
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"rss_kib": int(hwm.split()[1]),
                  "rows": len(rows), "spilled": table.spilled}))
"""


def _peak(path: Path, budget: int) -> dict[str, int]:
    env = {**os.environ, "POLARS_MAX_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path), str(budget)],
        capture_output=True,
        timeout=300,
        check=True,
        env=env,
    )
    return dict(json.loads(run.stdout))


def test_peak_memory_follows_the_budget_not_the_row_count(tmp_path):
    """A subprocess's peak RSS: within a small budget it stays near the baseline,
    where the unbounded run holds every key and record (about 100 MB more)."""
    path = tmp_path / "big.txt"
    rows = 1_500_000
    path.write_bytes(b"".join(b"someone%09d@example-domain.org\n" % i for i in range(rows)))
    small = _peak(path, 8 << 20)
    large = _peak(path, 1 << 30)
    assert small["rows"] == large["rows"] == 10
    assert small["spilled"] and not large["spilled"]
    assert small["rss_kib"] < large["rss_kib"] - 60_000, (small, large)


def _client_job(server, policy, paths, job, extra):
    from tests.support.processes import client_args

    procs = []
    for index, path in enumerate(paths):
        out = path.with_name(f"{job}-out{index}{path.suffix}")
        key = [] if path.suffix == ".txt" else ["--key", "email"]
        args = client_args(
            server,
            path,
            parties=len(paths),
            name=f"p{index}",
            policy=policy,
            job=job,
            extra=[*key, "--normalize", "trim,casefold", "--output", str(out), *extra],
        )
        env = {**os.environ, "TMPDIR": str(path.parent)}  # where a client's spill goes
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        procs.append((proc, out))
    outs = []
    for proc, out in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()
        outs.append((out.read_bytes(), stderr.decode()))
    return outs


@pytest.mark.parametrize("ext", ["txt", "csv", "parquet"])
def test_client_memory_budget_flag_streams_through_processes(
    start_server, sim_policy_file, tmp_path, ext
):
    """`teepsi client --memory-budget 64KiB`: the same bytes as the default (CSV written
    in pieces of a few rows each), nothing left in the temporary directory the spill
    went to."""
    ours, theirs = _frames()
    paths = [_write(ours, tmp_path / f"a.{ext}"), _write(theirs, tmp_path / f"b.{ext}")]
    server = start_server()
    default = _client_job(server, sim_policy_file, paths, "default", ["-v"])
    small = _client_job(server, sim_policy_file, paths, "small", ["--memory-budget", "64KiB", "-v"])
    assert [out for out, _ in small] == [out for out, _ in default]
    assert default[0][0] == _reference(tmp_path, ext)
    spilled = "over --memory-budget: keys and records spilled to disk, encrypted"
    assert spilled in small[0][1] and spilled not in default[0][1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("teepsi-spill-")]
