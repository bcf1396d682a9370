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
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from teepsi.attestation.evidence import Role
from teepsi.attestation.peer import PeerRejected, PeerVerifier
from teepsi.attestation.transcript import join_transcript_digest
from teepsi.engine.spill import SpillError
from teepsi.engine.store import StoreClosed
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.server.calls import JobCall, abort, session_token
from teepsi.server.challenges import ChallengeStore
from teepsi.server.errors import ErrorKind, Refusal, ServiceError
from teepsi.server.evidence import ServerEvidenceBundle
from teepsi.server.job import check_identifier
from teepsi.server.jobs import JobRegistry
from teepsi.server.limits import JobCreator, peer_address
from teepsi.server.metrics import ServerMetrics
from teepsi.server.party_auth import check_possession, party_key_sha256, spec_of_join
from teepsi.server.sessions import JoinOutcome
from teepsi.server.streams import result_chunks, take_chunk

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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

    async def GetServerEvidence(
        self,
        request: pb.GetServerEvidenceRequest,
        context: grpc.aio.ServicerContext[bytes, pb.ServerEvidence],
    ) -> pb.ServerEvidence:
        # Fresh collateral may come from the network (PCCS): off the event loop.
        collateral = await self._blocking(self.evidence.current_collateral)
        return pb.ServerEvidence(
            certificate_der=self.evidence.certificate_der,
            collateral_json=collateral,
            attestation=self.evidence.attestation,
            requires_client_attestation=self.require_client_attestation,
        )

    async def GetChallenge(
        self,
        request: pb.GetChallengeRequest,
        context: grpc.aio.ServicerContext[bytes, pb.Challenge],
    ) -> pb.Challenge:
        try:
            check_identifier(request.job_id, "job id")
            check_identifier(request.party_name, "party name")
        except ServiceError as exc:
            await abort(context, exc, self.metrics)
        nonce = self.challenges.issue(request.job_id, request.party_name)
        return pb.Challenge(nonce=nonce, ttl_seconds=self.challenges.ttl_seconds)

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext[bytes, pb.JoinResponse]
    ) -> pb.JoinResponse:
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
            await abort(context, exc, self.metrics)
        return pb.JoinResponse(
            session_token=outcome.token,
            job_deadline=int(outcome.deadline),
            party_count=outcome.party_count,
            key_seeds=outcome.key_seeds,
        )

    def _join(self, request: pb.JoinRequest, address: str) -> JoinOutcome:
        """Authenticate and attest the joining party, then add it to its job (blocking)."""
        check_identifier(request.job_id, "job id")
        check_identifier(request.party_name, "party name")
        # Cheap and stateless first; the nonce is consumed once the signature verified.
        self.challenges.check(request.nonce, request.job_id, request.party_name)
        spec = spec_of_join(request)
        key_hash = party_key_sha256(request.party_public_key)
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
        check_possession(request.party_public_key, request.transcript_signature, digest)
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
        self,
        raw_chunks: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, pb.UploadSummary],
    ) -> pb.UploadSummary:
        call = JobCall()
        unwatch: Callable[[], None] | None = None
        try:
            token = session_token(context)
            # Watched before it holds anything: the job's end stops this stream at once.
            unwatch = self.registry.watch_call(token, call.end)
            job_id, party, store, limit = self.registry.begin_upload(token)
        except ServiceError as exc:
            if unwatch is not None:
                unwatch()
            await abort(context, exc, self.metrics)
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
                step = self._submit(take_chunk, raw, sequence, finished, store, limit)
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
        await abort(context, error, self.metrics)

    async def GetResult(
        self, request: pb.GetResultRequest, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        call = JobCall()
        unwatch: Callable[[], None] | None = None
        try:
            token = session_token(context)
            unwatch = self.registry.watch_call(token, call.end)
            # Awaited, not blocked on: no thread is held while the job waits for parties.
            # A caller that goes away cancels this coroutine, and with it the wait.
            delivery = await self.registry.wait_result_async(
                token, timeout=context.time_remaining()
            )
        except ServiceError as exc:
            if unwatch is not None:
                unwatch()
            await abort(context, exc, self.metrics)
        # A job that ends while its result streams (expiry, shutdown) ends the stream at
        # once with the job's reason, and with it the handler and its hold on the result.
        call.abort_when_ended(context)
        failed: ServiceError | None = None
        try:
            chunks = result_chunks(delivery)
            while (message := await self._blocking(next, chunks, None)) is not None:
                yield message
        except StoreClosed:
            # The job ended under the stream and dropped its result: its reason ends it.
            await call.end_with_job(context)
            return
        except SpillError as exc:
            log.error("result spill failed: %s", exc)
            failed = ServiceError(ErrorKind.RESOURCE_EXHAUSTED, "server spill area failed")
        finally:
            unwatch()
        if failed is not None:
            await abort(context, failed, self.metrics)
        # Reached only when the client took every chunk; a cut stream can fetch again.
        await self._blocking(self.registry.mark_delivered, token)

    async def WatchProgress(
        self, request: pb.WatchProgressRequest, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        """The caller's job's counts, at once and on each change, while it waits."""
        try:
            token = session_token(context)
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
            await abort(context, exc, self.metrics)
