"""Reaching a teepsi server: its RA-TLS certificate fetched, then pinned in a gRPC channel.

Light on purpose (no polars, no numpy): ``teepsi health``, a container's health probe,
starts in a fraction of the client's time. The client (:mod:`teepsi.client.party`) uses the
same functions.
"""

from __future__ import annotations

import socket
import ssl

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teepsi.errors import TeepsiError
from teepsi.protocol import MAX_MESSAGE_BYTES

#: The subject CN of RA-TLS certificates; gRPC checks the name against it.
RATLS_TARGET_NAME = "RATLS"


class PsiClientError(TeepsiError):
    """The run failed; the message is one line saying what happened and what to do."""


def split_host(host: str) -> tuple[str, int]:
    name, sep, port = host.rpartition(":")
    if not sep or not port.isdigit() or not name:
        raise PsiClientError(
            f"the server address {host!r}: expected HOST:PORT, for example localhost:50051"
        )
    return name.strip("[]"), int(port)


def fetch_server_certificate(host: str, timeout: float) -> bytes:
    """The DER certificate the server presents; unverified here, checked by the caller."""
    address = split_host(host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Not a trust decision: the certificate is judged by its evidence, then pinned.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    # Each step that fails says what the port is instead: nothing, not TLS, not gRPC.
    check = "check the server address, or that a teepsi server runs there"
    try:
        raw = socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        raise PsiClientError(
            f"nothing listens at {host} (connection refused): start the teepsi server, or "
            "check the port in the server address"
        ) from None
    except OSError as exc:
        raise PsiClientError(f"cannot reach {host}: {exc.strerror or exc}; {check}") from None
    try:
        with raw, context.wrap_socket(raw, server_hostname=RATLS_TARGET_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
            protocol = tls.selected_alpn_protocol()
    except TimeoutError:
        raise PsiClientError(
            f"{host} accepted the connection but sent no TLS handshake within {timeout:g} s: "
            f"not a teepsi server; {check}"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise PsiClientError(
            f"{host} does not speak TLS ({reason}): not a teepsi server; {check}"
        ) from None
    if protocol != "h2":
        raise PsiClientError(
            f"{host} is a TLS server without HTTP/2 (gRPC): not a teepsi server; {check}"
        )
    if not der:
        raise PsiClientError(f"server at {host} presented no certificate")
    return der


def pinned_channel(host: str, certificate_der: bytes) -> grpc.Channel:
    """A channel to ``host`` that trusts only this certificate (the server's RA-TLS one)."""
    pem = x509.load_der_x509_certificate(certificate_der).public_bytes(serialization.Encoding.PEM)
    return grpc.secure_channel(
        host,
        grpc.ssl_channel_credentials(root_certificates=pem),
        options=[
            ("grpc.ssl_target_name_override", RATLS_TARGET_NAME),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
