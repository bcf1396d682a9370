"""The audit log: chain, reopen, tamper detection with line numbers, threads."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from pathlib import Path

import pytest

from teepsi.contract.audit import (
    GENESIS_HASH,
    AuditError,
    AuditLog,
    AuditSummary,
    verify_audit_log,
)


def write_log(path: Path, count: int = 5) -> str:
    with AuditLog(path, clock=lambda: 1767222000.125) as log:
        log.append("created", job_id="q4", parties=3, spec_sha256="ab" * 32)
        for i in range(1, count):
            log.append("joined", job_id="q4", party=f"bank-{i}", attested=i % 2 == 0, note=None)
        return log.head


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def error(path: Path, **kwargs: str) -> str:
    with pytest.raises(AuditError) as info:
        verify_audit_log(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


def test_append_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = write_log(path)
    assert verify_audit_log(path) == AuditSummary(entries=5, head=head)
    assert verify_audit_log(path, expect_head=head).entries == 5
    entries = [json.loads(line) for line in lines(path)]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0] == {
        "event": "created",
        "hash": entries[0]["hash"],
        "job_id": "q4",
        "parties": 3,
        "prev": GENESIS_HASH,
        "seq": 1,
        "spec_sha256": "ab" * 32,
        "time": 1767222000.125,
    }
    assert entries[2]["attested"] is True and entries[2]["note"] is None
    for previous, entry in itertools.pairwise(entries):
        assert entry["prev"] == previous["hash"]
    # hash = SHA-256(prev bytes || canonical JSON without "hash"), as documented
    body = {k: v for k, v in entries[1].items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert entries[1]["hash"] == hashlib.sha256(bytes.fromhex(body["prev"]) + canonical).hexdigest()
    assert entries[-1]["hash"] == head


def test_empty_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    assert log.head == GENESIS_HASH and log.entries == 0
    log.close()
    assert path.exists()
    assert verify_audit_log(path) == AuditSummary(0, GENESIS_HASH)
    with pytest.raises(AuditError, match=r"closed"):
        log.append("created")
    with pytest.raises(AuditError, match=r"cannot read"):
        verify_audit_log(tmp_path / "none.jsonl")


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = write_log(path, 3)
    with AuditLog(path) as log:
        assert log.head == head and log.entries == 3
        new_head = log.append("released", job_id="q4", result_size=2)
    summary = verify_audit_log(path, expect_head=new_head)
    assert summary == AuditSummary(4, new_head)
    assert json.loads(lines(path)[3])["prev"] == head


def test_refuses_to_continue_a_broken_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    path.write_bytes(b"".join(data[:2] + data[3:]))
    with pytest.raises(AuditError, match=r"line 3: seq is 4, expected 3"):
        AuditLog(path)
    path.write_bytes(b"".join(data)[:-10])  # torn last write
    with pytest.raises(AuditError, match=r"line 5: incomplete line"):
        AuditLog(path)


def test_edit_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    data[2] = data[2].replace(b"bank-2", b"bank-9")
    path.write_bytes(b"".join(data))
    assert error(path) == "line 3: hash does not match the entry (edited)"

    data = lines(path)
    data[2] = data[2].replace(b"bank-9", b"bank-2").replace(b'"seq":3', b'"seq": 3')
    path.write_bytes(b"".join(data))
    assert error(path) == "line 3: not in canonical form (edited)"

    data[2] = data[2].replace(b'"seq": 3', b'"seq":3').replace(b'"attested":true', b'"attested":1')
    path.write_bytes(b"".join(data))
    assert error(path) == "line 3: hash does not match the entry (edited)"


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    entry = json.loads(data[1])
    entry["party"] = "mallory"
    entry.pop("hash")
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    entry["hash"] = hashlib.sha256(bytes.fromhex(entry["prev"]) + canonical).hexdigest()
    data[1] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(data))
    assert error(path) == (
        "line 3: prev is not the previous line's hash (a line was removed, inserted or moved)"
    )


def test_deletion_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    path.write_bytes(b"".join(data[:1] + data[2:]))
    assert error(path) == "line 2: seq is 3, expected 2 (a line was removed, inserted or moved)"
    path.write_bytes(b"".join(data[1:]))  # the first line
    assert error(path) == "line 1: seq is 2, expected 1 (a line was removed, inserted or moved)"


def test_reordering_and_swaps_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    moved = data[:1] + data[2:] + data[1:2]  # line 2 moved to the end
    path.write_bytes(b"".join(moved))
    assert error(path) == "line 2: seq is 3, expected 2 (a line was removed, inserted or moved)"
    swapped = list(data)
    swapped[1], swapped[3] = swapped[3], swapped[1]
    path.write_bytes(b"".join(swapped))
    assert error(path) == "line 2: seq is 4, expected 2 (a line was removed, inserted or moved)"
    path.write_bytes(b"".join(data + data[-1:]))  # a duplicated line
    assert error(path) == "line 6: seq is 5, expected 6 (a line was removed, inserted or moved)"


def test_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    for bad, message in [
        (b"not json\n", "line 3: not a JSON entry"),
        (b"\n", "line 3: not a JSON entry"),
        (b"[1]\n", "line 3: not a JSON object"),
        (b'{"seq":3}\n', "line 3: missing time"),
        (b"\xff\n", "line 3: not a JSON entry"),
    ]:
        path.write_bytes(b"".join([*data[:2], bad, *data[3:]]))
        assert error(path) == message
    path.write_bytes(b"".join(data)[:-1])
    assert error(path).startswith("line 5: incomplete line")


def test_truncation_needs_expect_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = write_log(path)
    data = lines(path)
    path.write_bytes(b"".join(data[:3]))
    # a chain cut at the end is still a valid chain...
    assert verify_audit_log(path).entries == 3
    # ...which only a head recorded elsewhere reveals
    message = error(path, expect_head=head)
    assert message.startswith("head after line 3 is ")
    assert message.endswith("(lines removed from the end, or another log)")
    path.write_bytes(b"")
    assert error(path, expect_head=head).startswith("head after line 0 is 0000000000000000...")


def test_fields_must_be_scalars(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.jsonl") as log:
        for value in ({"a": 1}, ["item"], {"item"}, b"item", 1.5):
            with pytest.raises(TypeError, match=r"^audit field items: "):
                log.append("uploaded", items=value)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"reserved"):
            log.append("uploaded", seq=3)
        with pytest.raises(ValueError, match=r"reserved"):
            log.append("uploaded", hash="x")
        with pytest.raises(ValueError, match=r"over 1024 characters"):
            log.append("uploaded", note="x" * 1025)
        with pytest.raises(ValueError, match=r"event name"):
            log.append("Uploaded!")
        assert log.entries == 0  # nothing refused was written
        log.append("uploaded", job_id="q4", party="bank-a", items=10, distinct=9, note="é\n")
    assert verify_audit_log(tmp_path / "audit.jsonl").entries == 1
    assert (tmp_path / "audit.jsonl").read_bytes().isascii()


def test_concurrent_appends_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    threads_count, per_thread = 8, 40
    barrier = threading.Barrier(threads_count)

    def worker(index: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            log.append("uploaded", job_id=f"job-{index}", party=f"p{i}", items=i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    summary = verify_audit_log(path, expect_head=log.head)
    assert summary.entries == threads_count * per_thread
    entries = [json.loads(line) for line in lines(path)]
    assert sorted((e["job_id"], e["items"]) for e in entries) == sorted(
        (f"job-{n}", i) for n in range(threads_count) for i in range(per_thread)
    )
