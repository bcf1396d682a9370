"""One attested connection to a PSI server: verify the server, attest, join, upload, follow
the job, fetch the result.

Nothing leaves this process before the server's evidence has been verified and the
gRPC channel pinned to exactly the certificate that carries that evidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import numpy as np
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
from teepsi.client.config import PartyConfig
from teepsi.client.progress import PhaseBar
from teepsi.contract.party_keys import PartyPrivateKey, public_key_der, sign
from teepsi.engine.intersect import records_sha256_per_salt, sorted_unique_records
from teepsi.engine.records import (
    RECORD_BYTES,
    RECORD_DTYPE,
    U64Array,
    seeds_from_bytes,
)
from teepsi.errors import TeepsiError
from teepsi.protocol import SESSION_METADATA
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.protocol import teepsi_pb2_grpc as pb_grpc
from teepsi.protocol.chunks import RECORDS_PER_CHUNK, iter_record_chunks, mark_last
from teepsi.protocol.connect import PsiClientError, fetch_server_certificate, pinned_channel

log = logging.getLogger(__name__)

#: What this party does about a server whose evidence is simulated: its own setting
#: (the CLI names the flag, teepsi.cli.flag_hints).
SIMULATED_REMEDY = "set allow_simulated to accept simulated evidence (test runs only)"


class _StreamBroken(TeepsiError):
    """The result stream was cut; fetching it again may work."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


#: Pauses before fetching a broken result stream again (three tries in all).
RESULT_RETRY_PAUSES = (0.5, 1.0, 2.0)


def _rpc_error(what: str, exc: grpc.RpcError) -> PsiClientError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return PsiClientError(f"{what} failed: {name}: {details}")


def _pccs_hint(exc: Exception) -> str:
    """The command-line switch for a PCCS whose TLS certificate did not verify."""
    return " (or set insecure_pccs_tls)" if isinstance(exc, PccsCertificateError) else ""


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
            raise PsiClientError(f"collateral_state: {exc}") from None
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
        """Whether this client's own timeout has (all but) run out."""
        return self._deadline - time.monotonic() < 0.5

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise PsiClientError(f"gave up after this party's timeout of {self.config.timeout:g} s")
        return remaining

    @property
    def stub(self) -> pb_grpc.PsiStub:
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
                    "(teepsi.v1.Psi): not a teepsi server; check the server address"
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
                "" if collateral else "; fetch it from a PCCS (pccs_url) or pass a collateral file"
            )
            raise PsiClientError(f"refusing the server: {exc}{hint}") from None
        if peer.verified.simulated:
            log.warning(
                "%s: the server is trusted only because allow_simulated was given",
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
                "(set pccs_url or PCCS_URL in /etc/sgx_default_qcnl.conf)"
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
                raise PsiClientError("a job spec needs this party's private key (party_key)")
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
                "the server requires data providers to attest; run with attestation 'gramine' "
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

        def chunks() -> Iterator[pb.UploadChunk]:
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
        self, token: bytes, on_progress: Callable[[pb.JobProgress], None]
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

    def result(self, token: bytes) -> ReceivedResult:
        """Read the whole result stream: records (if released), status, receipt.

        A stream cut by the network is fetched again (the server keeps the result until
        every party has read it to the end), a few times, within the overall timeout.
        """
        for attempt, pause in enumerate(RESULT_RETRY_PAUSES):
            try:
                records, last = self._read_result(token)
                break
            except _StreamBroken as broken:
                if attempt == len(RESULT_RETRY_PAUSES) - 1 or self._remaining() <= pause:
                    raise PsiClientError(f"waiting for the result failed: {broken}") from None
                log.warning("result stream broke off (%s); fetching it again", broken.kind)
                # A bounded, one-off back-off before retrying, not a polling loop.
                time.sleep(pause)
        else:  # pragma: no cover - the loop always breaks or raises
            raise PsiClientError("waiting for the result failed")
        return self._finish_result(records, last)

    def _read_result(self, token: bytes) -> tuple[_Records, pb.ResultChunk]:
        metadata = ((SESSION_METADATA, token.hex()),)
        records: _Records | None = None
        last: pb.ResultChunk | None = None
        try:
            stream = self.stub.GetResult(
                pb.GetResultRequest(), metadata=metadata, timeout=self._remaining()
            )
            for expected, chunk in enumerate(stream):
                if chunk.sequence != expected or last is not None:
                    raise PsiClientError("result stream arrived out of order")
                if records is None:
                    released = chunk.status == pb.ResultStatus.Value("RELEASED")
                    records = _Records(int(chunk.total_records) if released else 0)
                records.take(chunk.records)
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
        if last is None or records is None:
            raise _StreamBroken("the stream ended before its last chunk")
        return records, last

    def _finish_result(self, records: _Records, last: pb.ResultChunk) -> ReceivedResult:
        status = pb.ResultStatus.Name(last.status)
        if status == "RELEASED" and (
            not records.complete
            or last.total_records != len(records.hi)
            or not hmac.compare_digest(records.digest.digest(), last.result_sha256)
        ):
            raise PsiClientError("result stream is incomplete or corrupted (digest mismatch)")
        hi, lo = records.hi, records.lo
        salted = b""
        if last.receipt_json:  # what the receipt names: the digest under the result salt
            salted = records_sha256_per_salt(hi, lo, [bytes(last.result_digest_salt)])[0]
        return ReceivedResult(
            hi=hi,
            lo=lo,
            salted_sha256=salted,
            status=status,
            total=int(last.total_records),
            sha256=bytes(last.result_sha256),
            distinct=int(last.party_distinct_records),
            receipt_json=str(last.receipt_json),
            set_salt=bytes(last.set_digest_salt),
            result_salt=bytes(last.result_digest_salt),
        )


class _Records:
    """A result's records as its chunks arrive: copied into arrays sized by the total the
    stream announces, and digested, a chunk at a time (never every chunk's bytes held)."""

    def __init__(self, total: int) -> None:
        try:
            self.hi = np.empty(total, RECORD_DTYPE)
            self.lo = np.empty(total, RECORD_DTYPE)
        except (MemoryError, ValueError):
            raise PsiClientError(
                f"the result announces {total} records, more than this process can hold"
            ) from None
        self.digest = hashlib.sha256()
        self._count = 0

    @property
    def complete(self) -> bool:
        return self._count == len(self.hi)

    def take(self, payload: bytes) -> None:
        if len(payload) % RECORD_BYTES or self._count + len(payload) // RECORD_BYTES > len(self.hi):
            raise PsiClientError("result stream is corrupted (more or partial records)")
        self.digest.update(payload)
        pairs = np.frombuffer(payload, dtype=RECORD_DTYPE).reshape(-1, 2)
        end = self._count + len(pairs)
        self.hi[self._count : end], self.lo[self._count : end] = pairs[:, 0], pairs[:, 1]
        self._count = end


@dataclass(frozen=True)
class ReceivedResult:
    """The result as the server sent it, checked whole: its records (if released), status,
    counts, receipt and digest salts."""

    hi: U64Array
    lo: U64Array
    #: SHA-256 of the result salt then the records as received (what a receipt names);
    #: empty without a receipt.
    salted_sha256: bytes
    status: str
    total: int
    sha256: bytes
    distinct: int
    receipt_json: str
    set_salt: bytes
    result_salt: bytes
