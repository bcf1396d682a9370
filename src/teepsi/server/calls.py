"""One gRPC call's plumbing: its status on refusal, its session credential, and its end
when its job ends (from whichever thread ends the job)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc

from teepsi.protocol import SESSION_METADATA
from teepsi.server.errors import ErrorKind, ServiceError
from teepsi.server.metrics import ServerMetrics

_T = TypeVar("_T")

#: A call's context, whatever its messages: the plumbing here works on every method.
AnyContext = grpc.aio.ServicerContext[Any, Any]

STATUS = {kind: getattr(grpc.StatusCode, kind.value) for kind in ErrorKind}


async def abort(context: AnyContext, error: ServiceError, metrics: ServerMetrics) -> NoReturn:
    """End the call with the error's status; every refusal passes here and is counted."""
    metrics.refused(error.kind, error.reason)
    await context.abort(STATUS[error.kind], error.message)


class JobCall:
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
        self._abort_context: AnyContext | None = None
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

    def abort_when_ended(self, context: AnyContext) -> None:
        """From now on the job's end aborts the call at once, whatever the handler awaits:
        a result stream whose reader stalls waits in gRPC's send, not in :meth:`race`."""
        self._abort_context = context
        self._abort_if_ended()

    def _abort_if_ended(self) -> None:
        if self.error is not None and self._abort_context is not None and self._abort is None:
            self._abort = self._loop.create_task(self._abort_now(self._abort_context, self.error))

    @staticmethod
    async def _abort_now(context: AnyContext, error: ServiceError) -> None:
        # abort() raises once the status is sent; gRPC then closes the handler.
        with contextlib.suppress(Exception):
            await context.abort(STATUS[error.kind], error.message)

    async def end_with_job(self, context: AnyContext) -> None:
        """End the call now with its job's end (which took what the call was reading):
        through the abort already under way, or one of its own if the job's end has not
        reached this loop yet. The handler then returns; gRPC keeps the abort's status."""
        if self._abort is None:
            error = self.ended_error("its job has ended")
            self._abort = self._loop.create_task(self._abort_now(context, error))
        await self._abort

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


def session_token(context: AnyContext) -> bytes:
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA:
            try:
                return bytes.fromhex(value if isinstance(value, str) else value.decode())
            except ValueError:
                break
    raise ServiceError(
        ErrorKind.UNAUTHENTICATED, f"missing or malformed {SESSION_METADATA} metadata; join first"
    )
