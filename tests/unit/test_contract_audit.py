"""The audit log: chain, reopen, tamper detection with line numbers, threads."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teepsi.attestation.evidence import Role
from teepsi.attestation.providers import make_provider
from teepsi.attestation.ratls import create_certificate
from teepsi.cli import main as cli_main
from teepsi.client.party import PartyConfig, PsiClient
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
from teepsi.contract.receipt import SignedReceipt
from teepsi.contract.signing import sign_document
from teepsi.engine.keys import hash_keys
from teepsi.engine.tables import TableSpec
from teepsi.server.app import ServerConfig, start_server

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


def _run_job(running, policy, job: str, folder: Path) -> Path:
    """A two-party quick job on an in-process server; party a's receipt, saved as the CLI
    saves it (RECEIPT and RECEIPT.cert.pem)."""
    clients = [
        PsiClient(
            PartyConfig(
                host=f"127.0.0.1:{running.port}",
                policy=policy,
                name=name,
                party_count=2,
                job_id=job,
                attestation="sim",
                allow_simulated=True,
                timeout=60,
            )
        )
        for name in ("a", "b")
    ]
    try:
        tokens, seeds = [], None
        for client in clients:
            client.connect()
            token, seeds = client.join(KEY_SCHEME)
            tokens.append(token)
        for client, token, own in zip(clients, tokens, ("x", "y")):
            client.upload(token, *hash_keys(pl.Series(["shared", own]), seeds), _NoBar())
        results = [client.result(token) for client, token in zip(clients, tokens)]
    finally:
        for client in clients:
            client.close()
    receipt = folder / f"{job}.receipt.json"
    receipt.write_text(results[0].receipt_json + "\n")
    receipt.with_name(receipt.name + ".cert.pem").write_bytes(running.certificate_pem)
    return receipt


class _NoBar:
    def advance(self, amount: int) -> None:
        pass


@pytest.fixture(scope="module")
def served_logs(tmp_path_factory, policy):
    """Two servers' logs, one job each, and a receipt from each (servers stopped)."""
    folder = tmp_path_factory.mktemp("served")
    made = []
    for index in range(2):
        log_path = folder / f"audit{index}.jsonl"
        running = start_server(
            ServerConfig(
                host="127.0.0.1:0",
                attestation="sim",
                client_policy=policy,
                allow_simulated=True,
                audit_log=log_path,
            )
        )
        try:
            receipt = _run_job(running, policy, f"job{index}", folder)
        finally:
            running.stop(grace=0)
        made.append((log_path, receipt))
    return made


def _audit_verify(
    capsys, *args: str | Path, simulated_ok: bool = True
) -> tuple[int, dict[str, object]]:
    allow = ["--allow-simulated"] if simulated_ok else []
    code = cli_main(["audit", "verify", *allow, *map(str, args)])
    out, err = capsys.readouterr()
    if code == 0:  # simulated signers pass only when allowed, and loudly
        assert "WARNING SIMULATED ATTESTATION" in err
    assert out.count("\n") == 1, out  # one line
    report = json.loads(out)
    assert report["valid"] is (code == 0)
    assert "\n" not in str(report.get("reason", ""))
    return code, report


def test_audit_verify_with_a_receipt(served_logs, capsys, tmp_path, sim_policy_file):
    (log_path, receipt), (other_log, other_receipt) = served_logs
    code, report = _audit_verify(capsys, log_path, "--receipt", receipt)
    assert code == 0, report
    head = SignedReceipt.from_json(receipt.read_bytes()).receipt.audit_head
    assert head is not None and report["receipt_head"] == head.to_dict()
    assert report["unsigned_tail"] == 0 and report["signed_entries"] == report["entries"]
    assert report["found_unsigned"] == 0 and "warning" not in report
    # The last signed head cut off: still a valid log, but its tail is flagged.
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines(log_path)[:-1]))
    code, report = _audit_verify(capsys, cut)
    assert code == 0 and report["unsigned_tail"] == 1
    assert str(report["warning"]).startswith("the last 1 line(s) follow the newest signed head")
    assert [s["signer"]["simulated"] for s in report["signers"]] == [True]  # type: ignore[index]
    # The events of the job, and the head the receipt names is its release.
    entries = _entries(log_path)
    assert [e["event"] for e in entries[: head.entries]][-1] == "released"
    assert entries[head.entries - 1]["hash"] == head.hash
    # The signer's evidence is judged through the same path as verify-receipt's.
    policy_args = ("--config", sim_policy_file)
    assert _audit_verify(capsys, log_path, *policy_args)[0] == 0
    for extra in ((), policy_args):
        code, report = _audit_verify(capsys, log_path, *extra, simulated_ok=False)
        assert code == 1 and "SIMULATED" in report["reason"]
        assert "pass --allow-simulated" in report["reason"]
    # A receipt of another server's log: its head is not in this log.
    code, report = _audit_verify(capsys, log_path, "--receipt", other_receipt)
    assert code == 1
    assert report["reason"].endswith("(lines up to it were rewritten, or another log)")
    assert _audit_verify(capsys, other_log, "--receipt", other_receipt)[0] == 0
    # --cert without --receipt, and a receipt file that cannot be read: usage errors.
    assert cli_main(["audit", "verify", str(log_path), "--cert", str(receipt)]) == 2
    assert "pass the receipt too" in capsys.readouterr().err
    assert cli_main(["audit", "verify", str(log_path), "--receipt", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("teepsi audit: error: cannot read ")


def test_audit_verify_detects_rewrite_truncation_and_forgery(served_logs, capsys, tmp_path):
    (genuine_path, receipt), _ = served_logs
    genuine = _entries(genuine_path)
    head = SignedReceipt.from_json(receipt.read_bytes()).receipt.audit_head
    assert head is not None
    path = tmp_path / "audit.jsonl"

    def verdict(entries: list[dict[str, object]], *extra: str | Path) -> str:
        _rechain(path, entries)
        code, report = _audit_verify(capsys, path, *extra)
        assert code == 1, report
        return str(report["reason"])

    _rechain(path, genuine)
    assert _audit_verify(capsys, path, "--receipt", receipt)[0] == 0
    uploaded = next(i for i, e in enumerate(genuine) if e["event"] == "uploaded")
    # Rewrite one entry (a party's record count) and recompute every hash.
    rewritten = [dict(e) for e in genuine]
    rewritten[uploaded]["records"] = 3
    assert "signed head: signature does not verify" in verdict(rewritten)
    # ...and strip the signed heads it broke: the receipt's head no longer matches.
    stripped = [e for e in rewritten if e["event"] != "signed_head"]
    stripped.insert(1, genuine[1])  # keep the first (valid) signed head
    reason = verdict(stripped, "--receipt", receipt)
    assert f"line {head.entries} has hash" in reason or "before the expected head" in reason
    # Truncation before the receipt's head.
    reason = verdict(genuine[: head.entries - 1], "--receipt", receipt)
    assert reason.endswith(
        f"the log ends at line {head.entries - 1}, before the expected head at line "
        f"{head.entries} (lines removed from the end, or another log)"
    )
    # Everything stripped of signatures: nothing is authenticated.
    unsigned = [e for e in genuine if e["event"] not in ("signed_head", "server_certificate")]
    assert verdict(unsigned).endswith(
        "no signed head: nothing in the log is authenticated by a server key"
    )
    # A head forged with another key in the genuine certificate's name.
    other = ec.generate_private_key(ec.SECP384R1())
    named = genuine[0]["certificate_sha256"]
    body = [dict(e) for e in genuine if e["event"] != "signed_head"]
    body[2]["records"] = 3
    _rechain(path, body)
    forged_at = AuditHead(entries=len(body), hash=_entries(path)[-1]["hash"])
    signature = sign_document(other, head_payload(forged_at, bytes.fromhex(named)))
    forged = {"time": 1.0, "event": "signed_head", "certificate_sha256": named}
    reason = verdict([*body, {**forged, "signature": signature.hex()}])
    assert "signed head: signature does not verify" in reason
    # ...or in the name of a certificate of its own, recorded in the log: the chain and
    # signature check out, but that certificate carries no enclave's evidence.
    own_cert = _self_signed(other)
    own = {
        "time": 1.0,
        "event": "server_certificate",
        "certificate": base64.b64encode(own_cert).decode(),
        "certificate_sha256": hashlib.sha256(own_cert).hexdigest(),
        "collateral": "",
        "unsigned_before": 0,
    }
    _rechain(path, [*body, own])
    forged_at = AuditHead(entries=len(body) + 1, hash=_entries(path)[-1]["hash"])
    signature = sign_document(other, head_payload(forged_at, hashlib.sha256(own_cert).digest()))
    reason = verdict(
        [
            *body,
            own,
            {
                **forged,
                "certificate_sha256": own["certificate_sha256"],
                "signature": signature.hex(),
            },
        ]
    )
    assert "a certificate that signs heads is refused" in reason


def _self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def test_server_signs_periodically_and_across_restarts(tmp_path, policy, capsys):
    """A join with no release is signed within the interval; a restarted server records
    its new certificate, and a receipt of the first run still checks out."""
    log_path = tmp_path / "audit.jsonl"

    def serve():
        return start_server(
            ServerConfig(
                host="127.0.0.1:0",
                attestation="sim",
                client_policy=policy,
                allow_simulated=True,
                audit_log=log_path,
                audit_sign_interval_seconds=0.3,
            )
        )

    first = serve()
    try:
        receipt = _run_job(first, policy, "before", tmp_path)
    finally:
        first.stop(grace=0)
    second = serve()
    lonely = PsiClient(
        PartyConfig(
            host=f"127.0.0.1:{second.port}",
            policy=policy,
            name="a",
            party_count=2,
            job_id="waiting",
            attestation="sim",
            allow_simulated=True,
            timeout=60,
        )
    )
    try:
        lonely.connect()
        lonely.join(KEY_SCHEME)
        deadline = time.monotonic() + 10
        while _entries(log_path)[-1]["event"] != "signed_head" and time.monotonic() < deadline:
            time.sleep(0.05)
        events = [e["event"] for e in _entries(log_path)]
        # created and joined, then a head the server signed on its own (no release)
        assert events[-3:] == ["created", "joined", "signed_head"]
    finally:
        lonely.close()
        second.stop(grace=0)
    code, report = _audit_verify(capsys, log_path, "--receipt", receipt)
    assert code == 0, report
    assert len(report["signers"]) == 2 and report["unsigned_tail"] == 0
    assert report["found_unsigned"] == 0  # the first server signed its last line on stopping


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
