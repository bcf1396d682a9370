"""A data provider's run: verify the server, attest, join, upload, fetch the result.

Nothing leaves this process before the server's evidence has been verified and the
gRPC channel pinned to exactly the certificate that carries that evidence.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from teepsi.attestation.evidence import EvidenceError, Role
from teepsi.attestation.peer import PeerRejected, PeerVerifier, TrustedPeer
from teepsi.attestation.policy import Policy
from teepsi.attestation.providers import make_provider
from teepsi.attestation.transcript import join_transcript_digest
from teepsi.attestation.verify import SIMULATED_WARNING
from teepsi.client.progress import PhaseBar, Progress
from teepsi.engine.items import CHUNK_BYTES, decode_batch, encode_batches, mark_last, read_items
from teepsi.protocol import SESSION_METADATA
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.protocol import teepsi_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: The subject CN of RA-TLS certificates; gRPC checks the name against it.
RATLS_TARGET_NAME = "RATLS"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class PsiClientError(Exception):
    """The run failed; the message is one line saying what happened and what to do."""


@dataclass(frozen=True)
class PartyConfig:
    host: str
    policy: Policy
    name: str
    party_count: int
    job_id: str = "default"
    #: "sim", "gramine" or "none" (run outside an enclave; the server must allow it).
    attestation: str = "sim"
    allow_simulated: bool = False
    timeout: float = 600.0
    progress: bool = False


@dataclass(frozen=True)
class PartyResult:
    items: list[bytes]
    result_sha256: bytes
    items_uploaded: int
    server: TrustedPeer
    job_id: str
    party_name: str

    def text(self) -> list[str]:
        return [item.decode("utf-8") for item in self.items]


def split_host(host: str) -> tuple[str, int]:
    name, sep, port = host.rpartition(":")
    if not sep or not port.isdigit() or not name:
        raise PsiClientError(f"--host {host!r}: expected HOST:PORT, for example localhost:50051")
    return name.strip("[]"), int(port)


def fetch_server_certificate(host: str, timeout: float) -> bytes:
    """The DER certificate the server presents; unverified here, checked by the caller."""
    address = split_host(host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Not a trust decision: the certificate is judged by its evidence, then pinned.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(address, timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=RATLS_TARGET_NAME) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise PsiClientError(f"cannot reach the server at {host}: {exc}; is it running?") from None
    if not der:
        raise PsiClientError(f"server at {host} presented no certificate")
    return der


def _rpc_error(what: str, exc: grpc.RpcError) -> PsiClientError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return PsiClientError(f"{what} failed: {name}: {details}")


class PsiClient:
    """One attested connection to a PSI server."""

    def __init__(self, config: PartyConfig) -> None:
        self.config = config
        self._deadline = time.monotonic() + config.timeout
        self._verifier = PeerVerifier(config.policy, allow_simulated=config.allow_simulated)
        self._channel: grpc.Channel | None = None
        self.server: TrustedPeer | None = None
        self.server_certificate_sha256 = b""
        self.requires_client_attestation = True

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
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        credentials = grpc.ssl_channel_credentials(root_certificates=pem)
        self._channel = grpc.secure_channel(
            self.config.host,
            credentials,
            options=[
                ("grpc.ssl_target_name_override", RATLS_TARGET_NAME),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        # The pinned channel only reaches the holder of that key; nothing secret is sent
        # until the evidence below is verified.
        try:
            evidence = self.stub.GetServerEvidence(
                pb.GetServerEvidenceRequest(), timeout=min(30.0, self._remaining())
            )
        except grpc.RpcError as exc:
            raise _rpc_error("fetching the server's evidence", exc) from None
        if not hmac.compare_digest(evidence.certificate_der, der):
            raise PsiClientError("server's evidence names another certificate than its TLS one")
        try:
            peer, extracted = self._verifier.verify_certificate(
                der, evidence.collateral_json or None, what="server", role=Role.SERVER
            )
        except PeerRejected as exc:
            raise PsiClientError(f"refusing the server: {exc}") from None
        if peer.verified.simulated:
            log.warning(
                "%s: the server is trusted only because --allow-simulated was given",
                SIMULATED_WARNING,
            )
        log.info("server attested: %s", peer.describe())
        self.server = peer
        self.server_certificate_sha256 = extracted.certificate_sha256
        self.requires_client_attestation = evidence.requires_client_attestation
        return peer

    def join(self) -> bytes:
        """Answer the server's challenge with our evidence; returns the session token."""
        cfg = self.config
        try:
            challenge = self.stub.GetChallenge(
                pb.GetChallengeRequest(job_id=cfg.job_id, party_name=cfg.name),
                timeout=min(30.0, self._remaining()),
            )
        except grpc.RpcError as exc:
            raise _rpc_error("requesting a challenge", exc) from None
        key = ed25519.Ed25519PrivateKey.generate()
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = join_transcript_digest(
            nonce=challenge.nonce,
            server_certificate_sha256=self.server_certificate_sha256,
            job_id=cfg.job_id,
            party_name=cfg.name,
            party_public_key_sha256=hashlib.sha256(public_der).digest(),
        )
        request = pb.JoinRequest(
            job_id=cfg.job_id,
            party_name=cfg.name,
            party_count=cfg.party_count,
            nonce=challenge.nonce,
            party_public_key=public_der,
            transcript_signature=key.sign(digest),
        )
        if cfg.attestation != "none":
            try:
                provider = make_provider(cfg.attestation, Role.DATA_PROVIDER)
                quote = provider.quote(digest)
            except (EvidenceError, ValueError) as exc:
                raise PsiClientError(
                    f"cannot produce this data provider's evidence: {exc}"
                ) from None
            request.evidence.quote = quote
            request.evidence.collateral_json = provider.collateral_json(quote) or ""
        elif self.requires_client_attestation:
            raise PsiClientError(
                "the server requires data providers to attest; run with --attestation gramine "
                "(or sim in a simulated deployment)"
            )
        try:
            response = self.stub.Join(request, timeout=min(60.0, self._remaining()))
        except grpc.RpcError as exc:
            raise _rpc_error("joining the job", exc) from None
        return bytes(response.session_token)

    def upload(self, token: bytes, items: set[bytes], progress: PhaseBar) -> int:
        ordered = sorted(items)

        def chunks() -> Iterator[Any]:
            batches = mark_last(encode_batches(ordered, chunk_bytes=CHUNK_BYTES))
            for sequence, (payload, count, last) in enumerate(batches):
                yield pb.UploadChunk(sequence=sequence, items=payload, item_count=count, last=last)
                progress.advance(count)

        metadata = ((SESSION_METADATA, token.hex()),)
        try:
            summary = self.stub.Upload(chunks(), metadata=metadata, timeout=self._remaining())
        except grpc.RpcError as exc:
            raise _rpc_error("uploading the set", exc) from None
        return int(summary.items_received)

    def result(self, token: bytes) -> tuple[list[bytes], bytes]:
        metadata = ((SESSION_METADATA, token.hex()),)
        items: list[bytes] = []
        digest = b""
        expected_sequence = 0
        total = -1
        try:
            for chunk in self.stub.GetResult(
                pb.GetResultRequest(), metadata=metadata, timeout=self._remaining()
            ):
                if chunk.sequence != expected_sequence or digest:
                    raise PsiClientError("result stream arrived out of order")
                expected_sequence += 1
                items.extend(decode_batch(chunk.items, chunk.item_count))
                total = chunk.total_items
                if chunk.last:
                    # Keep reading to the end of the stream: the server records the
                    # delivery (and may free the job) only once the stream completes.
                    digest = bytes(chunk.result_sha256)
        except grpc.RpcError as exc:
            raise _rpc_error("waiting for the result", exc) from None
        check = hashlib.sha256()
        for item in items:
            check.update(item + b"\n")
        if total != len(items) or not hmac.compare_digest(check.digest(), digest):
            raise PsiClientError("result stream is incomplete or corrupted (digest mismatch)")
        return items, digest


def run_party(config: PartyConfig, items: set[bytes]) -> PartyResult:
    """Run one data provider end to end and return the intersection."""
    if config.party_count < 1:
        raise PsiClientError("--parties must be at least 1")
    client = PsiClient(config)
    progress = Progress(enabled=config.progress)
    try:
        server = client.connect()
        token = client.join()
        with progress.phase("uploading", total=len(items)) as bar:
            uploaded = client.upload(token, items, bar)
        with progress.phase("waiting for the other parties", total=None):
            result, digest = client.result(token)
    finally:
        client.close()
    return PartyResult(
        items=result,
        result_sha256=digest,
        items_uploaded=uploaded,
        server=server,
        job_id=config.job_id,
        party_name=config.name,
    )


def run_party_from_file(config: PartyConfig, data: str | Path) -> PartyResult:
    """Read a text file (one item per line) and run the party with its items."""
    return run_party(config, read_items(data))
