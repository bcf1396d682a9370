"""Faults through separate processes on loopback: killed parties and servers, slow and
missing parties, cut connections. Every wait is bounded; waiting costs no CPU.

A small proxy of our own (tests/support/tcp_proxy.py) sits between a client and the server where
a test needs latency, a throttled link or a cut. The policy pins MRSIGNER, ISV_PROD_ID and
ISV_SVN but not MRENCLAVE (a digest of the installed files in sim mode), so these tests
keep passing while src/ is edited under them; tests/integration/test_end_to_end.py pins MRENCLAVE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from teepsi.attestation.policy import Policy
from teepsi.client.party import PartyConfig, PsiClient, PsiClientError
from teepsi.engine.intersect import intersect_records
from teepsi.engine.records import hash_keys
from teepsi.engine.tables import TableSpec
from tests.support.processes import client_args, start_client
from tests.support.tcp_proxy import TcpProxy

KEY_SCHEME = TableSpec(path=Path("x")).key_scheme


@pytest.fixture
def serve(start_server, policy_file):
    """conftest's server processes, with this module's policy for the data providers."""

    def start(*extra: str):
        return start_server(*extra, policy=policy_file)

    return start


@pytest.fixture
def procs():
    """Client processes a test starts; any still running at teardown are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=20)


def _errors(stderr: bytes) -> list[str]:
    return [ln for ln in stderr.decode().splitlines() if " ERROR " in ln or "error:" in ln]


def _write(path: Path, items: list[str]) -> Path:
    path.write_text("".join(f"{item}\n" for item in items))
    return path


def _wait_for_log(server, needle: str, timeout: float = 60.0, count: int = 1) -> None:
    """Bounded wait for a server log line (the test polls a file, the server does not)."""
    give_up = time.monotonic() + timeout
    while server.log().count(needle) < count:
        if time.monotonic() > give_up:
            raise AssertionError(f"no {needle!r} in the server log after {timeout} s")
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited ({server.proc.returncode}) before {needle!r}")
        time.sleep(0.05)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, bytes, bytes]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def _client(server, data: Path, name: str, policy: Path, **kw) -> list[str]:
    """`teepsi client` args; ``server`` may be a proxy (anything with ``.host``)."""
    kw.setdefault("parties", 2)
    return client_args(server, data, name=name, policy=policy, **kw)


def _via(proxy: TcpProxy) -> SimpleNamespace:
    return SimpleNamespace(host=proxy.host)


def test_provider_killed_mid_upload_frees_its_slot_and_a_rerun_completes(
    serve, policy_file, tmp_path, procs
):
    """A broken upload frees the party's slot (docs/protocol.md); the rerun's set counts."""
    server = serve("--job-timeout", "90")
    common = [f"common-{i}" for i in range(50)]
    b = start_client(_client(server, _write(tmp_path / "b.txt", common), "b", policy_file))
    procs.append(b)
    _wait_for_log(server, "party b uploaded")
    # Party a's first attempt: 400k items (6.4 MB of records) through a 2 MB/s link.
    first = _write(tmp_path / "a1.txt", [*common, *(f"first-{i}" for i in range(400_000))])
    with TcpProxy(server.port, bytes_per_second=2_000_000, lifetime=120) as proxy:
        a = start_client(_client(_via(proxy), first, "a", policy_file))
        procs.append(a)
        assert proxy.wait_for_bytes(up=2_000_000, timeout=60), "upload never started"
        assert "party a uploaded" not in server.log()
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        _wait_for_log(server, "upload of party a broke off; its slot is free again", 30)
    assert b.poll() is None  # still waiting, not failed
    # The rerun (other data: the broken attempt's records must not count).
    second = _write(tmp_path / "a2.txt", [*common[:20], "only-in-second"])
    rerun = subprocess.run(
        _client(server, second, "a", policy_file), capture_output=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr.decode()
    expected = "".join(f"{item}\n" for item in sorted(common[:20])).encode()
    assert rerun.stdout == expected
    code, stdout, stderr = _finish(b)
    assert code == 0, stderr.decode()
    assert stdout == expected
    _wait_for_log(server, "job state wiped")


def test_server_killed_mid_job_clients_get_one_line_and_rerun_after_restart_succeeds(
    serve, policy_file, tmp_path, procs
):
    server = serve("--job-timeout", "90")
    port = server.port
    data_a = _write(tmp_path / "a.txt", ["car", "cat", "dog"])
    data_b = _write(tmp_path / "b.txt", ["cat", "car", "emu"])
    # a uploads and waits for b; c (another job) is still uploading through a slow link.
    waiting = start_client(_client(server, data_a, "a", policy_file))
    procs.append(waiting)
    _wait_for_log(server, "party a uploaded")
    big = _write(tmp_path / "c.txt", [f"c-{i}" for i in range(400_000)])
    with TcpProxy(port, bytes_per_second=2_000_000, lifetime=120) as proxy:
        uploading = start_client(_client(_via(proxy), big, "c", policy_file, job="other"))
        procs.append(uploading)
        assert proxy.wait_for_bytes(up=2_000_000, timeout=60)
        killed_at = time.monotonic()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
        outcomes = {"waiting": _finish(waiting, 30), "uploading": _finish(uploading, 30)}
    assert time.monotonic() - killed_at < 15  # both noticed promptly, no hang
    for what, (code, stdout, stderr) in outcomes.items():
        errors = _errors(stderr)
        assert code == 1 and stdout == b"", (what, stderr.decode())
        assert len(errors) == 1, (what, errors)
        phase = "waiting for the result" if what == "waiting" else "uploading the set"
        assert f"ERROR {phase} failed: UNAVAILABLE: " in errors[0], errors[0]
    # Jobs live in the server's memory only: after a restart on the same address both
    # parties run again, and the job completes.
    restarted = serve("--host", f"127.0.0.1:{port}", "--job-timeout", "90")
    assert restarted.port == port
    runs = [
        start_client(_client(restarted, d, n, policy_file))
        for d, n in ((data_a, "a"), (data_b, "b"))
    ]
    procs.extend(runs)
    for proc in runs:
        code, stdout, stderr = _finish(proc)
        assert code == 0, stderr.decode()
        assert stdout == b"car\ncat\n"


def test_party_that_never_arrives_others_get_deadline_exceeded_without_spinning(
    serve, policy_file, tmp_path, procs
):
    timeout = 6.0
    server = serve("--job-timeout", str(timeout))
    started = time.monotonic()
    waiting = []
    for name in ("a", "b"):
        data = _write(tmp_path / f"{name}.txt", ["x", name])
        proc = start_client(_client(server, data, name, policy_file, parties=3, job="late"))
        procs.append(proc)
        waiting.append(proc)
    _wait_for_log(server, " uploaded ", count=2)
    time.sleep(0.3)
    pids = [server.proc.pid, *(p.pid for p in waiting)]
    before = [_cpu_seconds(pid) for pid in pids]
    time.sleep(1.5)
    used = [_cpu_seconds(pid) - cpu for pid, cpu in zip(pids, before)]
    # Server and both clients block in condition waits: (nearly) no CPU over 1.5 s.
    assert all(u < 0.15 for u in used), used
    for proc in waiting:
        code, _, stderr = _finish(proc, 60)
        errors = _errors(stderr)
        assert code == 1 and len(errors) == 1, stderr.decode()
        assert errors[0].endswith(
            "ERROR waiting for the result failed: DEADLINE_EXCEEDED: job late expired: "
            "2 of 3 parties uploaded before its deadline; 1 party has not joined"
        ), errors[0]
    # Within the deadline plus process start-up and reaping slack, not a client timeout.
    assert time.monotonic() - started < timeout + 8
    assert "job late expired (deadline passed): 2 of 3 parties had uploaded" in server.log()


def test_server_stopped_cleanly_tells_waiting_clients_why(serve, policy_file, tmp_path, procs):
    server = serve("--job-timeout", "90")
    data = _write(tmp_path / "a.txt", ["x"])
    waiting = start_client(_client(server, data, "a", policy_file))
    procs.append(waiting)
    _wait_for_log(server, "party a uploaded")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0
    code, _, stderr = _finish(waiting, 30)
    errors = _errors(stderr)
    assert code == 1 and len(errors) == 1, stderr.decode()
    assert "shutting down" in errors[0], errors[0]


def test_client_timeout_bounds_its_wait(serve, policy_file, tmp_path, procs):
    """The client's own --timeout ends its wait even when the job would wait longer."""
    server = serve("--job-timeout", "120")
    data = _write(tmp_path / "a.txt", ["x"])
    started = time.monotonic()
    run = subprocess.run(
        _client(server, data, "a", policy_file, timeout=5), capture_output=True, timeout=60
    )
    elapsed = time.monotonic() - started
    errors = _errors(run.stderr)
    assert run.returncode == 1 and len(errors) == 1, run.stderr.decode()
    assert "waiting for the result failed: DEADLINE_EXCEEDED" in errors[0]
    assert elapsed < 5 + 6  # its timeout plus start-up, never the job's 120 s


def test_slow_party_through_a_high_latency_link_completes(serve, policy_file, tmp_path, procs):
    server = serve()
    a_items = [f"user{i:06d}@example.org" for i in range(100_000)]
    b_items = a_items[::2] + [f"other{i}" for i in range(1000)]
    fast = start_client(_client(server, _write(tmp_path / "a.txt", a_items), "a", policy_file))
    procs.append(fast)
    # 150 ms each way and 1.5 MB/s: every round trip costs 300 ms, the upload ~1.1 s.
    with TcpProxy(server.port, latency=0.15, bytes_per_second=1_500_000, lifetime=120) as proxy:
        started = time.monotonic()
        run = subprocess.run(
            _client(_via(proxy), _write(tmp_path / "b.txt", b_items), "b", policy_file),
            capture_output=True,
            timeout=120,
        )
        elapsed = time.monotonic() - started
        up, down = proxy.bytes_up, proxy.bytes_down
    assert run.returncode == 0, run.stderr.decode()
    expected = "".join(f"{item}\n" for item in sorted(a_items[::2])).encode()
    assert run.stdout == expected
    code, stdout, stderr = _finish(fast)
    assert code == 0 and stdout == expected, stderr.decode()
    assert up > 16 * len(b_items) and down > 16 * len(a_items[::2])  # it all went through
    assert elapsed > 2.0  # the link really was slow


def _party(host: str, name: str, policy: Policy) -> PsiClient:
    return PsiClient(
        PartyConfig(
            host=host,
            policy=policy,
            name=name,
            party_count=2,
            job_id="cut",
            attestation="sim",
            allow_simulated=True,
            timeout=60,
        )
    )


class _NoBar:
    def advance(self, amount: int) -> None:
        pass


def test_cut_result_stream_can_be_fetched_again_while_the_job_lives(serve, policy_file, tmp_path):
    """Python API: a party whose result stream is cut calls GetResult again (same session)."""
    server = serve()
    policy = Policy.load(policy_file)
    items = pl.Series([f"item-{i:07d}" for i in range(300_000)])
    with TcpProxy(server.port, lifetime=120) as proxy:
        a = _party(proxy.host, "a", policy)
        b = _party(server.host, "b", policy)
        try:
            a.connect()
            b.connect()
            token_a, seeds = a.join(KEY_SCHEME)
            token_b, _ = b.join(KEY_SCHEME)
            records = hash_keys(items, seeds)
            a.upload(token_a, *records, _NoBar())
            b.upload(token_b, *records, _NoBar())
            # The result is 300k records (4.8 MB): cut the link 1 MB into it.
            proxy.arm(1_000_000, "down")
            # The client notices the cut and fetches the stream again by itself.
            again = a.result(token_a)
            assert proxy.cut_event.is_set()
            expected_hi, expected_lo = intersect_records([records])[:2]
            assert again.status == "RELEASED" and again.total == 300_000
            assert np.array_equal(again.hi, expected_hi) and np.array_equal(again.lo, expected_lo)
            assert b.result(token_b).sha256 == again.sha256
            _wait_for_log(server, "job cut: every party has its result; job state wiped")
            with pytest.raises(PsiClientError, match="UNAUTHENTICATED"):
                a.result(token_a)
        finally:
            a.close()
            b.close()


def test_cli_client_survives_a_cut_result_stream(serve, policy_file, tmp_path, procs):
    server = serve()
    items = [f"item-{i:07d}" for i in range(300_000)]
    data = _write(tmp_path / "items.txt", items)
    other = start_client(_client(server, data, "b", policy_file))
    procs.append(other)
    # Only the result stream is this large downstream: cut it once, 1 MB in.
    with TcpProxy(server.port, cut_after=1_000_000, direction="down", lifetime=120) as proxy:
        run = subprocess.run(
            _client(_via(proxy), data, "a", policy_file), capture_output=True, timeout=120
        )
        assert proxy.cuts == 1
    assert _finish(other)[0] == 0
    assert run.returncode == 0, _errors(run.stderr)
    assert run.stdout.count(b"\n") == len(items)
