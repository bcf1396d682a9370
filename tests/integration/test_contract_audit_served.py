"""The audit log a running server writes and signs, checked by teepsi audit verify."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teepsi.cli import main as cli_main
from teepsi.client.party import PartyConfig, PsiClient
from teepsi.contract.audit import (
    AuditHead,
    head_payload,
)
from teepsi.contract.receipt import SignedReceipt
from teepsi.contract.signing import sign_document
from teepsi.engine.records import hash_keys
from teepsi.engine.tables import TableSpec
from teepsi.server.app import ServerConfig, start_server
from tests.unit.test_contract_audit import (
    _entries,
    _rechain,
    lines,
)

KEY_SCHEME = TableSpec(path=Path("x")).key_scheme


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
