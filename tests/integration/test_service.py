"""The gRPC service in-process: status codes for every refusal a caller can provoke."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.policy import policy_for
from teepsi.attestation.sim import SimEvidenceProvider
from teepsi.attestation.transcript import join_transcript_digest
from teepsi.client.party import PartyConfig, PsiClient, PsiClientError, run_party_items
from teepsi.engine.intersect import intersect_records, sorted_unique_records
from teepsi.engine.records import hash_keys, records_to_bytes
from teepsi.engine.tables import TableSpec
from teepsi.protocol import SESSION_METADATA
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.server.app import start_server
from teepsi.server.config import ServerConfig
from teepsi.server.health import HealthCheckError, check_health
from teepsi.server.limits import Limits
from tests.support.registry import expire_due, live_jobs

POLICY = policy_for(
    [("server", sim_identity(Role.SERVER)), ("provider", sim_identity(Role.DATA_PROVIDER))]
)


def _start(limits: Limits, **config):
    """A sim server on a free loopback port."""
    return start_server(
        ServerConfig(
            host="127.0.0.1:0",
            attestation="sim",
            client_policy=POLICY,
            allow_simulated=True,
            limits=limits,
            **config,
        )
    )


@pytest.fixture
def server():
    running = _start(Limits(job_timeout_seconds=20))
    yield running
    running.stop(grace=0)


def _config(server, name="a", *, parties=2, job="j") -> PartyConfig:
    return PartyConfig(
        host=f"127.0.0.1:{server.port}",
        policy=POLICY,
        name=name,
        party_count=parties,
        job_id=job,
        attestation="sim",
        allow_simulated=True,
        timeout=30,
    )


def _joined(server, name="a", *, parties=2, job="j") -> tuple[PsiClient, bytes]:
    client = PsiClient(_config(server, name, parties=parties, job=job))
    client.connect()
    token, _seeds = client.join(KEY_SCHEME)
    return client, token


def _meta(token: bytes):
    return ((SESSION_METADATA, token.hex()),)


SEEDS = (1, 2)
KEY_SCHEME = TableSpec(path=Path("x")).key_scheme


def _records(items):
    """The items' records as a client uploads them: ascending and distinct."""
    return sorted_unique_records(
        *hash_keys(pl.Series([i.decode() for i in items], dtype=pl.String), SEEDS)
    )


def _chunk(seq: int, items: list[bytes], *, last: bool = False, count: int | None = None):
    payload = records_to_bytes(*_records(items))
    return pb.UploadChunk(
        sequence=seq,
        records=payload,
        record_count=len(items) if count is None else count,
        last=last,
    )


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_duplicate_upload_refused(server):
    client, token = _joined(server)
    stub = client.stub
    stub.Upload(iter([_chunk(0, [b"x"], last=True)]), metadata=_meta(token))
    code = _code(lambda: stub.Upload(iter([_chunk(0, [b"y"], last=True)]), metadata=_meta(token)))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    client.close()


def test_non_party_caller_refused(server):
    client, _ = _joined(server)
    stub = client.stub
    stranger = b"\x01" * 32
    assert _code(lambda: list(stub.GetResult(pb.GetResultRequest(), metadata=_meta(stranger)))) is (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert _code(lambda: list(stub.GetResult(pb.GetResultRequest()))) is (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        _code(lambda: stub.Upload(iter([_chunk(0, [b"x"], last=True)]), metadata=_meta(stranger)))
        is grpc.StatusCode.UNAUTHENTICATED
    )
    client.close()


@pytest.mark.parametrize(
    ("chunks", "needle"),
    [
        ([_chunk(1, [b"x"], last=True)], "out of order"),
        ([_chunk(0, [b"x"]), _chunk(0, [b"x"], last=True)], "out of order"),
        ([_chunk(0, [b"x"]), _chunk(2, [b"y"], last=True)], "out of order"),
        ([_chunk(0, [b"x"])], "without its last chunk"),
        ([_chunk(0, [b"x"], last=True), _chunk(1, [b"y"], last=True)], "after the last"),
        ([_chunk(0, [b"x", b"y"], last=True, count=3)], "announces 3"),
        ([pb.UploadChunk(sequence=0, records=b"\1" * 17, record_count=1, last=True)], "17 bytes"),
    ],
)
def test_malformed_uploads_refused_and_slot_freed(server, chunks, needle):
    client, token = _joined(server)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Upload(iter(chunks), metadata=_meta(token))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    client.close()
    # The broken upload freed the party's slot: the same name can join again.
    again, token = _joined(server)
    again.stub.Upload(iter([_chunk(0, [b"x"], last=True)]), metadata=_meta(token))
    again.close()


def test_garbage_messages_are_invalid_argument(server, caplog):
    """Well-formed calls whose protobuf is garbage: INVALID_ARGUMENT, one line."""
    client, token = _joined(server)
    channel = client._channel
    junk = b"\x0a\x80\x80\x80\x80\x10"
    for method, message in (
        ("GetServerEvidence", "GetServerEvidenceRequest"),
        ("GetChallenge", "GetChallengeRequest"),
        ("Join", "JoinRequest"),
    ):
        call = channel.unary_unary(f"/teepsi.v1.Psi/{method}")
        with pytest.raises(grpc.RpcError) as err:
            call(junk, timeout=10)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == f"request is not a valid teepsi.v1.{message} message"
    results = channel.unary_stream("/teepsi.v1.Psi/GetResult")
    with pytest.raises(grpc.RpcError) as err:
        list(results(junk, metadata=_meta(token), timeout=10))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "request is not a valid teepsi.v1.GetResultRequest message"
    # A garbage chunk mid-upload ends the upload and frees the slot.
    upload = channel.stream_unary("/teepsi.v1.Psi/Upload")
    good = _chunk(0, [b"x"]).SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        upload(iter([good, junk]), metadata=_meta(token), timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("upload message 1 is not a valid teepsi.v1.UploadChunk message")
    assert "Traceback" not in caplog.text and "deserializ" not in caplog.text
    client.close()
    again, token = _joined(server)
    again.stub.Upload(iter([_chunk(0, [b"x"], last=True)]), metadata=_meta(token))
    again.close()


def test_oversized_message_refused(server):
    client, token = _joined(server)
    huge = pb.UploadChunk(sequence=0, records=b"x" * (17 * 1024 * 1024), record_count=1, last=True)
    code = _code(lambda: client.stub.Upload(iter([huge]), metadata=_meta(token)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    client.close()


def _signed_join(client: PsiClient, *, job: str, name: str, nonce: bytes, quote_for: str):
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = join_transcript_digest(
        nonce=nonce,
        server_certificate_sha256=client.server_certificate_sha256,
        job_id=job,
        party_name=name,
        party_public_key_sha256=hashlib.sha256(public).digest(),
    )
    quoted = join_transcript_digest(
        nonce=nonce,
        server_certificate_sha256=client.server_certificate_sha256,
        job_id=job,
        party_name=quote_for,
        party_public_key_sha256=hashlib.sha256(public).digest(),
    )
    provider = SimEvidenceProvider(sim_identity(Role.DATA_PROVIDER))
    quote = provider.quote(quoted)
    return pb.JoinRequest(
        job_id=job,
        party_name=name,
        party_count=2,
        nonce=nonce,
        party_public_key=public,
        transcript_signature=key.sign(digest),
        evidence=pb.ClientEvidence(quote=quote, collateral_json=provider.collateral_json(quote)),
    )


def test_join_evidence_must_bind_this_party_and_a_fresh_nonce(server):
    client = PsiClient(_config(server))
    client.connect()
    stub = client.stub
    nonce = stub.GetChallenge(pb.GetChallengeRequest(job_id="j", party_name="a")).nonce
    # Evidence made for another party name does not bind this join.
    request = _signed_join(client, job="j", name="a", nonce=nonce, quote_for="b")
    with pytest.raises(grpc.RpcError) as err:
        stub.Join(request)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "report_data" in err.value.details()
    # The nonce was consumed by that attempt: replaying a good join with it fails.
    request = _signed_join(client, job="j", name="a", nonce=nonce, quote_for="a")
    with pytest.raises(grpc.RpcError) as err:
        stub.Join(request)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "nonce" in err.value.details()
    # A nonce issued for another party is refused.
    nonce = stub.GetChallenge(pb.GetChallengeRequest(job_id="j", party_name="b")).nonce
    request = _signed_join(client, job="j", name="a", nonce=nonce, quote_for="a")
    assert _code(lambda: stub.Join(request)) is grpc.StatusCode.PERMISSION_DENIED
    # A fresh nonce for this party with matching evidence is accepted.
    nonce = stub.GetChallenge(pb.GetChallengeRequest(job_id="j", party_name="a")).nonce
    assert stub.Join(_signed_join(client, job="j", name="a", nonce=nonce, quote_for="a"))
    client.close()


def test_join_without_evidence_refused_when_attestation_required(server):
    client = PsiClient(_config(server))
    client.connect()
    nonce = client.stub.GetChallenge(pb.GetChallengeRequest(job_id="j", party_name="a")).nonce
    request = _signed_join(client, job="j", name="a", nonce=nonce, quote_for="a")
    request.ClearField("evidence")
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Join(request)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "requires data providers to attest" in err.value.details()
    client.close()


def test_bad_transcript_signature_refused(server):
    client = PsiClient(_config(server))
    client.connect()
    nonce = client.stub.GetChallenge(pb.GetChallengeRequest(job_id="j", party_name="a")).nonce
    request = _signed_join(client, job="j", name="a", nonce=nonce, quote_for="a")
    request.transcript_signature = bytes(64)
    assert _code(lambda: client.stub.Join(request)) is grpc.StatusCode.PERMISSION_DENIED
    client.close()


def test_cut_result_stream_can_be_fetched_again(server):
    """A party whose result stream breaks can fetch it again while the job is alive."""
    big = [f"item-{i:07d}".encode() for i in range(600_000)]
    a, token_a = _joined(server, "a")
    b, token_b = _joined(server, "b")
    a.upload(token_a, *_records(big), _NoBar())
    b.upload(token_b, *_records(big[::2]), _NoBar())
    stream = a.stub.GetResult(pb.GetResultRequest(), metadata=_meta(token_a))
    first = next(stream)
    assert not first.last and first.total_records == 300_000
    stream.cancel()
    got = a.result(token_a)
    expected = intersect_records([_records(big[::2])])
    assert np.array_equal(got.hi, expected[0]) and np.array_equal(got.lo, expected[1])
    assert got.distinct == 600_000 and got.status == "RELEASED"
    got_b = b.result(token_b)
    assert got_b.sha256 == got.sha256 and np.array_equal(got_b.hi, got.hi)
    # Both have it: the job is gone, and so is every session of it.
    assert live_jobs(server.registry) == 0
    with pytest.raises(PsiClientError, match="UNAUTHENTICATED"):
        a.result(token_a)
    a.close()
    b.close()


def test_upload_after_job_finished_refused(server):
    a, token_a = _joined(server, "a", parties=1, job="solo")
    a.upload(token_a, *_records([b"x"]), _NoBar())
    a.result(token_a)
    code = _code(
        lambda: a.stub.Upload(iter([_chunk(0, [b"y"], last=True)]), metadata=_meta(token_a))
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    a.close()


def test_python_api_runs_a_party(server):
    import threading

    results = {}

    def party(name: str, items: list[str]) -> None:
        results[name] = run_party_items(_config(server, name, job="api"), items)

    threads = [
        threading.Thread(target=party, args=("a", ["car", "cat", "dog", " car"])),
        threading.Thread(target=party, args=("b", ["cat", "car", "emu"])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["a"].matching_items() == results["b"].matching_items() == ["car", "cat"]
    assert results["a"].result_sha256 == results["b"].result_sha256
    assert results["a"].server.verified.simulated


class _NoBar:
    def advance(self, amount: int) -> None:
        pass


def _spec_join(client: PsiClient, spec, name: str, signing_key, presented_key=None):
    from teepsi.contract.party_keys import public_key_der, sign

    stub = client.stub
    nonce = stub.GetChallenge(pb.GetChallengeRequest(job_id=spec.job_id, party_name=name)).nonce
    public = public_key_der(presented_key or signing_key)
    digest = join_transcript_digest(
        nonce=nonce,
        server_certificate_sha256=client.server_certificate_sha256,
        job_id=spec.job_id,
        party_name=name,
        party_public_key_sha256=hashlib.sha256(public).digest(),
        spec_sha256=spec.digest(),
    )
    provider = SimEvidenceProvider(sim_identity(Role.DATA_PROVIDER))
    quote = provider.quote(digest)
    return stub.Join(
        pb.JoinRequest(
            job_id=spec.job_id,
            party_name=name,
            party_count=len(spec.parties),
            nonce=nonce,
            party_public_key=public,
            transcript_signature=sign(signing_key, digest),
            evidence=pb.ClientEvidence(
                quote=quote, collateral_json=provider.collateral_json(quote)
            ),
            key_scheme=KEY_SCHEME,
            job_spec=spec.canonical_bytes(),
        )
    )


def test_server_authenticates_parties_against_the_spec(server):
    from teepsi.contract.party_keys import generate_private_key, public_key_der
    from teepsi.contract.spec import JobSpec, PartySpec

    alice, bob, mallory = (generate_private_key() for _ in range(3))
    spec = JobSpec(
        job_id="contract",
        parties=(
            PartySpec(name="alice", public_key=public_key_der(alice)),
            PartySpec(name="bob", public_key=public_key_der(bob)),
        ),
        recipients=("alice", "bob"),
    )
    client = PsiClient(_config(server))
    client.connect()
    # Unlisted name.
    with pytest.raises(grpc.RpcError) as err:
        _spec_join(client, spec, "mallory", mallory)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "not listed" in err.value.details()
    # Listed name, someone else's key.
    with pytest.raises(grpc.RpcError) as err:
        _spec_join(client, spec, "bob", mallory)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "not the one its job spec lists" in err.value.details()
    # Listed name and key, but the signature is not by that key.
    with pytest.raises(grpc.RpcError) as err:
        _spec_join(client, spec, "bob", mallory, presented_key=bob)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "signature" in err.value.details()
    # The real bob joins; a second bob is refused.
    assert _spec_join(client, spec, "bob", bob).session_token
    with pytest.raises(grpc.RpcError) as err:
        _spec_join(client, spec, "bob", bob)
    assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS
    client.close()


def _join_signed_with(client: PsiClient, key, *, name: str = "a", signature: bytes | None = None):
    """A quick-mode join whose transcript is signed by ``key`` (any type), with evidence."""
    from teepsi.contract.party_keys import sign

    nonce = client.stub.GetChallenge(pb.GetChallengeRequest(job_id="j", party_name=name)).nonce
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = join_transcript_digest(
        nonce=nonce,
        server_certificate_sha256=client.server_certificate_sha256,
        job_id="j",
        party_name=name,
        party_public_key_sha256=hashlib.sha256(public).digest(),
    )
    if signature is None:
        try:
            signature = sign(key, digest)
        except ValueError:  # a type the contract refuses: sign it the key's own way
            if isinstance(key, rsa.RSAPrivateKey):
                signature = key.sign(digest, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(key, ec.EllipticCurvePrivateKey):
                signature = key.sign(digest, ec.ECDSA(hashes.SHA256()))
            else:
                signature = key.sign(digest)
    provider = SimEvidenceProvider(sim_identity(Role.DATA_PROVIDER))
    quote = provider.quote(digest)
    request = pb.JoinRequest(
        job_id="j",
        party_name=name,
        party_count=2,
        nonce=nonce,
        party_public_key=public,
        transcript_signature=signature,
        evidence=pb.ClientEvidence(quote=quote, collateral_json=provider.collateral_json(quote)),
    )
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Join(request)
    return err.value


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: ec.generate_private_key(ec.SECP256K1()),
        lambda: ed448.Ed448PrivateKey.generate(),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["P-521", "secp256k1", "Ed448", "RSA"],
)
def test_join_refuses_party_keys_the_contract_refuses(server, make_key):
    """The proof of possession uses the contract's key rules: other types and curves fail."""
    client = PsiClient(_config(server))
    client.connect()
    refused = _join_signed_with(client, make_key())
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert "party_public_key" in refused.details()
    client.close()


@pytest.mark.parametrize(
    "make_key",
    [lambda: ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate],
    ids=["P-256", "Ed25519"],
)
def test_join_refuses_a_bad_signature_under_an_accepted_key(server, make_key):
    client = PsiClient(_config(server))
    client.connect()
    other = make_key()
    # Signed by another key of the same type: a well-formed signature that does not verify.
    from teepsi.contract.party_keys import sign

    refused = _join_signed_with(client, make_key(), signature=sign(other, b"x" * 32))
    assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "signature does not verify" in refused.details()
    client.close()


# -- a job that ends ends its calls; a stalled upload is cut -------------------------------


class _JumpingClock:
    """The jobs' clock: real time plus jumps the test makes."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:

        return time.time() + self.offset


def _sorted_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hi = rng.integers(0, 2**64, n, dtype=np.uint64)
    lo = rng.integers(0, 2**64, n, dtype=np.uint64)
    return sorted_unique_records(hi, lo)


def _held_upload(records, sizes: list[int], gate, *, last: bool = True):
    """Upload chunks of ``sizes`` records, then wait for ``gate`` before the rest."""
    hi, lo = records
    start = 0
    for sequence, size in enumerate(sizes):
        if sequence == len(sizes) - 1:
            gate.wait(30)
        end = start + size
        yield pb.UploadChunk(
            sequence=sequence,
            records=records_to_bytes(hi[start:end], lo[start:end]),
            record_count=end - start,
            last=last and sequence == len(sizes) - 1,
        )
        start = end


def _spill_files(server) -> list[Path]:
    return [p for p in server.registry.spill.path.iterdir()]


def _until(condition, what: str, timeout: float = 30.0) -> None:

    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_expiry_ends_in_flight_uploads_and_gives_back_memory_and_spill(tmp_path):
    """Two uploads in flight when their job expires: one holds memory (reserved against
    --memory-budget), the other has spilled. At expiry the server ends both streams
    (DEADLINE_EXCEEDED, one line) while their clients still hold chunks back; the budget
    is back to 0 and the spill area is empty at once, and what the clients send later is
    never taken."""
    import threading

    clock = _JumpingClock()
    running = _start(
        Limits(job_timeout_seconds=600, memory_budget_bytes=64_000, memory_runtime_bytes=0),
        spill_dir=str(tmp_path),
        clock=clock,
    )
    gate = threading.Event()
    try:
        a, token_a = _joined(running, "a")
        b, token_b = _joined(running, "b")
        # a: 2,000 records (32,000 bytes) reserved; b: 2,000 reserved, then 1,000 more spill
        # all of b (the budget is 64,000 bytes).
        calls = [
            a.stub.Upload.future(
                _held_upload(_sorted_records(3_000, 1), [2_000, 1_000], gate),
                metadata=_meta(token_a),
            )
        ]
        _until(lambda: running.registry.budget.held == 32_000, "a's records held")
        calls.append(
            b.stub.Upload.future(
                _held_upload(_sorted_records(4_000, 2), [2_000, 1_000, 1_000], gate),
                metadata=_meta(token_b),
            )
        )
        _until(
            lambda: _spill_files(running) and running.registry.budget.held == 32_000,
            "b's records spilled (its reservation given back)",
        )
        clock.offset += 601
        expire_due(running.registry)
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call.result(timeout=10)  # before the clients send their last chunks
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert err.value.details() == (
                "job j expired: 0 of 2 parties uploaded before its deadline; party a joined "
                "but has not finished uploading; party b joined but has not finished uploading"
            )
        assert not gate.is_set()
        assert running.registry.budget.held == 0
        assert _spill_files(running) == []
        assert live_jobs(running.registry) == 0
        gate.set()  # the clients' held-back chunks go nowhere
        import time

        time.sleep(0.3)
        assert running.registry.budget.held == 0 and _spill_files(running) == []
        a.close()
        b.close()
    finally:
        gate.set()
        running.stop(grace=0)


def test_shutdown_ends_in_flight_upload_with_unavailable(server):
    import threading

    gate = threading.Event()
    client, token = _joined(server, "a")
    call = client.stub.Upload.future(
        _held_upload(_sorted_records(200, 3), [100, 100], gate), metadata=_meta(token)
    )
    try:
        _until(lambda: server.registry.budget.held > 0, "the first chunk held")
        server.registry.close()
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == (
            "server shutting down: job j was dropped; run every party again"
        )
        assert server.registry.budget.held == 0
    finally:
        gate.set()
        client.close()


def test_stalled_upload_is_cut_after_the_idle_timeout():
    """An upload that sends nothing for --upload-idle-timeout is ended by the server
    (DEADLINE_EXCEEDED, saying what to do), its memory given back and its slot freed;
    one that keeps sending, for longer than that in all, is not cut."""
    import threading

    running = _start(Limits(job_timeout_seconds=60, upload_idle_timeout_seconds=0.5))
    gate = threading.Event()
    try:
        client, token = _joined(running, "a", job="stall")
        started = time.monotonic()
        call = client.stub.Upload.future(
            _held_upload(_sorted_records(200, 4), [100, 100], gate), metadata=_meta(token)
        )
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=10)
        assert 0.5 <= time.monotonic() - started < 8
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.details() == (
            "upload of party a to job stall sent nothing for 0.5 s and was ended by the "
            "server; check the client's network and run the party again"
        )
        assert not gate.is_set()
        assert running.registry.budget.held == 0
        # The slot is free: the party can join and upload again.
        again, token = _joined(running, "a", job="stall")
        records = _sorted_records(500, 5)

        def steady():
            for sequence in range(5):
                time.sleep(0.25)  # 1.25 s in all, never 0.5 s without a chunk
                part = slice(sequence * 100, (sequence + 1) * 100)
                yield pb.UploadChunk(
                    sequence=sequence,
                    records=records_to_bytes(records[0][part], records[1][part]),
                    record_count=100,
                    last=sequence == 4,
                )

        summary = again.stub.Upload(steady(), metadata=_meta(token), timeout=20)
        assert summary.records_received == 500
        client.close()
        again.close()
    finally:
        gate.set()
        running.stop(grace=0)


def test_unsorted_or_repeated_upload_refused_in_one_line(server):
    client, token = _joined(server)
    hi, lo = _sorted_records(10, 6)
    payload = records_to_bytes(hi[::-1], lo[::-1])
    chunk = pb.UploadChunk(sequence=0, records=payload, record_count=10, last=True)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Upload(iter([chunk]), metadata=_meta(token))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (
        "chunk 0: records must be sent ascending (as 128-bit numbers) and distinct, across "
        "the whole upload (the teepsi client sends them so)"
    )
    assert server.registry.budget.held == 0
    client.close()


def test_expiry_ends_a_result_stream_in_flight(tmp_path):
    """A result still streaming when its job expires is ended at the next chunk with the
    job's reason (the result is gone with the job), not streamed to the end."""
    clock = _JumpingClock()
    running = _start(Limits(job_timeout_seconds=600), clock=clock)
    try:
        records = _sorted_records(1_500_000, 7)
        a, token_a = _joined(running, "a", parties=1, job="big")
        a.upload(token_a, *records, _NoBar())
        stream = a.stub.GetResult(pb.GetResultRequest(), metadata=_meta(token_a))
        first = next(stream)
        assert not first.last and first.total_records == 1_500_000
        clock.offset += 601
        expire_due(running.registry)
        received = 1
        with pytest.raises(grpc.RpcError) as err:
            for _chunk_message in stream:
                received += 1
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.details() == (
            "job big expired: 1 of 1 parties uploaded before its deadline"
        )
        assert received < 6  # 1.5M records are 6 chunks
        a.close()
    finally:
        running.stop(grace=0)


def test_expiry_ends_a_stalled_result_stream_and_frees_the_result(tmp_path):
    """A reader that stops reading holds the server's handler in gRPC's send. At expiry
    the server still ends that stream at once, and with it the handler's hold on the
    result: nothing of the expired job stays in memory until the reader comes back."""
    import gc
    import weakref

    clock = _JumpingClock()
    running = _start(Limits(job_timeout_seconds=600), clock=clock)
    try:
        a, token_a = _joined(running, "a", parties=1, job="stalled")
        a.upload(token_a, *_sorted_records(1_500_000, 8), _NoBar())
        stream = a.stub.GetResult(pb.GetResultRequest(), metadata=_meta(token_a))
        assert not next(stream).last  # and then the reader stalls
        with running.registry._lock:
            result = weakref.ref(running.registry._jobs[("stalled", b"")].result)
        clock.offset += 601
        expire_due(running.registry)

        def freed() -> bool:
            gc.collect()
            return result() is None

        _until(freed, "the expired job's result to be freed", timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            for _chunk_message in stream:
                pass
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        a.close()
    finally:
        running.stop(grace=0)


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "soon"])
def test_upload_idle_timeout_flag_takes_positive_seconds(bad, capsys):
    """``teepsi server --upload-idle-timeout`` is a usage error (exit 2, one line) unless
    it is a positive, finite number of seconds (default 60)."""
    from teepsi.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["server", "--upload-idle-timeout", bad])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"teepsi server: error: argument --upload-idle-timeout: {bad!r}")
    assert "number of seconds" in lines[-1]
    args = parser.parse_args(["server", "--upload-idle-timeout", "2.5"])
    assert args.upload_idle_timeout == 2.5
    assert parser.parse_args(["server"]).upload_idle_timeout == 60.0


def _not_serving(host: str) -> bool:
    try:
        check_health(host, timeout=5)
    except HealthCheckError as exc:
        return "is NOT_SERVING" in str(exc)
    return False


def test_a_drain_says_not_serving_while_the_work_in_flight_completes():
    """Shutdown turns health NOT_SERVING at once, then keeps working for --drain-seconds
    (load balancers move new parties away meanwhile): a job half-way through finishes,
    its last party still joins, and only then does the server close."""
    running = _start(Limits(job_timeout_seconds=60), drain_seconds=60)
    host = f"127.0.0.1:{running.port}"
    results = {}

    def party(name: str, items: list[str]) -> None:
        results[name] = run_party_items(_config(running, name, job="drain"), items)

    first = threading.Thread(target=party, args=("a", ["car", "cat", "dog"]))
    first.start()
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 0})
    try:
        _until(lambda: live_jobs(running.registry) == 1, "party a's join")
        assert not _not_serving(host)
        stopper.start()
        _until(lambda: _not_serving(host), "health to say NOT_SERVING")
        party("b", ["cat", "emu", "car"])  # joins, uploads and gets its result meanwhile
        first.join(60)
        assert results["a"].matching_items() == results["b"].matching_items() == ["car", "cat"]
        assert stopper.is_alive()  # still draining: the server has not closed
    finally:
        running.cut_drain()  # what a second SIGTERM does
        if stopper.is_alive() or stopper.ident is not None:
            stopper.join(20)
        else:
            running.stop(grace=0)
        first.join(60)
    assert not stopper.is_alive()
