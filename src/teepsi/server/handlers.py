"""The Psi service's method handlers, registered by hand on a grpc.aio server.

Not the generated ``add_PsiServicer_to_server``: requests arrive as raw bytes and are parsed
here, so a well-formed call carrying garbage gets INVALID_ARGUMENT with one line. Upload
chunks are parsed one by one as they arrive; result and progress messages are serialized by
the service (result chunks on its thread pool).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from teepsi.protocol import teepsi_pb2 as pb
from teepsi.server.calls import abort
from teepsi.server.errors import ServiceError
from teepsi.server.metrics import ServerMetrics
from teepsi.server.service import PsiService
from teepsi.server.streams import parse_request

log = logging.getLogger(__name__)

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Psi"].full_name


async def _parsed(
    raw: bytes,
    request_class: type[_Request],
    method: str,
    context: grpc.aio.ServicerContext[bytes, Any],
    metrics: ServerMetrics,
) -> _Request:
    try:
        return parse_request(request_class, raw)
    except ServiceError as exc:
        # One line, no traceback, never the bytes.
        log.warning("refused a %s call: %s", method, exc.message)
        await abort(context, exc, metrics)


def _unary(
    method: Callable[[_Request, grpc.aio.ServicerContext[bytes, _Response]], Awaitable[_Response]],
    request_class: type[_Request],
    metrics: ServerMetrics,
) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, _Response]], Awaitable[_Response]]:
    """A handler that takes the request's raw bytes and parses them itself."""

    async def handler(raw: bytes, context: grpc.aio.ServicerContext[bytes, _Response]) -> _Response:
        request = await _parsed(raw, request_class, method.__name__, context, metrics)
        return await method(request, context)

    return handler


def _server_stream(
    method: Callable[[_Request, grpc.aio.ServicerContext[bytes, bytes]], AsyncIterator[bytes]],
    request_class: type[_Request],
    metrics: ServerMetrics,
) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], AsyncIterator[bytes]]:
    async def handler(
        raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        request = await _parsed(raw, request_class, method.__name__, context, metrics)
        async for response in method(request, context):
            yield response

    return handler


def method_handlers(service: PsiService) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Each method's handler, by method name. Streamed responses are serialized already."""
    metrics = service.metrics
    return {
        "GetServerEvidence": grpc.unary_unary_rpc_method_handler(
            _unary(service.GetServerEvidence, pb.GetServerEvidenceRequest, metrics),
            response_serializer=pb.ServerEvidence.SerializeToString,
        ),
        "GetChallenge": grpc.unary_unary_rpc_method_handler(
            _unary(service.GetChallenge, pb.GetChallengeRequest, metrics),
            response_serializer=pb.Challenge.SerializeToString,
        ),
        "Join": grpc.unary_unary_rpc_method_handler(
            _unary(service.Join, pb.JoinRequest, metrics),
            response_serializer=pb.JoinResponse.SerializeToString,
        ),
        "Upload": grpc.stream_unary_rpc_method_handler(
            service.Upload,
            response_serializer=pb.UploadSummary.SerializeToString,
        ),
        "GetResult": grpc.unary_stream_rpc_method_handler(
            _server_stream(service.GetResult, pb.GetResultRequest, metrics)
        ),
        "WatchProgress": grpc.unary_stream_rpc_method_handler(
            _server_stream(service.WatchProgress, pb.WatchProgressRequest, metrics)
        ),
    }


def add_to_server(service: PsiService, server: grpc.aio.Server) -> None:
    handlers = method_handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
