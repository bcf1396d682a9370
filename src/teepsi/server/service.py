"""The gRPC service: translates requests into job operations and errors into status codes.

It runs on a grpc.aio server: a party waiting for its result is a suspended coroutine, not a
thread, so waiting parties are bounded by the job limits, not by threads. Anything that
takes CPU or may block (quote and signature checks, decoding and storing upload chunks,
spilling, the intersection, signing the receipt, building result chunks) runs on the
service's bounded thread pool (``--max-workers``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from teepsi.attestation.collateral import CollateralError
from teepsi.attestation.evidence import Role
from teepsi.attestation.peer import PeerRejected, PeerVerifier
from teepsi.attestation.transcript import join_transcript_digest
from teepsi.contract.keys import PartyKeyError, canonical_public_key_der
from teepsi.contract.keys import verify as verify_party_signature
from teepsi.contract.spec import JobSpec, SpecError
from teepsi.engine.keys import RECORD_BYTES
from teepsi.engine.spill import SpillError
from teepsi.engine.store import (
    RECORDS_PER_CHUNK,
    RecordOrderError,
    RecordStore,
    StoreClosed,
    iter_record_chunks,
    mark_last,
)
from teepsi.protocol import SESSION_METADATA
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.server.challenges import ChallengeStore
from teepsi.server.errors import ErrorKind, Refusal, ServiceError
from teepsi.server.jobs import (
    Delivery,
    JobCreator,
    JobRegistry,
    JoinOutcome,
    ReleaseStatus,
    check_identifier,
)
from teepsi.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_STATUS = {kind: getattr(grpc.StatusCode, kind.value) for kind in ErrorKind}
_RESULT_STATUS = {
    ReleaseStatus.RELEASED: pb.RELEASED,
    ReleaseStatus.COUNT_ONLY: pb.COUNT_ONLY,
    ReleaseStatus.NOT_RECIPIENT: pb.NOT_RECIPIENT,
    ReleaseStatus.BELOW_THRESHOLD: pb.BELOW_THRESHOLD,
}
_EMPTY = np.empty(0, dtype=np.uint64)


@dataclass(frozen=True)
class ServerEvidenceBundle:
    certificate_der: bytes
    collateral_json: str
    attestation: str
    certificate_sha256: bytes
    #: Fresh collateral for the server's own quote (refetched as it ages); None = fixed.
    collateral_source: Callable[[], str] | None = None

    def current_collateral(self) -> str:
        if self.collateral_source is None:
            return self.collateral_json
        try:
            return self.collateral_source()
        except CollateralError as exc:
            log.warning("no collateral to staple to the server certificate: %s", exc)
            return ""


async def _abort(
    context: grpc.aio.ServicerContext, error: ServiceError, metrics: ServerMetrics
) -> NoReturn:
    """End the call with the error's status; every refusal passes here and is counted."""
    metrics.refused(error.kind, error.reason)
    await context.abort(_STATUS[error.kind], error.message)
    raise AssertionError("unreachable")  # context.abort raises


class _JobCall:
    """One in-flight call of a job, ended (with the job's reason) when the job ends.

    The registry tells it from whatever thread ends the job; every await of the call goes
    through :meth:`race`, so the call stops at once instead of feeding a job that is gone.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[None] = self._loop.create_future()
        #: Set before the job's stores are closed, so a step that finds its store closed
        #: can say why.
        self.error: ServiceError | None = None
        self._abort_context: grpc.aio.ServicerContext | None = None
        self._abort: asyncio.Task[None] | None = None

    def end(self, error: ServiceError) -> None:
        """The job ended (any thread; must not block: the registry is locked)."""
        self.error = error
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._mark_ended)

    def _mark_ended(self) -> None:
        if not self._ended.done():
            self._ended.set_result(None)
        self._abort_if_ended()

    def abort_when_ended(self, context: grpc.aio.ServicerContext) -> None:
        """From now on the job's end aborts the call at once, whatever the handler awaits:
        a result stream whose reader stalls waits in gRPC's send, not in :meth:`race`."""
        self._abort_context = context
        self._abort_if_ended()

    def _abort_if_ended(self) -> None:
        if self.error is not None and self._abort_context is not None and self._abort is None:
            self._abort = self._loop.create_task(self._abort_now(self._abort_context, self.error))

    @staticmethod
    async def _abort_now(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
        # abort() raises once the status is sent; gRPC then closes the handler.
        with contextlib.suppress(Exception):
            await context.abort(_STATUS[error.kind], error.message)

    def ended_error(self, fallback: str) -> ServiceError:
        return self.error or ServiceError(ErrorKind.CANCELLED, fallback)

    async def race(
        self,
        awaitable: Awaitable[_T],
        *,
        timeout: float | None = None,
        on_timeout: ServiceError | None = None,
    ) -> _T:
        """``awaitable``'s result, unless the job ends first (raises why) or nothing
        comes within ``timeout`` (raises ``on_timeout``); the loser is cancelled."""
        task = asyncio.ensure_future(awaitable)
        if self.error is not None:
            task.cancel()  # never started: nothing of it runs
            raise self.error
        contenders: set[asyncio.Future[Any]] = {task, self._ended}
        try:
            done, _ = await asyncio.wait(
                contenders, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not task.done():
                task.cancel()
        if task in done:
            return task.result()
        if self.error is not None:
            raise self.error
        assert on_timeout is not None
        raise on_timeout


def _session_token(context: grpc.aio.ServicerContext) -> bytes:
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA:
            try:
                return bytes.fromhex(value if isinstance(value, str) else value.decode())
            except ValueError:
                break
    raise ServiceError(
        ErrorKind.UNAUTHENTICATED, f"missing or malformed {SESSION_METADATA} metadata; join first"
    )


def peer_address(peer: str) -> str:
    """What a job quota is charged to, from a gRPC peer (``ipv4:1.2.3.4:5678``,
    ``ipv6:[2001:db8::1]:5678``): the host without its port, which changes with every
    connection. An IPv6 host is its /64 (one subscriber usually holds all of it); an
    IPv4-mapped IPv6 address (a dual-stack listener) is the IPv4 address."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer  # unix sockets and the like: the whole peer
    host = rest.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ipv4:{address.ipv4_mapped}"
        return f"ipv6:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ipv4:{address}"


def _party_key_sha256(public_key_der: bytes) -> bytes:
    """SHA-256 of the party's key, once the contract's key rules accept it."""
    try:
        canonical = canonical_public_key_der(public_key_der)
    except PartyKeyError as exc:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, f"party_public_key: {exc}") from None
    if canonical != public_key_der:
        # The transcript hashes the bytes sent, the spec compares canonical ones: one form.
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT, "party_public_key is not canonical SubjectPublicKeyInfo DER"
        )
    return hashlib.sha256(public_key_der).digest()


def _check_possession(public_key_der: bytes, signature: bytes, message: bytes) -> None:
    """The party signs the transcript digest: proof it holds the key its quote binds.

    The contract's one key verification (its key types, curves and signature scheme).
    """
    try:
        valid = verify_party_signature(public_key_der, signature, message)
    except PartyKeyError as exc:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, f"party_public_key: {exc}") from None
    if not valid:
        raise ServiceError(ErrorKind.PERMISSION_DENIED, "join transcript signature does not verify")


class PsiService:
    def __init__(
        self,
        *,
        registry: JobRegistry,
        evidence: ServerEvidenceBundle,
        client_verifier: PeerVerifier | None,
        require_client_attestation: bool = True,
        challenges: ChallengeStore | None = None,
        executor: concurrent.futures.Executor | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics or registry.metrics
        self.evidence = evidence
        self.client_verifier = client_verifier
        self.require_client_attestation = require_client_attestation
        self.challenges = challenges or ChallengeStore()
        #: Where blocking work runs (bounded: ``--max-workers`` threads).
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(
            thread_name_prefix="teepsi-work"
        )

    def _submit(self, fn: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        return self.executor.submit(fn, *args)

    async def _blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the thread pool; the event loop keeps serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(fn, *args)
        )

    # Each handler turns ServiceError into a status (one line); anything else is a bug,
    # which gRPC reports as UNKNOWN.

    async def GetServerEvidence(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Fresh collateral may come from the network (PCCS): off the event loop.
        collateral = await self._blocking(self.evidence.current_collateral)
        return pb.ServerEvidence(
            certificate_der=self.evidence.certificate_der,
            collateral_json=collateral,
            attestation=self.evidence.attestation,
            requires_client_attestation=self.require_client_attestation,
        )

    async def GetChallenge(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            check_identifier(request.job_id, "job id")
            check_identifier(request.party_name, "party name")
        except ServiceError as exc:
            await _abort(context, exc, self.metrics)
        nonce = self.challenges.issue(request.job_id, request.party_name)
        return pb.Challenge(nonce=nonce, ttl_seconds=self.challenges.ttl_seconds)

    def _job_spec(self, request: Any) -> JobSpec | None:
        """The spec a join carries, checked against the party: listed, with that key."""
        if not request.job_spec:
            return None
        try:
            spec = JobSpec.from_canonical(request.job_spec)
        except SpecError as exc:
            raise ServiceError(ErrorKind.INVALID_ARGUMENT, str(exc)) from None
        if spec.job_id != request.job_id:
            raise ServiceError(
                ErrorKind.INVALID_ARGUMENT,
                f"job id {request.job_id!r} is not the spec's job id {spec.job_id!r}",
                Refusal.SPEC_MISMATCH,
            )
        listed = spec.party(request.party_name)
        if listed is None:
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED,
                f"party {request.party_name!r} is not listed in job {spec.job_id}'s spec",
            )
        if not hmac.compare_digest(listed.public_key, request.party_public_key):
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED,
                f"the key presented for party {request.party_name!r} is not the one its job "
                "spec lists (use that party's --key-file)",
            )
        if request.party_count != len(spec.parties):
            raise ServiceError(
                ErrorKind.INVALID_ARGUMENT,
                f"job {spec.job_id}'s spec lists {len(spec.parties)} parties, "
                f"not {request.party_count}",
                Refusal.SPEC_MISMATCH,
            )
        return spec

    async def Join(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            # Quote verification and signature checks take CPU (and may fetch collateral).
            outcome = await self._blocking(self._join, request, peer_address(context.peer()))
        except ServiceError as exc:
            log.warning(
                "job %s: join of %s refused: %s",
                request.job_id[:128],
                request.party_name[:64],
                exc.message,
            )
            await _abort(context, exc, self.metrics)
        return pb.JoinResponse(
            session_token=outcome.token,
            job_deadline=int(outcome.deadline),
            party_count=outcome.party_count,
            key_seeds=outcome.key_seeds,
        )

    def _join(self, request: Any, address: str) -> JoinOutcome:
        """Authenticate and attest the joining party, then add it to its job (blocking)."""
        check_identifier(request.job_id, "job id")
        check_identifier(request.party_name, "party name")
        # Cheap and stateless first; the nonce is consumed once the signature verified.
        self.challenges.check(request.nonce, request.job_id, request.party_name)
        spec = self._job_spec(request)
        key_hash = _party_key_sha256(request.party_public_key)
        digest = join_transcript_digest(
            nonce=request.nonce,
            server_certificate_sha256=self.evidence.certificate_sha256,
            job_id=request.job_id,
            party_name=request.party_name,
            party_public_key_sha256=key_hash,
            spec_sha256=spec.digest() if spec is not None else b"",
        )
        # With a spec this is the party's listed key: a listed party cannot be
        # impersonated without its private key.
        _check_possession(request.party_public_key, request.transcript_signature, digest)
        self.challenges.redeem(request.nonce, request.job_id, request.party_name)
        listed = spec.party(request.party_name) if spec is not None else None
        must_attest = self.require_client_attestation or (listed is not None and listed.attest)
        attested = False
        if must_attest:
            if not request.HasField("evidence") or not request.evidence.quote:
                raise ServiceError(
                    ErrorKind.PERMISSION_DENIED,
                    "this job requires data providers to attest; run the client in an "
                    "enclave (--attestation gramine or sim)",
                )
            if self.client_verifier is None:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    "the job spec requires this party to attest, but the server has no "
                    "policy for data providers (start it with --config)",
                )
            try:
                with self.metrics.timed_attestation():
                    peer = self.client_verifier.verify_bound_quote(
                        request.evidence.quote,
                        request.evidence.collateral_json,
                        digest,
                        what=f"data provider {request.party_name}",
                        role=Role.DATA_PROVIDER,
                    )
            except PeerRejected as exc:
                log.warning("refused data provider %s: %s", request.party_name, exc)
                raise ServiceError(
                    ErrorKind.PERMISSION_DENIED, str(exc), Refusal(exc.by.value)
                ) from None
            attested = True
            log.info("data provider %s attested: %s", request.party_name, peer.canonical_line())
        else:
            log.warning(
                "data provider %s joined WITHOUT attestation (the server runs with "
                "--no-client-attestation%s)",
                request.party_name,
                " and the job spec does not require it" if spec is not None else "",
            )
        if spec is None:
            log.warning(
                "job %s runs WITHOUT a job spec: parties are not authenticated; anyone "
                "who passes attestation can fill a slot",
                request.job_id,
            )
        if request.resume:
            if spec is None:
                raise ServiceError(
                    ErrorKind.INVALID_ARGUMENT,
                    "resume by join needs a job spec (the party's key proves it is the same "
                    "party); in quick mode resume with the saved --resume-file",
                )
            return self.registry.resume(request.job_id, request.party_name, spec=spec)
        return self.registry.join(
            request.job_id,
            request.party_name,
            request.party_count,
            request.key_scheme,
            spec=spec,
            attested=attested,
            creator=JobCreator(key_sha256=key_hash, address=address),
        )

    async def Upload(
        self, raw_chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> Any:
        call = _JobCall()
        unwatch: Callable[[], None] | None = None
        try:
            token = _session_token(context)
            # Watched before it holds anything: the job's end stops this stream at once.
            unwatch = self.registry.watch_call(token, call.end)
            job_id, party, store, limit = self.registry.begin_upload(token)
        except ServiceError as exc:
            if unwatch is not None:
                unwatch()
            await _abort(context, exc, self.metrics)
        idle = self.registry.limits.upload_idle_timeout_seconds
        stalled = ServiceError(
            ErrorKind.DEADLINE_EXCEEDED,
            f"upload of party {party} to job {job_id} sent nothing for {idle:g} s and was "
            "ended by the server; check the client's network and run the party again",
        )
        completed = False
        #: The upload's one blocking step in flight (a chunk, or the final computation).
        step: concurrent.futures.Future[Any] | None = None
        chunks = aiter(raw_chunks)
        try:
            finished = False
            sequence = 0
            while (
                raw := await call.race(anext(chunks, None), timeout=idle, on_timeout=stalled)
            ) is not None:
                self.metrics.upload_bytes.inc(len(raw))
                step = self._submit(_take_chunk, raw, sequence, finished, store, limit)
                finished = await call.race(asyncio.wrap_future(step))
                sequence += 1
            if not finished:
                raise ServiceError(
                    ErrorKind.INVALID_ARGUMENT, "upload ended without its last chunk"
                )
            received = store.records
            step = self._submit(self.registry.finish_upload, token)
            await call.race(asyncio.wrap_future(step))
            completed = True
            self.metrics.uploads.inc()
            return pb.UploadSummary(records_received=received)
        except StoreClosed:
            # The job ended under a running step (and took the store with it).
            error = call.ended_error(f"job {job_id} has ended")
        except SpillError as exc:
            log.error("job %s: spill failed: %s", job_id, exc)
            error = ServiceError(ErrorKind.RESOURCE_EXHAUSTED, "server spill area failed")
        except ServiceError as exc:
            log.warning("job %s: upload of %s refused: %s", job_id, party, exc.message)
            error = exc
        finally:
            unwatch()
            if not completed:
                # Before the caller hears the status: what the upload held is given back.
                # A cancelled call may leave its step running on the pool: the store is
                # closed only after it (a RecordStore has one user at a time).
                if step is None or step.done():
                    self.registry.abort_upload(token)
                else:
                    step.add_done_callback(lambda _: self.registry.abort_upload(token))
        await _abort(context, error, self.metrics)

    async def GetResult(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        call = _JobCall()
        unwatch: Callable[[], None] | None = None
        try:
            token = _session_token(context)
            unwatch = self.registry.watch_call(token, call.end)
            # Awaited, not blocked on: no thread is held while the job waits for parties.
            # A caller that goes away cancels this coroutine, and with it the wait.
            delivery = await self.registry.wait_result_async(
                token, timeout=context.time_remaining()
            )
        except ServiceError as exc:
            if unwatch is not None:
                unwatch()
            await _abort(context, exc, self.metrics)
        # A job that ends while its result streams (expiry, shutdown) ends the stream at
        # once with the job's reason, and with it the handler and its hold on the result.
        call.abort_when_ended(context)
        try:
            chunks = _result_chunks(delivery)
            while (message := await self._blocking(next, chunks, None)) is not None:
                yield message
        finally:
            unwatch()
        # Reached only when the client took every chunk; a cut stream can fetch again.
        await self._blocking(self.registry.mark_delivered, token)

    async def WatchProgress(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """The caller's job's counts, at once and on each change, while it waits."""
        try:
            token = _session_token(context)
            seen = None
            while True:
                view = await self.registry.next_progress_async(
                    token, seen, timeout=context.time_remaining()
                )
                if view is None:
                    return
                yield pb.JobProgress(
                    party_count=view.party_count,
                    joined=view.joined,
                    uploaded=view.uploaded,
                    waiting=view.waiting,
                    status=view.status,
                ).SerializeToString()
                if not view.waiting:
                    return
                seen = view
        except ServiceError as exc:
            await _abort(context, exc, self.metrics)


def _result_chunks(delivery: Delivery) -> Iterator[bytes]:
    """One party's result as serialized ResultChunks, built one at a time."""
    result, status = delivery.result, delivery.status
    # Release rules, enforced here: records only when released; the size only when
    # the threshold was met.
    hi, lo = (result.hi, result.lo) if status is ReleaseStatus.RELEASED else (_EMPTY, _EMPTY)
    total = 0 if status is ReleaseStatus.BELOW_THRESHOLD else len(result)
    released = status is ReleaseStatus.RELEASED
    chunks = iter_record_chunks(hi, lo, records_per_chunk=RECORDS_PER_CHUNK)
    for sequence, (payload, count, last) in enumerate(mark_last(chunks)):
        yield pb.ResultChunk(
            sequence=sequence,
            records=payload,
            record_count=count,
            total_records=total,
            result_sha256=result.sha256 if last and released else b"",
            last=last,
            party_distinct_records=delivery.distinct_records,
            status=_RESULT_STATUS[status],
            receipt_json=result.receipt_json if last else "",
            set_digest_salt=delivery.set_salt if last else b"",
            result_digest_salt=delivery.result_salt if last and released else b"",
        ).SerializeToString()


def _take_chunk(raw: bytes, sequence: int, finished: bool, store: RecordStore, limit: int) -> bool:
    """Parse, check, decode and store one upload chunk (blocking); True if it was the last."""
    try:
        chunk = pb.UploadChunk.FromString(raw)
    except DecodeError:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"upload message {sequence} is not a valid {pb.UploadChunk.DESCRIPTOR.full_name} "
            "message",
        ) from None
    if finished:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, "chunk after the last chunk")
    if chunk.sequence != sequence:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"chunk {chunk.sequence} arrived out of order (expected {sequence}); "
            "chunks must be sent once each, in order",
        )
    records = _decode_upload(chunk.records, chunk.record_count, chunk.sequence)
    if store.records + len(records) // RECORD_BYTES > limit:
        raise ServiceError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"more than {limit} items in one party's upload (the limit of this "
            "job: its spec's max_items_per_party or the server's --max-items)",
        )
    try:
        store.add_records(records)
    except RecordOrderError as exc:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"chunk {chunk.sequence}: {exc} (the teepsi client sends them so)",
        ) from None
    return bool(chunk.last)


def _parse(message_class: Any, raw: bytes) -> Any:
    """A request message from its bytes; garbage is INVALID_ARGUMENT, not gRPC's INTERNAL."""
    try:
        return message_class.FromString(raw)
    except DecodeError:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"request is not a valid {message_class.DESCRIPTOR.full_name} message",
        ) from None


def _unary(
    method: Callable[[Any, grpc.aio.ServicerContext], Any],
    request_class: Any,
    metrics: ServerMetrics,
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    """A handler that takes the request's raw bytes and parses them itself."""

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        request = await _parsed(raw, request_class, method.__name__, context, metrics)
        return await method(request, context)

    return handler


def _server_stream(
    method: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    request_class: Any,
    metrics: ServerMetrics,
) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        request = await _parsed(raw, request_class, method.__name__, context, metrics)
        async for response in method(request, context):
            yield response

    return handler


async def _parsed(
    raw: bytes,
    request_class: Any,
    method: str,
    context: grpc.aio.ServicerContext,
    metrics: ServerMetrics,
) -> Any:
    try:
        return _parse(request_class, raw)
    except ServiceError as exc:
        # One line, no traceback, never the bytes.
        log.warning("refused a %s call: %s", method, exc.message)
        await _abort(context, exc, metrics)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Psi"].full_name


def method_handlers(service: PsiService) -> dict[str, grpc.RpcMethodHandler]:
    """The service's handlers, registered by hand (not with the generated
    ``add_PsiServicer_to_server``): requests arrive as raw bytes and are parsed here, so a
    well-formed call carrying garbage gets INVALID_ARGUMENT with one line (finding F4).
    Upload chunks are parsed one by one as they arrive; result chunks are serialized on
    the thread pool."""
    return {
        "GetServerEvidence": grpc.unary_unary_rpc_method_handler(
            _unary(service.GetServerEvidence, pb.GetServerEvidenceRequest, service.metrics),
            response_serializer=pb.ServerEvidence.SerializeToString,
        ),
        "GetChallenge": grpc.unary_unary_rpc_method_handler(
            _unary(service.GetChallenge, pb.GetChallengeRequest, service.metrics),
            response_serializer=pb.Challenge.SerializeToString,
        ),
        "Join": grpc.unary_unary_rpc_method_handler(
            _unary(service.Join, pb.JoinRequest, service.metrics),
            response_serializer=pb.JoinResponse.SerializeToString,
        ),
        "Upload": grpc.stream_unary_rpc_method_handler(
            service.Upload,
            response_serializer=pb.UploadSummary.SerializeToString,
        ),
        "GetResult": grpc.unary_stream_rpc_method_handler(
            _server_stream(service.GetResult, pb.GetResultRequest, service.metrics)
        ),
        "WatchProgress": grpc.unary_stream_rpc_method_handler(
            _server_stream(service.WatchProgress, pb.WatchProgressRequest, service.metrics)
        ),
    }


def add_to_server(service: PsiService, server: grpc.aio.Server) -> None:
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _decode_upload(payload: bytes, count: int, sequence: int) -> bytes:
    """The chunk's records, checked to be ``count`` whole records (kept as bytes: the
    store takes them in their wire layout, without a copy)."""
    if len(payload) != count * RECORD_BYTES:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"chunk {sequence} announces {count} records but carries {len(payload)} bytes "
            f"(records are {RECORD_BYTES} bytes)",
        )
    return payload
