"""The audit log: chain, reopen, tamper detection with line numbers, threads."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teepsi.attestation.evidence import Role
from teepsi.attestation.providers import make_provider
from teepsi.attestation.ratls import create_certificate
from teepsi.contract.audit import (
    GENESIS_HASH,
    AuditError,
    AuditHead,
    AuditLog,
    AuditSummary,
    HeadSigner,
    head_payload,
    verify_audit_log,
)
from teepsi.contract.signing import sign_document
from teepsi.engine.tables import TableSpec

KEY_SCHEME = TableSpec(path=Path("x")).key_scheme


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
        (
            b"not json\n",
            "line 3: not a JSON entry (invalid JSON at line 1 column 1: Expecting value)",
        ),
        (b"\n", "line 3: not a JSON entry (invalid JSON at line 2 column 1: Expecting value)"),
        (b"[1]\n", "line 3: not a JSON object"),
        (b'{"seq":3}\n', "line 3: missing time"),
        (b"\xff\n", "line 3: not a JSON entry (not ASCII)"),
        (b'{"a":1,"a":2}\n', "line 3: not a JSON entry (a: duplicate key)"),
        (b'{"time":NaN}\n', "line 3: not a JSON entry (invalid JSON: NaN is not allowed)"),
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


# -- signed heads: the enclave's key authenticates the chain ------------------------------


@pytest.fixture(scope="module")
def server_identity():
    """A simulated server's RA-TLS certificate and key, as a real server makes them."""
    return create_certificate(make_provider("sim", Role.SERVER))


def _signer(identity) -> HeadSigner:
    return HeadSigner(identity.certificate_der, identity.private_key)


def _entries(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines(path)]


def _rechain(path: Path, entries: list[dict[str, object]]) -> None:
    """Write entries as a well-formed chain: what someone who can write the file does."""
    prev = GENESIS_HASH
    out = []
    for number, entry in enumerate(entries, start=1):
        body = {k: v for k, v in entry.items() if k != "hash"}
        body.update(seq=number, prev=prev)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        prev = hashlib.sha256(bytes.fromhex(prev) + canonical).hexdigest()
        out.append(json.dumps({**body, "hash": prev}, sort_keys=True, separators=(",", ":")))
    path.write_text("".join(line + "\n" for line in out))


def _signed_log(path: Path, identity, count: int = 4) -> AuditHead:
    """certificate, signed head, events, a release's signed head; returns that head."""
    with AuditLog(path, signer=_signer(identity)) as log:
        for i in range(count):
            log.append("joined", job_id="q4", party=f"bank-{i}", attested=True)
        log.append("released", job_id="q4", output="count", threshold_met=True)
        head = log.position()
        log.sign_head()
        log.append("delivered", job_id="q4")
    return head


def test_signed_log_records_its_certificate_and_signs_heads(tmp_path, server_identity):
    path = tmp_path / "audit.jsonl"
    head = _signed_log(path, server_identity)
    entries = _entries(path)
    events = [e["event"] for e in entries]
    assert events == [
        "server_certificate",
        "signed_head",
        *["joined"] * 4,
        "released",
        "signed_head",
        "delivered",
        "signed_head",  # close() signs the last head
    ]
    assert base64.b64decode(entries[0]["certificate"]) == server_identity.certificate_der
    summary = verify_audit_log(path, expect_entry=head)
    assert summary.signed_entries == len(entries) and summary.unsigned_tail == 0
    assert [s.der for s in summary.signers] == [server_identity.certificate_der]
    assert entries[0]["unsigned_before"] == 0
    # Reopened by a new start: its certificate again, and what it found unsigned.
    with AuditLog(path) as unsigned:
        unsigned.append("joined", job_id="q5", party="x")
    with AuditLog(path, signer=_signer(server_identity)):
        pass
    entries = _entries(path)
    assert [e["event"] for e in entries[-3:]] == ["joined", "server_certificate", "signed_head"]
    assert entries[-2]["unsigned_before"] == 1  # "joined", written without a signer
    summary = verify_audit_log(path)
    assert summary.unsigned_tail == 0 and summary.found_unsigned == 1


def test_rewrite_and_rechain_before_a_signed_head_is_detected(tmp_path, server_identity):
    path = tmp_path / "audit.jsonl"
    _signed_log(path, server_identity)
    entries = _entries(path)
    entries[3]["party"] = "mallory"  # a joined line, rewritten and every hash recomputed
    _rechain(path, entries)
    assert error(path) == (
        "line 8: signed head: signature does not verify under this certificate recorded at "
        "line 1 (lines before it were rewritten, or the head was forged)"
    )
    # Dropping a line and re-chaining breaks the next signed head the same way.
    other = tmp_path / "b.jsonl"
    _signed_log(other, server_identity)
    entries = _entries(other)
    _rechain(path, entries[:3] + entries[4:])
    assert error(path).startswith("line 7: signed head: signature does not verify")


def test_forged_signed_heads_are_detected(tmp_path, server_identity):
    path = tmp_path / "audit.jsonl"
    _signed_log(path, server_identity)
    genuine = _entries(path)
    named = genuine[0]["certificate_sha256"]
    other = ec.generate_private_key(ec.SECP384R1())
    # Rewrite line 3, then sign the rewritten chain with another key in the genuine
    # certificate's name.
    entries = [dict(e) for e in genuine[:7]]
    entries[2]["party"] = "mallory"
    _rechain(path, entries)
    forged_head = AuditHead(entries=7, hash=_entries(path)[-1]["hash"])
    signature = sign_document(other, head_payload(forged_head, bytes.fromhex(named)))
    forged = {"event": "signed_head", "certificate_sha256": named, "signature": signature.hex()}
    _rechain(path, [*entries, {"time": 1.0, **forged}])
    assert error(path).startswith("line 8: signed head: signature does not verify")
    # A head naming a certificate the log never recorded.
    _rechain(path, [*entries, {"time": 1.0, **forged, "certificate_sha256": "ab" * 32}])
    assert error(path) == "line 8: signed head names a certificate not recorded before it (forged)"
    # Malformed signature and extra fields: refused, not skipped.
    _rechain(path, [*entries, {"time": 1.0, **forged, "signature": "XY"}])
    assert error(path) == "line 8: signature is not lower-case hex"
    _rechain(path, [*entries, {"time": 1.0, **forged, "note": "x"}])
    assert error(path) == "line 8: signed_head entry has an unknown field note"
    # A certificate entry whose digest is not its certificate's.
    bad = [dict(e) for e in genuine]
    bad[0]["certificate_sha256"] = "00" * 32
    _rechain(path, bad)
    assert error(path) == "line 1: certificate_sha256 is not the certificate's SHA-256"


def test_receipt_head_detects_rewrite_and_truncation(tmp_path, server_identity):
    path = tmp_path / "audit.jsonl"
    head = _signed_log(path, server_identity)
    data = lines(path)
    assert verify_audit_log(path, expect_entry=head).entries == len(data)
    path.write_bytes(b"".join(data[: head.entries - 1]))  # cut before the receipt's head
    assert error(path, expect_entry=head) == (
        f"the log ends at line {head.entries - 1}, before the expected head at line "
        f"{head.entries} (lines removed from the end, or another log)"
    )
    # Rewritten up to the head, no signed head left to break: the receipt's head breaks.
    entries = [json.loads(line) for line in data[: head.entries]]
    entries = [e for e in entries if e["event"] != "signed_head"]
    entries[3]["party"] = "mallory"
    _rechain(path, entries)
    message = error(path, expect_entry=AuditHead(len(entries), head.hash))
    assert message.startswith(f"line {len(entries)} has hash ")
    assert message.endswith(
        "expected " + head.hash[:16] + "... (lines up to it were rewritten, or another log)"
    )


def test_head_is_signed_within_the_interval_and_log_is_private(tmp_path, server_identity):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signer=_signer(server_identity), sign_interval_seconds=0.2)
    try:
        log.append("joined", job_id="q4", party="a")
        assert verify_audit_log(path).unsigned_tail == 1
        deadline = time.monotonic() + 10
        while verify_audit_log(path).unsigned_tail and time.monotonic() < deadline:
            time.sleep(0.05)
        assert verify_audit_log(path).unsigned_tail == 0
        with pytest.raises(ValueError, match="written by the log itself"):
            log.append("signed_head", signature="00")
        with pytest.raises(ValueError, match="written by the log itself"):
            log.append("server_certificate")
    finally:
        log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(AuditError, match="cannot open for append"):
        AuditLog(link)


# -- teepsi audit verify against a real server's log and receipts --------------------------


def test_hostile_values_in_signed_entries_are_refused_in_one_line(tmp_path, server_identity):
    """Every field of the certificate and head entries, replaced with values of every type
    and the hashes recomputed: refused with AuditError naming the line, never a crash."""
    path = tmp_path / "audit.jsonl"
    _signed_log(path, server_identity)
    genuine = _entries(path)
    hostile = [None, True, 0, -1, 2**70, "", "zz", "ab" * 32, "x" * 2000, "AAAA", 1.5]
    hostile += [base64.b64encode(b"\x30\x03\x02\x01\x00").decode()]  # DER, not a certificate
    for index in (0, 1):
        for field in sorted(set(genuine[index]) - {"seq", "prev", "hash", "time"}):
            for value in hostile:
                original = genuine[index][field]
                if type(value) is type(original) and value == original:
                    continue  # the genuine value
                entries = [dict(e) for e in genuine]
                entries[index][field] = value
                _rechain(path, entries)
                try:
                    verify_audit_log(path)
                except AuditError as exc:
                    assert "\n" not in str(exc)
                    # a changed event name makes it another event: a later line fails
                    where = f"{path}: line " if field == "event" else f"{path}: line {index + 1}: "
                    if (field, value) == ("collateral", ""):
                        # "no collateral" is well-formed: the head's signature refuses it
                        where = f"{path}: line 2: signed head: signature does not verify"
                    assert str(exc).startswith(where), (field, value, str(exc))
                else:
                    raise AssertionError(f"accepted {field}={value!r} on line {index + 1}")


def test_entries_a_writer_could_not_write_are_refused(tmp_path):
    """Event and field names outside what append() accepts, hashes recomputed: refused."""
    path = tmp_path / "audit.jsonl"
    write_log(path)
    genuine = _entries(path)
    for change, message in [
        ({"event": "Joined!"}, "line 2: event is not an event name"),
        ({"event": 7}, "line 2: event is not an event name"),
        ({"Party": "x"}, 'line 2: field name "Party" is not one a writer can write'),
    ]:
        entries = [dict(e) for e in genuine]
        entries[1].update(change)
        _rechain(path, entries)
        assert error(path) == message
