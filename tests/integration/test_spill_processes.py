"""Spill areas left by killed processes are removed, live ones kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from teepsi.engine.spill import SpillArea, remove_stale_areas

# A "server" that spills one segment, says where, and waits to be killed.
_SPILLER = """
import sys, time
from teepsi.engine.spill import SpillArea
area = SpillArea(sys.argv[1])
area.write(b"secret" * 1000, b"label")
print(area.path, flush=True)
time.sleep(120)
"""


def _spiller(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SPILLER, str(parent)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the spiller did not start"
    return proc, Path(line)


@pytest.fixture
def spillers():
    started: list[subprocess.Popen[str]] = []

    def start(parent: Path) -> tuple[subprocess.Popen[str], Path]:
        proc, path = _spiller(parent)
        started.append(proc)
        return proc, path

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=20)


def test_stale_areas_of_killed_processes_are_removed_live_ones_kept(tmp_path, spillers):
    killed, killed_area = spillers(tmp_path)
    alive, alive_area = spillers(tmp_path)
    assert alive.poll() is None
    mine = SpillArea(tmp_path)
    mine.write(b"x" * 100, b"l")
    # Not ours: other names, an old release's 8-character area, a symlink to an area.
    foreign = [tmp_path / "keep-me", tmp_path / "teepsi-spill-abcd1234"]
    for path in foreign:
        path.mkdir()
        (path / "seg-00000001").write_bytes(b"x")
    (tmp_path / "teepsi-spill-notes.txt").write_text("x")
    link_target = tmp_path / "elsewhere"
    link_target.mkdir()
    (link_target / "f").write_text("x")
    (tmp_path / "teepsi-spill-00000000000000ff").symlink_to(link_target)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=10)
    assert killed_area.is_dir()  # SIGKILL: nobody removed it

    swept = remove_stale_areas(tmp_path)

    assert (swept.areas, swept.files) == (1, 1)
    assert swept.bytes > 6000
    assert not killed_area.exists()
    assert alive_area.is_dir() and any(alive_area.iterdir())  # another live process's
    assert mine.path.is_dir() and any(mine.path.iterdir())  # this process's own
    for path in foreign:
        assert (path / "seg-00000001").exists()
    assert (tmp_path / "teepsi-spill-notes.txt").exists()
    assert (link_target / "f").exists()
    assert remove_stale_areas(tmp_path).areas == 0
    mine.close()
    assert not mine.path.exists()
