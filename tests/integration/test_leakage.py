"""Leakage: logs at every level hold no item or key, spill files hold no plaintext, results
reach only recipients, and a job's state is wiped once released or expired.

Items are random and distinctive, so finding one anywhere is a leak, not a coincidence.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from teepsi.attestation.policy import Policy
from teepsi.client.party import PartyConfig, PsiClient, PsiClientError
from teepsi.contract.party_keys import (
    generate_private_key,
    private_key_pem,
    public_key_der,
    public_key_text,
)
from teepsi.contract.receipt import SignedReceipt
from teepsi.contract.spec import JobSpec, OutputKind, PartySpec
from teepsi.engine.intersect import intersect_records
from teepsi.engine.records import hash_keys, records_to_bytes
from teepsi.engine.tables import TableSpec
from teepsi.protocol import SESSION_METADATA
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.server import ServerConfig, start_server
from teepsi.server.limits import Limits
from tests.support.processes import client_args, start_client
from tests.support.registry import live_jobs

KEY_SCHEME = TableSpec(path=Path("x")).key_scheme


def _secret_items(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{secrets.token_hex(8)}-{i}" for i in range(n)]


def _needles(items: list[str]) -> list[bytes]:
    """An item as it could show up: as written, case-folded, upper-case, hex."""
    found: list[bytes] = []
    for item in items:
        raw = item.encode()
        found += [raw, item.casefold().encode(), item.upper().encode(), raw.hex().encode()]
    return found


def _leaks(haystack: bytes, needles: list[bytes]) -> list[bytes]:
    return [n for n in needles if n in haystack]


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- logs ------------------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_at_every_level_never_contain_items_or_keys(
    start_server, policy_file, tmp_path, log_format
):
    """Server and clients at every level in either log format, and the server's metrics:
    no item, no key, no job id or party name in the metrics."""
    audit = tmp_path / "audit.jsonl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    server = start_server(
        "-v",
        "--audit-log",
        str(audit),
        "--log-format",
        log_format,
        "--metrics-host",
        f"127.0.0.1:{metrics_port}",
        policy=policy_file,
    )
    fmt = ["--log-format", log_format]
    common = _secret_items("Common", 20)
    texts = {f"p{n}": common + _secret_items(f"Own{n}", 30) for n in range(3)}
    levels = {"p0": ["-v"], "p1": [], "p2": ["--quiet"]}
    procs = {}
    for name, items in texts.items():
        data = tmp_path / f"{name}.txt"
        data.write_text("\n".join(f"  {it} " for it in items) + "\n")
        args = client_args(server, data, parties=3, name=name, policy=policy_file, job="logs")
        if "--quiet" not in levels[name]:
            args.remove("--quiet")
        procs[name] = start_client([*args, *levels[name], *fmt])
    # A CSV job under a spec: key columns, a secret non-key column, private key files.
    keys = {name: generate_private_key() for name in ("h", "i")}
    spec = tmp_path / "job.toml"
    spec.write_text(
        'job_id = "csv-logs"\nnormalize = "trim,casefold"\n'
        + "".join(
            f'[[parties]]\nname = "{n}"\npublic_key = "{public_key_text(public_key_der(k))}"\n'
            for n, k in keys.items()
        )
    )
    emails = _secret_items("Mail", 20)
    ssns = _secret_items("ssn", 40)
    rows = {"h": emails + _secret_items("MailH", 20), "i": emails + _secret_items("MailI", 20)}
    for (name, mails), ssn_part in zip(rows.items(), (ssns[:20], ssns[20:])):
        csv = tmp_path / f"{name}.csv"
        csv.write_text(
            "email,ssn\n"
            + "".join(f"{m.upper()},{s}\n" for m, s in zip(mails, ssn_part + ssn_part))
        )
        key_file = tmp_path / f"{name}.key"
        key_file.write_bytes(private_key_pem(keys[name]))
        args = client_args(server, csv, parties=2, name=name, policy=policy_file, job="csv-logs")
        args.remove("--quiet")
        procs[name] = start_client(
            [
                *(*args, "-v", "--key", "email", "--spec", str(spec)),
                *("--key-file", str(key_file), "--output", str(tmp_path / f"{name}-out.csv")),
                *fmt,
            ]
        )
    stderr_of = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr.decode()
        stderr_of[name] = stderr
        if name.startswith("p"):
            assert stdout == "".join(f"{c}\n" for c in sorted(common)).encode()
    info = b" INFO " if log_format == "text" else b'"level": "INFO"'
    # -v turns on DEBUG (teepsi itself logs nothing more there today), default is INFO.
    assert info in stderr_of["p0"] and info in stderr_of["p1"]
    assert info not in stderr_of["p2"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
    assert b"teepsi_uploads_completed_total 5.0" in metrics  # the scrape saw the jobs
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=20)
    server_log = (server.workdir / "server.log").read_bytes()
    assert info in server_log
    if log_format == "json":
        for text in (server_log, *stderr_of.values()):
            for line in text.decode().splitlines():
                # Progress bars are off (not a terminal): every line is one JSON object.
                assert {"ts", "level", "logger", "msg"} <= json.loads(line).keys(), line
    # Metrics name no job and no party (a series per job would be a log by other means).
    for name in (*texts, *keys, "logs", "csv-logs"):
        assert f'"{name}"'.encode() not in metrics and f"{name}-".encode() not in metrics
    all_items = [it for items in texts.values() for it in items]
    all_items += [m for mails in rows.values() for m in mails] + ssns
    needles = _needles(all_items)
    for name in keys:
        # The private key, as its PEM body and as raw base64 of its DER.
        pem = (tmp_path / f"{name}.key").read_bytes()
        body = b"".join(pem.strip().splitlines()[1:-1])
        needles += [body, body[:32]]
    for where, text in {
        "server.log": server_log,
        "audit log": audit.read_bytes(),
        "metrics": metrics,
        **{f"client {n} stderr": e for n, e in stderr_of.items()},
    }.items():
        assert not _leaks(text, needles), (where, _leaks(text, needles)[:3])


def test_in_process_debug_logs_hold_no_session_token_or_key_seeds(policy, caplog):
    """Secrets that never reach a file: session tokens and the job's key seeds."""
    caplog.set_level(logging.DEBUG)
    running = start_server(
        ServerConfig(
            host="127.0.0.1:0", attestation="sim", client_policy=policy, allow_simulated=True
        )
    )
    clients = []
    try:
        tokens, seeds = [], None
        for name in ("a", "b"):
            client = _client(running.port, policy, name, job="tokens")
            clients.append(client)
            client.connect()
            token, seeds = client.join(KEY_SCHEME)
            tokens.append(token)
        items = pl.Series(_secret_items("tok", 50))
        records = hash_keys(items, seeds)
        for client, token in zip(clients, tokens):
            client.upload(token, *records, _NoBar())
        for client, token in zip(clients, tokens):
            assert client.result(token).total == 50
    finally:
        for client in clients:
            client.close()
        running.stop(grace=0)
    text = caplog.text
    assert "job tokens: every party has its result; job state wiped" in text
    for token in tokens:
        assert token.hex() not in text and token.hex().upper() not in text
    for seed in seeds:
        assert str(seed) not in text and f"{seed:x}" not in text
    for item in items.to_list():
        assert item not in text


# -- spill -------------------------------------------------------------------------------


class _NoBar:
    def advance(self, amount: int) -> None:
        pass


def _client(port: int, policy: Policy, name: str, *, job: str, parties: int = 2, **kw):
    return PsiClient(
        PartyConfig(
            host=f"127.0.0.1:{port}",
            policy=policy,
            name=name,
            party_count=parties,
            job_id=job,
            attestation="sim",
            allow_simulated=True,
            timeout=60,
            **kw,
        )
    )


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _scan(files: list[Path], needles: list[bytes], *, limit: int = 64 * 1024 * 1024) -> list[str]:
    """Files (up to ``limit`` bytes each) in which any needle occurs."""
    hits = []
    for path in files:
        try:
            if path.stat().st_size > limit:
                continue
            data = path.read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if any(n in data for n in needles):
            hits.append(str(path))
    return hits


def _plaintext_needles(items: list[str], hi: np.ndarray, lo: np.ndarray) -> list[bytes]:
    """Sampled items and their key records (16 bytes, and the 8-byte halves)."""
    rng = np.random.default_rng(7)
    picks = rng.choice(len(items), size=200, replace=False)
    needles = [items[i].encode() for i in picks]
    for i in picks[:100]:
        record = records_to_bytes(hi[i : i + 1], lo[i : i + 1])
        needles += [record, record[:8], record[8:]]
    return needles


def _recent_tmp_files(since: float) -> list[Path]:
    found = []
    for root, _dirs, names in os.walk("/tmp"):
        for name in names:
            path = Path(root) / name
            try:
                if path.is_file() and path.stat().st_mtime >= since:
                    found.append(path)
            except OSError:
                continue
    return found


def test_spill_files_hold_no_plaintext_during_and_after_a_run(
    start_server, policy_file, policy, tmp_path
):
    started = time.time() - 1
    spill = tmp_path / "spill"
    spill.mkdir()
    server = start_server(
        "--memory-budget", "1MiB", "--spill-dir", str(spill), "-v", policy=policy_file
    )
    items_a = _secret_items("spillA", 200_000)
    items_b = items_a[::2] + _secret_items("spillB", 1000)
    a = _client(server.port, policy, "a", job="spill")
    b = _client(server.port, policy, "b", job="spill")
    try:
        a.connect()
        b.connect()
        token_a, seeds = a.join(KEY_SCHEME)
        token_b, _ = b.join(KEY_SCHEME)
        rec_a = hash_keys(pl.Series(items_a), seeds)
        rec_b = hash_keys(pl.Series(items_b), seeds)
        needles = _plaintext_needles(items_a, *rec_a) + _plaintext_needles(items_b, *rec_b)
        a.upload(token_a, *rec_a, _NoBar())
        assert "party a uploaded 200000 records (spilled to disk, encrypted)" in server.log()
        # During the run: a's records are on disk while the job waits for b.
        segments = _files_under(spill)
        assert segments and sum(p.stat().st_size for p in segments) > 200_000 * 16
        assert _scan(segments, needles) == []
        b.upload(token_b, *rec_b, _NoBar())
        assert _scan(_files_under(spill), needles) == []
        got_a, got_b = a.result(token_a), b.result(token_b)
        assert got_a.total == got_b.total == 100_000
    finally:
        a.close()
        b.close()
    _wait_for(lambda: "job state wiped" in server.log(), "the job to be wiped")
    assert _files_under(spill) == []  # segments deleted when the job ended
    # Nothing the run wrote anywhere under /tmp (server log, spill, caches) holds them.
    assert _scan(_recent_tmp_files(started), needles) == []
    server.proc.terminate()
    server.proc.wait(timeout=20)
    assert list(spill.iterdir()) == []


def test_spill_left_by_a_killed_server_is_ciphertext_only(
    start_server, policy_file, policy, tmp_path
):
    """SIGKILL leaves segment files behind (nothing can delete them); the key died with
    the process, so they are ciphertext nobody can open. The next server to start on the
    spill directory removes them (finding F3), but not those of a live server sharing it."""
    spill = tmp_path / "spill"
    spill.mkdir()
    args = ("--memory-budget", "1MiB", "--spill-dir", str(spill))
    server = start_server(*args, policy=policy_file)
    neighbour = start_server(*args, policy=policy_file)  # shares the spill directory
    items = _secret_items("killed", 150_000)
    a = _client(server.port, policy, "a", job="killed")
    n = _client(neighbour.port, policy, "a", job="alive")
    n_b = _client(neighbour.port, policy, "b", job="alive")
    try:
        a.connect()
        token, seeds = a.join(KEY_SCHEME)
        records = hash_keys(pl.Series(items), seeds)
        a.upload(token, *records, _NoBar())
        n.connect()
        token_n, seeds_n = n.join(KEY_SCHEME)
        records_n = hash_keys(pl.Series(items), seeds_n)
        n.upload(token_n, *records_n, _NoBar())  # spilled, waiting for b
    finally:
        a.close()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    areas = sorted(p for p in spill.iterdir() if _files_under(p))
    assert len(areas) == 2, areas  # the killed server's and the live neighbour's
    left = _files_under(spill)
    assert _scan(left, _plaintext_needles(items, *records)) == []
    restarted = start_server(*args, policy=policy_file)
    log = restarted.log()
    swept = [ln for ln in log.splitlines() if "stale spill area" in ln]
    assert len(swept) == 1, log
    assert f"spill directory {spill}: removed 1 stale spill area(s) (" in swept[0], swept
    remaining = [p for p in spill.iterdir() if _files_under(p)]
    assert len(remaining) == 1 and remaining[0] in areas, remaining  # the live one
    # The neighbour's job was not disturbed: its spilled records are still readable.
    try:
        n_b.connect()
        token_b, _ = n_b.join(KEY_SCHEME)
        n_b.upload(token_b, *records_n, _NoBar())
        assert n.result(token_n).total == n_b.result(token_b).total == 150_000
    finally:
        n.close()
        n_b.close()


# -- results reach only recipients -------------------------------------------------------


def _spec_clients(port, policy, spec: JobSpec, keys):
    clients = {}
    for party in spec.parties:
        clients[party.name] = _client(
            port,
            policy,
            party.name,
            job=spec.job_id,
            parties=len(spec.parties),
            spec=spec,
            party_key=keys[party.name],
        )
    return clients


def _raw_result(client: PsiClient, token: bytes) -> list:
    stream = client.stub.GetResult(
        pb.GetResultRequest(), metadata=((SESSION_METADATA, token.hex()),), timeout=60
    )
    return list(stream)


@pytest.mark.parametrize(
    ("output", "min_intersection", "expected"),
    [
        ("intersection", 0, {"a": "RELEASED", "b": "RELEASED", "c": "NOT_RECIPIENT"}),
        ("count", 0, {"a": "COUNT_ONLY", "b": "COUNT_ONLY", "c": "COUNT_ONLY"}),
        ("intersection", 31, {n: "BELOW_THRESHOLD" for n in "abc"}),
    ],
)
def test_results_never_reach_a_non_recipient_on_the_wire(
    policy, output, min_intersection, expected
):
    keys = {n: generate_private_key() for n in "abc"}
    spec = JobSpec(
        job_id=f"rcpt-{output}-{min_intersection}",
        parties=tuple(PartySpec(name=n, public_key=public_key_der(k)) for n, k in keys.items()),
        recipients=("a", "b"),
        output=OutputKind(output),
        min_intersection=min_intersection,
    )
    running = start_server(
        ServerConfig(
            host="127.0.0.1:0", attestation="sim", client_policy=policy, allow_simulated=True
        )
    )
    clients = _spec_clients(running.port, policy, spec, keys)
    common = _secret_items("common", 30)
    try:
        tokens, seeds = {}, None
        for name, client in clients.items():
            client.connect()
            tokens[name], seeds = client.join(KEY_SCHEME)
        for name, client in clients.items():
            own = pl.Series(common + _secret_items(name, 10))
            client.upload(tokens[name], *hash_keys(own, seeds), _NoBar())
        chunks = {name: _raw_result(client, tokens[name]) for name, client in clients.items()}
    finally:
        for client in clients.values():
            client.close()
        running.stop(grace=0)
    for name, got in chunks.items():
        status = pb.ResultStatus.Name(got[-1].status)
        assert status == expected[name], name
        records = b"".join(c.records for c in got)
        if status == "RELEASED":
            assert len(records) == 30 * 16 and got[-1].result_sha256
            assert got[-1].result_digest_salt
            continue
        # Not released: no record, no result digest, no salt to test guesses against.
        assert records == b"" and all(c.record_count == 0 for c in got), name
        assert all(not c.result_sha256 and not c.result_digest_salt for c in got), name
        if status == "BELOW_THRESHOLD":
            assert all(c.total_records == 0 for c in got)  # not even the size
            receipt = SignedReceipt.from_json(got[-1].receipt_json).receipt
            assert receipt.result_size is None and receipt.result_sha256 is None
        else:
            assert got[-1].total_records == 30


# -- job state wiped after release or expiry -----------------------------------------------


@pytest.fixture
def small_server(policy, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    running = start_server(
        ServerConfig(
            host="127.0.0.1:0",
            attestation="sim",
            client_policy=policy,
            allow_simulated=True,
            spill_dir=str(spill),
            limits=Limits(
                job_timeout_seconds=4, memory_budget_bytes=1024 * 1024, memory_runtime_bytes=0
            ),
        )
    )
    yield running, spill
    running.stop(grace=0)


def _upload(client: PsiClient, items: list[str]) -> bytes:
    client.connect()
    token, seeds = client.join(KEY_SCHEME)
    client.upload(token, *hash_keys(pl.Series(items), seeds), _NoBar())
    return token


def _assert_wiped(running, spill: Path) -> None:
    assert live_jobs(running.registry) == 0
    assert running.registry.budget.held == 0  # every record's memory given back
    assert _files_under(spill) == []  # every spilled segment deleted


def test_job_state_wiped_after_release(small_server, policy, caplog):
    caplog.set_level(logging.INFO, logger="teepsi")
    running, spill = small_server
    items = _secret_items("rel", 100_000)  # 1.6 MB of records: over the 1 MiB budget
    a, b = (_client(running.port, policy, n, job="released") for n in "ab")
    try:
        token_a = _upload(a, items)
        assert _files_under(spill)  # a's records, sealed on disk
        token_b = _upload(b, items[::2])
        # Computed: the uploads' stores are closed; only the result remains, its one chunk
        # (800 KB) sealed, since it is over the quarter of the budget a result may hold.
        assert live_jobs(running.registry) == 1 and len(_files_under(spill)) == 1
        assert a.result(token_a).total == 50_000
        assert live_jobs(running.registry) == 1  # b has not fetched yet
        assert b.result(token_b).total == 50_000
        _assert_wiped(running, spill)
        assert "job released: every party has its result; job state wiped" in caplog.text
        for client, token in ((a, token_a), (b, token_b)):
            with pytest.raises(PsiClientError, match="UNAUTHENTICATED: unknown or expired"):
                client.result(token)
    finally:
        a.close()
        b.close()


def test_job_state_wiped_after_expiry_while_waiting(small_server, policy, caplog):
    caplog.set_level(logging.INFO, logger="teepsi")
    running, spill = small_server
    a = _client(running.port, policy, "a", job="expired")
    try:
        token = _upload(a, _secret_items("exp", 100_000))
        assert _files_under(spill)
        started = time.monotonic()
        with pytest.raises(PsiClientError, match="DEADLINE_EXCEEDED: job expired expired: 1 of 2"):
            a.result(token)
        assert time.monotonic() - started < 6
        _assert_wiped(running, spill)
        assert "job expired expired (deadline passed): 1 of 2 parties had uploaded" in caplog.text
        with pytest.raises(PsiClientError, match="UNAUTHENTICATED"):
            a.result(token)
    finally:
        a.close()


def test_job_state_wiped_after_expiry_with_an_undelivered_result(small_server, policy):
    """Every party uploaded, one never fetched: the result is dropped at the deadline."""
    running, spill = small_server
    items = _secret_items("undelivered", 1000)
    a, b = (_client(running.port, policy, n, job="undelivered") for n in "ab")
    try:
        token_a, token_b = _upload(a, items), _upload(b, items)
        assert a.result(token_a).total == 1000
        assert live_jobs(running.registry) == 1
        _wait_for(lambda: live_jobs(running.registry) == 0, "the deadline", timeout=15)
        _assert_wiped(running, spill)
        with pytest.raises(grpc.RpcError) as err:
            _raw_result(b, token_b)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        a.close()
        b.close()


# -- the host's view: server log and audit log confirm no guess ---------------------------

#: The intersection's size in the guessing jobs: distinctive, so finding it is a leak.
_GUESS_SIZE = 11
#: A date and time of day as logs and certificates print it (ISO 8601, UTC or not).
_CLOCK_READING = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?")


def _canonical_records(hi: np.ndarray, lo: np.ndarray) -> list[bytes]:
    """A set's records as the enclave digests them: de-duplicated, sorted, 16 bytes each
    (so every subset of the list, in order, is that subset's canonical form)."""
    sorted_hi, sorted_lo, _ = intersect_records([(hi, lo)])
    data = records_to_bytes(sorted_hi, sorted_lo)
    return [data[i : i + 16] for i in range(0, len(data), 16)]


def _published_digests(text: str) -> set[str]:
    """Every 64-hex-digit and 44-character base64 window of the text: whatever spelling
    of a SHA-256 digest appears there is in this set."""
    windows: set[str] = set()
    for run in re.findall(r"[0-9a-fA-F]{64,}", text):
        run = run.lower()
        windows.update(run[i : i + 64] for i in range(len(run) - 63))
    for run in re.findall(r"[A-Za-z0-9+/=]{44,}", text):
        windows.update(run[i : i + 44] for i in range(len(run) - 43))
    return windows


def _audit_numbers(audit: Path) -> list[tuple[str, str, int]]:
    """(event, field, value) of every integer field of every entry but the chain's own."""
    found = []
    for line in audit.read_text().splitlines():
        entry = json.loads(line)
        for key, value in entry.items():
            counts = isinstance(value, int) and not isinstance(value, bool)
            if counts and key not in ("seq", "time"):
                found.append((entry["event"], key, value))
    return found


@pytest.mark.parametrize("server_kind", ["process", "in-process"])
@pytest.mark.parametrize(
    ("output", "recipients", "min_intersection", "status"),
    [
        ("count", ("a", "b", "c"), 0, "COUNT_ONLY"),
        ("intersection", ("a", "b"), 0, "NOT_RECIPIENT"),
        ("intersection", ("a", "b", "c"), _GUESS_SIZE + 1, "BELOW_THRESHOLD"),
    ],
)
def test_host_logs_and_audit_log_confirm_no_guess_of_the_intersection(
    request,
    policy,
    policy_file,
    tmp_path,
    caplog,
    output,
    recipients,
    min_intersection,
    status,
    server_kind,
):
    """Party c (count-only, non-recipient, or below the threshold) holds its own set, its
    job's key seeds and set salt, the server's DEBUG log and the audit log; it tries every
    subset of its set as the intersection against every digest there, salted with every
    salt it has, and looks for the size: nothing matches. The server runs as a `teepsi
    server -v` process, or in this process with all of teepsi's logging at DEBUG (which
    also catches the clients' logs)."""
    caplog.set_level(logging.DEBUG, logger="teepsi")
    keys = {n: generate_private_key() for n in "abc"}
    spec = JobSpec(
        job_id=f"guess-{status.lower().replace('_', '-')}",
        parties=tuple(PartySpec(name=n, public_key=public_key_der(k)) for n, k in keys.items()),
        recipients=recipients,
        output=OutputKind(output),
        min_intersection=min_intersection,
    )
    audit = tmp_path / "audit.jsonl"
    if server_kind == "process":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            metrics_port = sock.getsockname()[1]
        process = request.getfixturevalue("start_server")(
            "-v",
            "--audit-log",
            str(audit),
            "--metrics-host",
            f"127.0.0.1:{metrics_port}",
            policy=policy_file,
        )
        port = process.port
    else:
        running = start_server(
            ServerConfig(
                host="127.0.0.1:0",
                attestation="sim",
                client_policy=policy,
                allow_simulated=True,
                audit_log=audit,
            )
        )
        port = running.port
    common = _secret_items("common", _GUESS_SIZE)
    sets = {"a": common + _secret_items("a", 29), "b": common + _secret_items("b", 24)}
    sets["c"] = common + _secret_items("c", 2)  # 13 items: 8192 subsets to try
    clients = _spec_clients(port, policy, spec, keys)
    try:
        tokens, seeds = {}, None
        for name, client in clients.items():
            client.connect()
            tokens[name], seeds = client.join(KEY_SCHEME)
        for name, client in clients.items():
            client.upload(tokens[name], *hash_keys(pl.Series(sets[name]), seeds), _NoBar())
        chunks = {name: _raw_result(client, tokens[name]) for name, client in clients.items()}
        # The host's metrics once the job is released (and while c's result is still held).
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
            if server_kind == "process"
            else generate_latest(running.metrics.registry).decode()
        )
    finally:
        for client in clients.values():
            client.close()
        if server_kind == "process":
            process.proc.send_signal(signal.SIGTERM)
            process.proc.wait(timeout=20)
        else:
            running.stop(grace=0)
    server_log = process.log() if server_kind == "process" else caplog.text
    if server_kind == "process":
        assert " INFO " in server_log
    last = chunks["c"][-1]
    assert pb.ResultStatus.Name(last.status) == status
    host_view = server_log + "\n" + caplog.text + "\n" + audit.read_text() + "\n" + metrics
    assert "job " + spec.job_id in server_log  # the log did record the job
    # c's guessing kit: its records, and every salt it was given.
    records = _canonical_records(*hash_keys(pl.Series(sets["c"]), seeds))
    salts = [b"", bytes(last.set_digest_salt), bytes(last.result_digest_salt)]
    assert not last.result_digest_salt  # c never gets the result's salt
    published = _published_digests(host_view)

    def digests(subset: tuple[bytes, ...]) -> list[bytes]:
        return [hashlib.sha256(salt + b"".join(subset)).digest() for salt in salts]

    # The kit works: c's own salted set digest is its receipt entry, and the log has it.
    own = digests(tuple(records))[1]
    receipt = SignedReceipt.from_json(last.receipt_json).receipt
    assert receipt.entry("c").set_sha256 == own and own.hex() in published
    confirmed = []
    for size in range(len(records) + 1):
        for subset in itertools.combinations(records, size):
            for digest in digests(subset):
                if digest == own:
                    continue  # c's own set with its own salt: c learns nothing from it
                hex_form, b64_form = digest.hex(), base64.b64encode(digest).decode()
                if hex_form in published or b64_form in published:
                    confirmed.append(len(subset))
    assert confirmed == []
    # The size is not in the server log, nor in any number of the audit log.
    for text in (server_log, caplog.text):
        # Clock readings (log timestamps, certificate dates) hold every small number.
        text = _CLOCK_READING.sub("<time>", text)
        assert not re.search(rf"\b{_GUESS_SIZE}\b", text), text
    assert all(value != _GUESS_SIZE for _, _, value in _audit_numbers(audit))
    # Nor in any value of the metrics (counts of jobs, parties, uploads; bytes; seconds).
    assert "teepsi_intersections_total 1.0" in metrics
    values = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    ]
    assert _GUESS_SIZE not in values and _GUESS_SIZE * 16 not in values
