"""README.md's "Try it on your own data" runs exactly as written.

The blocks are the fenced code blocks the README marks with ``<!-- quickstart:ROLE -->``:
``measure`` (run first), ``server`` (started, runs until the end), each ``party`` (run at
once, as the three terminals would), and ``python`` (two more parties against the same
server). Only the port is replaced, by a free one, so parallel test runs do not collide;
every other character is the README's. The CSV files are made here, with the spellings a
user's tables have (case, surrounding spaces, extra columns, a row without a key).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.processes import free_loopback_port, wait_until_listening

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- quickstart:(\w[\w-]*) -->\n```(\w+)\n(.*?)\n```", re.DOTALL)
README_PORT = "127.0.0.1:50051"

pytestmark = pytest.mark.slow

ALICE = "email,name\n ann@example.org ,Ann\nbob@example.org,Bob\ncat@example.org,Cat\n,nobody\n"
BOB = "email,plan\nBOB@Example.org,gold\ncat@example.org,silver\ndan@example.org,free\n"
CAROL = "email\ncat@EXAMPLE.org\nbob@example.org\nann@example.org\n"


def quickstart_blocks() -> list[tuple[str, str, str]]:
    """(role, language, text) of every marked block, in README order."""
    return [(m[1], m[2], m[3]) for m in BLOCK.finditer(README.read_text())]


def test_readme_marks_the_quickstart_blocks() -> None:
    blocks = quickstart_blocks()
    roles = [role for role, _, _ in blocks]
    assert roles == ["measure", "server", "party", "party", "party", "python"], roles
    for role, language, text in blocks:
        assert language == ("python" if role == "python" else "sh"), role
        if role != "python":
            assert README_PORT in text or role == "measure", role
            assert "--attestation sim" in text, role
    # one job, one name per party, and --parties says how many there are
    parties = [text for role, _, text in blocks if role == "party"]
    names = {re.search(r"--name (\S+)", text)[1] for text in parties}  # type: ignore[index]
    assert len(names) == len(parties) == 3
    assert all(f"--parties {len(parties)}" in text for text in parties)


def _environment(tmp_path: Path) -> dict[str, str]:
    """What a shell with the venv activated has: teepsi and python on PATH."""
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "teepsi").is_file(), f"no teepsi command in {bin_dir}: pip install -e ."
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }


@pytest.fixture
def quickstart_server(
    tmp_path: Path,
) -> Iterator[tuple[dict[str, str], list[tuple[str, str, str]]]]:
    """The measure block run, the server block started; yields (env, blocks) with our port."""
    env = _environment(tmp_path)
    port = f"127.0.0.1:{free_loopback_port()}"
    blocks = [(r, lang, text.replace(README_PORT, port)) for r, lang, text in quickstart_blocks()]
    (tmp_path / "alice.csv").write_text(ALICE)
    (tmp_path / "bob.csv").write_text(BOB)
    (tmp_path / "carol.csv").write_text(CAROL)
    (measure,) = [text for role, _, text in blocks if role == "measure"]
    subprocess.run(["bash", "-e", "-c", measure], cwd=tmp_path, env=env, check=True, timeout=60)
    assert (tmp_path / "dynamic_config.json").is_file()
    (server_block,) = [text for role, _, text in blocks if role == "server"]
    # its own session, so the shell and the server it starts are stopped together
    server = subprocess.Popen(
        ["bash", "-e", "-c", server_block],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_until_listening(server)
        yield env, blocks
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if server.stderr is not None:
            server.stderr.close()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_quickstart_runs_as_written(
    tmp_path: Path, quickstart_server: tuple[dict[str, str], list[tuple[str, str, str]]]
) -> None:
    env, blocks = quickstart_server
    parties = [text for role, _, text in blocks if role == "party"]

    def run(block: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-e", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    with ThreadPoolExecutor(len(parties)) as pool:
        results = list(pool.map(run, parties))
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    # every party gets its own rows of the keys all three hold, all columns, 0600
    alice = _rows(tmp_path / "alice-matches.csv")
    bob = _rows(tmp_path / "bob-matches.csv")
    carol = _rows(tmp_path / "carol-matches.csv")
    assert alice == [
        {"email": "bob@example.org", "name": "Bob"},
        {"email": "cat@example.org", "name": "Cat"},
    ]
    assert bob == [
        {"email": "BOB@Example.org", "plan": "gold"},
        {"email": "cat@example.org", "plan": "silver"},
    ]
    assert sorted(row["email"] for row in carol) == ["bob@example.org", "cat@EXAMPLE.org"]
    for name in ("alice", "bob", "carol"):
        assert (tmp_path / f"{name}-matches.csv").stat().st_mode & 0o777 == 0o600

    # the Python example, as written, against the same server
    (example,) = [text for role, _, text in blocks if role == "python"]
    ran = subprocess.run(
        [sys.executable, "-c", example],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    # alice's table rows of the intersection, its size, and bob's matching items
    assert "Bob" in ran.stdout and "Cat" in ran.stdout and "Ann" not in ran.stdout
    assert "['bob@example.org', 'cat@example.org']" in ran.stdout
    assert ran.stdout.splitlines()[-2].endswith(" 2"), ran.stdout  # intersection_size
