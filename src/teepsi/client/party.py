"""A data provider's run: verify the server, attest, join, upload, fetch the result.

Nothing leaves this process before the server's evidence has been verified and the
gRPC channel pinned to exactly the certificate that carries that evidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import polars as pl
from cryptography.hazmat.primitives.asymmetric import ed25519

from teepsi.attestation.collateral import (
    FRESHNESS_TOLERANCE_SECONDS,
    CachedSource,
    CollateralError,
    CollateralFreshness,
    CollateralSource,
    PccsCertificateError,
    PccsSource,
    StapledSource,
)
from teepsi.attestation.evidence import EvidenceError, EvidenceProvider, Role
from teepsi.attestation.peer import PeerRejected, PeerVerifier, TrustedPeer
from teepsi.attestation.policy import Policy
from teepsi.attestation.providers import make_provider
from teepsi.attestation.ratls import RaTlsError, extract_evidence
from teepsi.attestation.transcript import join_transcript_digest
from teepsi.attestation.verify import SIMULATED_WARNING
from teepsi.client.progress import PhaseBar, Progress, timed
from teepsi.contract.keys import PartyPrivateKey, public_key_der, sign
from teepsi.contract.receipt import ReceiptError, SignedReceipt, check_own_entry, verify_receipt
from teepsi.contract.spec import JobSpec
from teepsi.engine.intersect import sorted_unique_records
from teepsi.engine.keys import Normalization, U64Array, records_from_bytes, seeds_from_bytes
from teepsi.engine.store import RECORDS_PER_CHUNK, iter_record_chunks, mark_last
from teepsi.engine.tables import TEXT_COLUMN, Table, TableSpec, matching_rows, table_from_frame
from teepsi.protocol import SESSION_METADATA, connect
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.protocol import teepsi_pb2_grpc as pb_grpc

#: Re-exported: the client's API and tests name them here; they live in a light module so
#: that `teepsi health` starts fast.
PsiClientError = connect.PsiClientError
split_host = connect.split_host
fetch_server_certificate = connect.fetch_server_certificate
pinned_channel = connect.pinned_channel
RATLS_TARGET_NAME = connect.RATLS_TARGET_NAME
MAX_MESSAGE_BYTES = connect.MAX_MESSAGE_BYTES

#: What this party does about a server whose evidence is simulated: its own flag.
SIMULATED_REMEDY = "pass --allow-simulated to accept simulated evidence (test runs only)"

log = logging.getLogger(__name__)


class _StreamBroken(Exception):
    """The result stream was cut; fetching it again may work."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


#: Pauses before fetching a broken result stream again (three tries in all).
RESULT_RETRY_PAUSES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class PartyConfig:
    host: str
    policy: Policy
    name: str
    party_count: int
    job_id: str = "default"
    #: "sim", "gramine", "tdx" or "none" (run outside a TEE; the server must allow it).
    attestation: str = "sim"
    #: The TEE ``attestation="sim"`` simulates: "sgx" or "tdx".
    sim_tee: str = "sgx"
    allow_simulated: bool = False
    timeout: float = 600.0
    progress: bool = False
    #: The agreed job spec, and this party's key listed in it (contract mode).
    spec: JobSpec | None = None
    party_key: PartyPrivateKey | None = None
    #: Collateral for checking the server's quote: a file's contents, or fetched from a
    #: PCCS; by default the copy the server staples to its evidence (Intel-signed, so
    #: relaying it through the untrusted host is safe).
    server_collateral_json: str | None = None
    pccs_url: str | None = None
    insecure_pccs_tls: bool = False
    #: Fetch the result of an earlier run of this party instead of joining and uploading:
    #: under a spec the party's key re-authenticates it (see ``resume_token`` otherwise).
    resume: bool = False
    #: Quick mode's way back in: the session an earlier run of this party saved.
    resume_token: ResumeToken | None = None
    #: The server platforms' collateral rollback state, kept across runs; None keeps it
    #: in memory for this run only (the CLI passes a file).
    collateral_state: Path | None = None
    #: Evidence provider override (as the server's); default from ``attestation``.
    provider: EvidenceProvider | None = None


class ResumeTokenError(ValueError):
    """A resume file that cannot be read or does not fit this run; one line."""


@dataclass(frozen=True)
class ResumeToken:
    """What a quick-mode party needs to fetch its result again after its client died.

    The session token is a bearer secret for the party's slot: it is only ever sent over
    a channel pinned to the attested server it was issued by, and the file is 0600.
    """

    host: str
    job_id: str
    party_name: str
    session_token: bytes
    key_seeds: tuple[int, int]
    server_certificate_sha256: bytes

    VERSION = 1

    def to_json(self) -> str:
        return json.dumps(
            {
                "teepsi_resume": self.VERSION,
                "host": self.host,
                "job_id": self.job_id,
                "party_name": self.party_name,
                "session_token": self.session_token.hex(),
                "key_seeds": list(self.key_seeds),
                "server_certificate_sha256": self.server_certificate_sha256.hex(),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> ResumeToken:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("teepsi_resume") != cls.VERSION:
                raise ValueError("not a teepsi resume file")
            seeds = data["key_seeds"]
            if not (
                isinstance(seeds, list)
                and len(seeds) == 2
                and all(isinstance(v, int) and 0 <= v < 2**64 for v in seeds)
            ):
                raise ValueError("bad key_seeds")
            return cls(
                host=str(data["host"]),
                job_id=str(data["job_id"]),
                party_name=str(data["party_name"]),
                session_token=bytes.fromhex(data["session_token"]),
                key_seeds=(seeds[0], seeds[1]),
                server_certificate_sha256=bytes.fromhex(data["server_certificate_sha256"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ResumeTokenError(f"{where}: not a valid teepsi resume file ({exc})") from None


#: Called once a quick-mode party's upload is complete: save this to resume.
ResumeSaver = Callable[[ResumeToken], None]


@dataclass(frozen=True)
class PartyResult:
    """What a data provider gets back, with the counts it reports."""

    #: The party's own rows whose key is in the intersection, ordered by key. For text
    #: input a single column "item" of the distinct matching items, sorted bytewise.
    rows: pl.DataFrame
    #: RELEASED, COUNT_ONLY, NOT_RECIPIENT or BELOW_THRESHOLD (the job spec's rules).
    status: str
    #: Size of the intersection (distinct keys); None when below the spec's threshold.
    intersection_size: int | None
    result_sha256: bytes
    rows_read: int
    rows_with_key: int
    distinct_keys: int
    server: TrustedPeer
    job_id: str
    party_name: str
    receipt: SignedReceipt | None = None
    server_certificate_der: bytes = b""
    #: The collateral the server's certificate was verified with (dcap-qvl JSON): saved
    #: with the receipt so it can be verified again offline.
    server_collateral_json: str = ""

    def text(self) -> list[str]:
        """Text input: the intersecting items."""
        return [str(v) for v in self.rows.to_series(0).to_list()]


def _rpc_error(what: str, exc: grpc.RpcError) -> PsiClientError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return PsiClientError(f"{what} failed: {name}: {details}")


def _pccs_hint(exc: Exception) -> str:
    """The command-line switch for a PCCS whose TLS certificate did not verify."""
    return " (or pass --insecure-pccs-tls)" if isinstance(exc, PccsCertificateError) else ""


class PsiClient:
    """One attested connection to a PSI server."""

    def __init__(self, config: PartyConfig) -> None:
        if not isinstance(config.policy, Policy):
            # Fail closed: the verifier would read None as "judge no measurement".
            raise PsiClientError("a policy for the server is required (PartyConfig.policy)")
        self.config = config
        self._deadline = time.monotonic() + config.timeout
        try:
            freshness = CollateralFreshness(
                config.collateral_state, tolerance_seconds=FRESHNESS_TOLERANCE_SECONDS
            )
        except CollateralError as exc:
            raise PsiClientError(f"--collateral-state: {exc}") from None
        self._verifier = PeerVerifier(
            config.policy,
            allow_simulated=config.allow_simulated,
            freshness=freshness,
            simulated_remedy=SIMULATED_REMEDY,
        )
        self._channel: grpc.Channel | None = None
        self.server: TrustedPeer | None = None
        self.server_certificate_sha256 = b""
        self.server_certificate_der = b""
        self.server_collateral_json = ""
        self.requires_client_attestation = True

    def out_of_time(self) -> bool:
        """Whether this client's own --timeout has (all but) run out."""
        return self._deadline - time.monotonic() < 0.5

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise PsiClientError(f"gave up after --timeout {self.config.timeout:g} s")
        return remaining

    @property
    def stub(self) -> Any:
        if self._channel is None:
            raise PsiClientError("not connected")
        return pb_grpc.PsiStub(self._channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def connect(self) -> TrustedPeer:
        """Fetch, verify and pin the server's RA-TLS certificate."""
        der = fetch_server_certificate(self.config.host, min(30.0, self._remaining()))
        self._channel = pinned_channel(self.config.host, der)
        # The pinned channel only reaches the holder of that key; nothing secret is sent
        # until the evidence below is verified.
        try:
            evidence = self.stub.GetServerEvidence(
                pb.GetServerEvidenceRequest(), timeout=min(30.0, self._remaining())
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise PsiClientError(
                    f"{self.config.host} is a gRPC server without the teepsi service "
                    "(teepsi.v1.Psi): not a teepsi server; check --host"
                ) from None
            raise _rpc_error("fetching the server's evidence", exc) from None
        if not hmac.compare_digest(evidence.certificate_der, der):
            raise PsiClientError("server's evidence names another certificate than its TLS one")
        collateral = self._server_collateral(der, evidence.collateral_json or None)
        try:
            peer, extracted = self._verifier.verify_certificate(
                der, collateral, what="server", role=Role.SERVER
            )
        except PeerRejected as exc:
            hint = (
                ""
                if collateral
                else "; fetch it from a PCCS (--pccs-url) or pass a collateral file"
            )
            raise PsiClientError(f"refusing the server: {exc}{hint}") from None
        if peer.verified.simulated:
            log.warning(
                "%s: the server is trusted only because --allow-simulated was given",
                SIMULATED_WARNING,
            )
        log.info("server attested: %s", peer.canonical_line())
        self.server = peer
        self.server_certificate_sha256 = extracted.certificate_sha256
        self.server_certificate_der = der
        self.server_collateral_json = collateral or ""
        self.requires_client_attestation = evidence.requires_client_attestation
        return peer

    def _server_collateral(self, certificate_der: bytes, stapled: str | None) -> str | None:
        """A collateral file's, a PCCS's, or else what the server stapled (maybe none)."""
        cfg = self.config
        if cfg.server_collateral_json is not None:
            return cfg.server_collateral_json
        if cfg.pccs_url is None:
            # Missing collateral is the verifier's to refuse, with its reason.
            return stapled
        try:
            quote = extract_evidence(certificate_der, at=datetime.now(UTC)).quote
            return PccsSource(cfg.pccs_url, verify_tls=not cfg.insecure_pccs_tls).collateral_for(
                quote
            )
        except (RaTlsError, CollateralError) as exc:
            raise PsiClientError(
                f"cannot fetch collateral for the server's quote: {exc}{_pccs_hint(exc)}"
            ) from None

    def _own_collateral(self, provider: EvidenceProvider, quote: bytes) -> str:
        """Collateral for our own quote: the simulator's, or a PCCS's for real hardware."""
        provided = provider.collateral_json(quote)
        source: CollateralSource
        if provided:
            source = StapledSource(provided)
        else:
            source = CachedSource(
                PccsSource(
                    self.config.pccs_url,
                    verify_tls=False if self.config.insecure_pccs_tls else None,
                )
            )
        try:
            return source.collateral_for(quote)
        except CollateralError as exc:
            raise PsiClientError(
                f"cannot fetch collateral for this data provider's quote: {exc} "
                "(set --pccs-url or PCCS_URL in /etc/sgx_default_qcnl.conf)"
                f"{_pccs_hint(exc)}"
            ) from None

    def join(self, key_scheme: str, *, resume: bool = False) -> tuple[bytes, tuple[int, int]]:
        """Answer the server's challenge with our evidence; returns (session token, seeds).

        With ``resume`` (under a job spec) the same proof asks for a new session for this
        party's earlier upload instead of a new slot.
        """
        cfg = self.config
        try:
            challenge = self.stub.GetChallenge(
                pb.GetChallengeRequest(job_id=cfg.job_id, party_name=cfg.name),
                timeout=min(30.0, self._remaining()),
            )
        except grpc.RpcError as exc:
            raise _rpc_error("requesting a challenge", exc) from None
        # Under a job spec the party signs with the key the spec lists for it; in quick
        # mode a fresh key only proves the quote and the join come from one holder.
        key: PartyPrivateKey
        if cfg.spec is not None:
            if cfg.party_key is None:
                raise PsiClientError("a job spec needs this party's private key (--key-file)")
            key = cfg.party_key
        else:
            key = ed25519.Ed25519PrivateKey.generate()
        public_der = public_key_der(key)
        spec_sha256 = cfg.spec.digest() if cfg.spec is not None else b""
        digest = join_transcript_digest(
            nonce=challenge.nonce,
            server_certificate_sha256=self.server_certificate_sha256,
            job_id=cfg.job_id,
            party_name=cfg.name,
            party_public_key_sha256=hashlib.sha256(public_der).digest(),
            spec_sha256=spec_sha256,
        )
        request = pb.JoinRequest(
            job_id=cfg.job_id,
            party_name=cfg.name,
            party_count=cfg.party_count,
            nonce=challenge.nonce,
            party_public_key=public_der,
            transcript_signature=sign(key, digest),
            key_scheme=key_scheme,
            job_spec=cfg.spec.canonical_bytes() if cfg.spec is not None else b"",
            resume=resume,
        )
        if cfg.attestation != "none":
            try:
                provider = cfg.provider or make_provider(
                    cfg.attestation, Role.DATA_PROVIDER, sim_tee=cfg.sim_tee
                )
                quote = provider.quote(digest)
            except (EvidenceError, ValueError) as exc:
                raise PsiClientError(
                    f"cannot produce this data provider's evidence: {exc}"
                ) from None
            request.evidence.quote = quote
            request.evidence.collateral_json = self._own_collateral(provider, quote)
        elif self.requires_client_attestation:
            raise PsiClientError(
                "the server requires data providers to attest; run with --attestation gramine "
                "(or sim in a simulated deployment)"
            )
        try:
            response = self.stub.Join(request, timeout=min(60.0, self._remaining()))
        except grpc.RpcError as exc:
            raise _rpc_error("resuming" if resume else "joining the job", exc) from None
        try:
            seeds = seeds_from_bytes(bytes(response.key_seeds))
        except ValueError:
            raise PsiClientError("server sent malformed key seeds") from None
        return bytes(response.session_token), seeds

    def upload(self, token: bytes, hi: U64Array, lo: U64Array, progress: PhaseBar) -> int:
        """Upload these records, in any order: they are sorted and de-duplicated first, as
        the server takes records only ascending and distinct (a check when they are)."""
        return self.upload_parts(token, [sorted_unique_records(hi, lo)], progress)

    def upload_parts(
        self, token: bytes, parts: Iterable[tuple[U64Array, U64Array]], progress: PhaseBar
    ) -> int:
        """Upload sorted, distinct records, given a part at a time (parts in order, so
        that the whole upload is ascending)."""

        def chunks() -> Iterator[Any]:
            batches = (
                chunk
                for hi, lo in parts
                for chunk in iter_record_chunks(hi, lo, records_per_chunk=RECORDS_PER_CHUNK)
            )
            for sequence, (payload, count, last) in enumerate(mark_last(batches)):
                yield pb.UploadChunk(
                    sequence=sequence, records=payload, record_count=count, last=last
                )
                progress.advance(count)

        metadata = ((SESSION_METADATA, token.hex()),)
        try:
            summary = self.stub.Upload(chunks(), metadata=metadata, timeout=self._remaining())
        except grpc.RpcError as exc:
            raise _rpc_error("uploading the set", exc) from None
        return int(summary.records_received)

    def watch_progress(
        self, token: bytes, on_progress: Callable[[Any], None]
    ) -> Callable[[], None]:
        """Follow the job's counts (``JobProgress`` messages) on a thread while this party
        waits; returns the function that stops following. The server sends a message only
        when something changes: the thread blocks on the stream, it does not poll."""
        call = self.stub.WatchProgress(
            pb.WatchProgressRequest(),
            metadata=((SESSION_METADATA, token.hex()),),
            timeout=self._remaining(),
        )

        def follow() -> None:
            # Ends with the job's wait, a cancel, or an error: the result call reports those.
            with contextlib.suppress(grpc.RpcError):
                for message in call:
                    on_progress(message)

        thread = threading.Thread(target=follow, name="teepsi-progress", daemon=True)
        thread.start()

        def stop() -> None:
            call.cancel()
            thread.join(timeout=5)

        return stop

    def result(self, token: bytes) -> ResultStream:
        """Read the whole result stream: records (if released), status, receipt.

        A stream cut by the network is fetched again (the server keeps the result until
        every party has read it to the end), a few times, within the overall timeout.
        """
        for attempt, pause in enumerate(RESULT_RETRY_PAUSES):
            try:
                payloads, last = self._read_result(token)
                break
            except _StreamBroken as broken:
                if attempt == len(RESULT_RETRY_PAUSES) - 1 or self._remaining() <= pause:
                    raise PsiClientError(f"waiting for the result failed: {broken}") from None
                log.warning("result stream broke off (%s); fetching it again", broken.kind)
                # A bounded, one-off back-off before retrying, not a polling loop.
                time.sleep(pause)
        else:  # pragma: no cover - the loop always breaks or raises
            raise PsiClientError("waiting for the result failed")
        return self._finish_result(payloads, last)

    def _read_result(self, token: bytes) -> tuple[list[bytes], Any]:
        metadata = ((SESSION_METADATA, token.hex()),)
        payloads: list[bytes] = []
        last: Any = None
        try:
            stream = self.stub.GetResult(
                pb.GetResultRequest(), metadata=metadata, timeout=self._remaining()
            )
            for expected, chunk in enumerate(stream):
                if chunk.sequence != expected or last is not None:
                    raise PsiClientError("result stream arrived out of order")
                payloads.append(bytes(chunk.records))
                if chunk.last:
                    # Keep reading to the end of the stream: the server records the
                    # delivery (and may free the job) only once the stream completes.
                    last = chunk
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE and "shutting down" not in str(
                exc.details()
            ):
                raise _StreamBroken("UNAVAILABLE", str(exc.details())) from None
            raise _rpc_error("waiting for the result", exc) from None
        if last is None:
            raise _StreamBroken("the stream ended before its last chunk")
        return payloads, last

    def _finish_result(self, payloads: list[bytes], last: Any) -> ResultStream:
        canonical = b"".join(payloads)  # the records' canonical bytes, as digests hash them
        payloads.clear()
        hi, lo = records_from_bytes(canonical)
        status = pb.ResultStatus.Name(last.status)
        if status == "RELEASED" and (
            last.total_records != len(hi)
            or not hmac.compare_digest(hashlib.sha256(canonical).digest(), last.result_sha256)
        ):
            raise PsiClientError("result stream is incomplete or corrupted (digest mismatch)")
        return ResultStream(
            hi=hi,
            lo=lo,
            canonical=canonical,
            status=status,
            total=int(last.total_records),
            sha256=bytes(last.result_sha256),
            distinct=int(last.party_distinct_records),
            receipt_json=str(last.receipt_json),
            set_salt=bytes(last.set_digest_salt),
            result_salt=bytes(last.result_digest_salt),
        )


@dataclass(frozen=True)
class ResultStream:
    hi: U64Array
    lo: U64Array
    #: The records as received: 16-byte little-endian records, in order.
    canonical: bytes
    status: str
    total: int
    sha256: bytes
    distinct: int
    receipt_json: str
    set_salt: bytes
    result_salt: bytes


def _check_receipt(
    config: PartyConfig, client: PsiClient, got: ResultStream, table: Table
) -> SignedReceipt | None:
    """Verify the server's signature and, under a job spec, our own entry."""
    if not got.receipt_json:
        return None
    try:
        signed = SignedReceipt.from_json(got.receipt_json)
        verify_receipt(signed, client.server_certificate_der)
        receipt = signed.receipt
        if receipt.job_id != config.job_id:
            raise ReceiptError(f"receipt is for job {receipt.job_id!r}")
        server_tee = client.server.verified.tee_type if client.server is not None else None
        if server_tee is not None and receipt.tee != server_tee:
            raise ReceiptError(
                f"receipt says an {receipt.tee} TEE signed it; the server is {server_tee}"
            )
        expected_spec = config.spec.digest() if config.spec is not None else b""
        if receipt.spec_sha256 != expected_spec:
            raise ReceiptError("receipt names another job spec")
        if got.status == "RELEASED" and receipt.output == "intersection":
            salted = hashlib.sha256(got.result_salt)
            salted.update(got.canonical)
            mine = salted.digest()
            if receipt.result_sha256 != mine:
                raise ReceiptError("receipt's result digest differs from the result received")
        if config.spec is not None or config.resume:
            # Under a spec always; on a resume also in quick mode: the result must be the
            # one of the set this run holds (a changed --data would map it to wrong rows).
            items, own = table.own_set(got.set_salt)
            check_own_entry(signed, name=config.name, items=items, set_sha256=own)
    except ReceiptError as exc:
        withheld = (
            f"; the {got.total} result records are withheld (not written)" if len(got.hi) else ""
        )
        raise PsiClientError(
            f"the server's receipt does not check out: {exc}{withheld}: the server does not "
            "vouch for this result"
        ) from None
    return signed


def _resumed_session(config: PartyConfig, client: PsiClient) -> tuple[bytes, tuple[int, int]]:
    """The session of an earlier run of this party: its saved token, or (under a spec) a
    new one the party's key obtains."""
    saved = config.resume_token
    if saved is None:
        if config.spec is None:
            raise PsiClientError("--resume in quick mode needs the run's --resume-file")
        return client.join("", resume=True)
    if (saved.job_id, saved.party_name) != (config.job_id, config.name):
        raise PsiClientError(
            f"the resume file is for party {saved.party_name} of job {saved.job_id}, not "
            f"{config.name} of {config.job_id}"
        )
    if not hmac.compare_digest(saved.server_certificate_sha256, client.server_certificate_sha256):
        raise PsiClientError(
            f"the server at {config.host} restarted since (new certificate): job "
            f"{config.job_id} and its result are gone; run the job again without --resume"
        )
    return saved.session_token, saved.key_seeds


def _wait_for_result(
    client: PsiClient, token: bytes, progress: Progress, party_count: int
) -> ResultStream:
    """The result, with a bar of the job's parties uploaded meanwhile; a wait that fails
    says where the job stood (the counts this party was last sent)."""
    last: list[Any] = []
    with progress.phase("waiting for the other parties", total=party_count) as bar:

        def seen(message: Any) -> None:
            last[:] = [message]
            bar.show(
                message.uploaded,
                message.party_count,
                f"waiting: {message.joined} of {message.party_count} parties joined, "
                f"{message.uploaded} uploaded",
            )

        stop = client.watch_progress(token, seen)
        try:
            return client.result(token)
        except PsiClientError as exc:
            status = last[0].status if last else ""
            # The server explains a job's own end; this party's --timeout only it can.
            if status and client.out_of_time():
                raise PsiClientError(
                    f"{exc} (the job when this party stopped waiting: {status})"
                ) from None
            raise
        finally:
            stop()


def run_party(
    config: PartyConfig, table: Table, *, save_resume: ResumeSaver | None = None
) -> PartyResult:
    """Run one data provider end to end with an already loaded table.

    ``save_resume`` (quick mode) gets the session once the upload is complete, so a
    restarted client can fetch the result with ``PartyConfig.resume_token``.
    """
    if config.party_count < 1:
        raise PsiClientError("--parties must be at least 1")
    if config.spec is not None and table.spec.normalization.describe() != config.spec.normalize:
        raise PsiClientError(
            f"key normalisation {table.spec.normalization.describe()!r} differs from the job "
            f"spec's {config.spec.normalize!r}"
        )
    client = PsiClient(config)
    progress = Progress(enabled=config.progress)
    try:
        server = client.connect()
        if config.resume:
            token, seeds = _resumed_session(config, client)
        else:
            token, seeds = client.join(table.spec.key_scheme)
        with timed("hashing"):
            # On resume too: the receipt's entry for us is checked against these.
            table.hash(seeds)
        if not config.resume:
            with progress.phase("uploading", total=None) as bar:
                client.upload_parts(token, table.distinct_records(), bar)
            # Only now is there something to resume (a broken upload frees the slot).
            if save_resume is not None and config.spec is None:
                save_resume(
                    ResumeToken(
                        host=config.host,
                        job_id=config.job_id,
                        party_name=config.name,
                        session_token=token,
                        key_seeds=seeds,
                        server_certificate_sha256=client.server_certificate_sha256,
                    )
                )
        got = _wait_for_result(client, token, progress, config.party_count)
        with timed("receipt"):
            receipt = _check_receipt(config, client, got, table)
    finally:
        client.close()
    if got.status == "RELEASED":
        with progress.phase("matching rows", total=None):
            rows = matching_rows(table, seeds, got.hi, got.lo)
    else:
        rows = matching_rows(table, seeds, got.hi[:0], got.lo[:0])
    return PartyResult(
        rows=rows,
        status=got.status,
        intersection_size=None if got.status == "BELOW_THRESHOLD" else got.total,
        result_sha256=got.sha256,
        rows_read=table.rows_read,
        rows_with_key=table.rows_with_key,
        distinct_keys=got.distinct,
        server=server,
        job_id=config.job_id,
        party_name=config.name,
        receipt=receipt,
        server_certificate_der=client.server_certificate_der,
        server_collateral_json=client.server_collateral_json,
    )


def run_party_items(
    config: PartyConfig, items: Iterable[str], normalization: Normalization | None = None
) -> PartyResult:
    """Run a party over in-memory text items (one key each)."""
    frame = pl.DataFrame({TEXT_COLUMN: list(items)}, schema={TEXT_COLUMN: pl.String})
    spec = TableSpec(path=Path("<memory>"), normalization=normalization or Normalization())
    with table_from_frame(frame, spec) as table:
        return run_party(config, table)
