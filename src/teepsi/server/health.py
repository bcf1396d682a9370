"""The standard gRPC health service (grpc.health.v1) and server reflection, on the
server's RA-TLS port, from the grpcio-health-checking and grpcio-reflection packages.

Health says SERVING for the whole server ("") and for ``teepsi.v1.Psi`` once the port is
bound, and NOT_SERVING as soon as shutdown starts, before the grace period: load balancers
and watchers stop sending parties here while the running calls finish.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from teepsi.errors import TeepsiError
from teepsi.protocol.connect import PsiClientError, fetch_server_certificate, pinned_channel

#: The service names health answers for ("" is the server as a whole).
OVERALL = health.OVERALL_HEALTH
_CHECK_METHOD = f"/{health.SERVICE_NAME}/Check"


class ServerHealth:
    """Health and reflection of one server (their calls run on its event loop)."""

    def __init__(self, service_names: tuple[str, ...]) -> None:
        self._names = service_names
        self._servicer = health_aio.HealthServicer()

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        listed = (*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(listed, server)

    async def serving(self) -> None:
        for name in (OVERALL, *self._names):
            await self._servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        """Every name NOT_SERVING, and it stays so (later ``set`` calls are ignored)."""
        await self._servicer.enter_graceful_shutdown()


class HealthCheckError(TeepsiError):
    """The server could not be asked, or does not answer SERVING; one line."""


def check_health(host: str, *, service: str = OVERALL, timeout: float = 10.0) -> str:
    """Ask the server at ``host`` for its health over its own certificate, pinned.

    Returns the status name (``SERVING``); anything else raises. Not a trust decision:
    this asks whether the process serves, not whether its enclave is the one a policy
    accepts (parties verify that before they send anything)."""
    try:
        der = fetch_server_certificate(host, timeout)
    except PsiClientError as exc:
        raise HealthCheckError(str(exc)) from None
    channel = pinned_channel(host, der)
    try:
        # The method itself, not HealthStub: its type stubs declare no methods.
        check = channel.unary_unary(
            _CHECK_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        reply = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        what = f"service {service!r}" if service else "the server"
        raise HealthCheckError(
            f"health of {what} at {host}: {exc.code().name}: {exc.details()}"
        ) from None
    finally:
        channel.close()
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise HealthCheckError(f"{host}: {service or 'server'} is {status}")
    return status
