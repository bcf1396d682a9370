"""The server's connection limits take effect: what an outsider holding sockets gets.

Raw sockets, as an attacker would use them: a TCP connection that never starts TLS (slow
loris), a TLS connection that speaks HTTP/2 and then sits idle, and more connections than
``--max-connections``. Each must be closed by the server, not by the test.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.policy import policy_for
from teepsi.client.party import PartyConfig, PsiClient
from teepsi.server.app import start_server
from teepsi.server.config import ServerConfig, grpc_server_options
from teepsi.server.running import RunningServer

POLICY = policy_for(
    [("server", sim_identity(Role.SERVER)), ("provider", sim_identity(Role.DATA_PROVIDER))]
)
#: The HTTP/2 client connection preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.fixture
def server() -> Iterator[RunningServer]:
    running = start_server(
        ServerConfig(
            host="127.0.0.1:0",
            attestation="sim",
            client_policy=POLICY,
            allow_simulated=True,
            max_connections=3,
            connection_idle_seconds=1.0,
            handshake_timeout_seconds=1.0,
        )
    )
    yield running
    running.stop(grace=0)


def _tcp(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _h2(server: RunningServer) -> ssl.SSLSocket:
    """A TLS connection that has sent the HTTP/2 preface: a connection gRPC serves."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(_tcp(server))
    tls.sendall(H2_PREFACE)
    return tls


def _closed_by_server_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), None if it stayed open."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except (ConnectionResetError, ssl.SSLError, OSError):
            return time.monotonic() - started
    return None


def test_options_reach_grpc():
    options = dict(grpc_server_options(ServerConfig(max_connections=7)))
    assert options["grpc.max_allowed_incoming_connections"] == 7
    assert options["grpc.max_connection_idle_ms"] == 30_000
    assert options["grpc.server_handshake_timeout_ms"] == 10_000


def test_a_connection_that_never_handshakes_is_closed(server):
    """Slow loris: TCP open, no TLS. Before: held for gRPC's default of 120 s."""
    with _tcp(server) as sock:
        assert _closed_by_server_within(sock, 8) is not None


def test_an_idle_connection_is_closed(server):
    """TLS and HTTP/2 done, then silence. Before: held forever (one fd each)."""
    with _h2(server) as tls:
        waited = _closed_by_server_within(tls, 8)
        assert waited is not None and waited >= 0.5


def test_connections_beyond_the_limit_are_refused_and_honest_ones_get_in_later(server):
    held = [_h2(server) for _ in range(3)]
    try:
        time.sleep(0.3)
        # A 4th connection is dropped at once, well before any idle timeout.
        with _tcp(server) as extra:
            waited = _closed_by_server_within(extra, 0.9)
            assert waited is not None and waited < 0.9
    finally:
        for sock in held:
            sock.close()
    # Once the held connections are gone an honest party is served.
    time.sleep(0.3)
    client = PsiClient(
        PartyConfig(
            host=f"127.0.0.1:{server.port}",
            policy=POLICY,
            name="a",
            party_count=2,
            job_id="j",
            attestation="sim",
            allow_simulated=True,
            timeout=10,
        )
    )
    try:
        assert client.connect().verified.simulated
    finally:
        client.close()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-connections", "0"),
        ("--max-jobs-per-party", "0"),
        ("--max-jobs-per-address", "-1"),
        ("--join-timeout", "0"),
        ("--join-timeout", "soon"),
        ("--connection-idle-timeout", "-1"),
        ("--handshake-timeout", "inf"),
    ],
)
def test_bad_limit_flags_are_usage_errors(flag, value, capsys):
    from teepsi.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["server", "--attestation", "sim", "--no-client-attestation", flag, value])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


def test_more_connections_than_file_descriptors_is_refused_at_start(capsys):
    from teepsi.cli import main

    code = main(
        [
            "server",
            "--attestation",
            "sim",
            "--no-client-attestation",
            "--host",
            "127.0.0.1:0",
            "--max-connections",
            "100000000",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "lower --max-connections" in error[0], error


def test_a_party_idle_between_its_calls_reconnects_and_completes(server):
    """An honest party that hashes a large set between Join and Upload may stay idle
    longer than --connection-idle-timeout: the server closes the connection, the
    client's channel opens a new one for the next call, and the session still holds."""
    from tests.integration.test_service import KEY_SCHEME, _NoBar, _records

    clients = []
    for name in ("a", "b"):
        client = PsiClient(
            PartyConfig(
                host=f"127.0.0.1:{server.port}",
                policy=POLICY,
                name=name,
                party_count=2,
                job_id="slow-hash",
                attestation="sim",
                allow_simulated=True,
                timeout=30,
            )
        )
        client.connect()
        token, _seeds = client.join(KEY_SCHEME)
        clients.append((client, token))
    time.sleep(2.5)  # idle timeout is 1 s: both connections are closed meanwhile
    for (client, token), items in zip(clients, ([b"x", b"y"], [b"y", b"z"]), strict=True):
        client.upload(token, *_records(items), _NoBar())
    results = [client.result(token) for client, token in clients]
    assert all(r.status == "RELEASED" and len(r.hi) == 1 for r in results)
    for client, _ in clients:
        client.close()


@pytest.mark.parametrize(
    ("peer", "charged"),
    [
        ("ipv4:10.1.2.3:50000", "ipv4:10.1.2.3"),
        ("ipv4:10.1.2.3:50001", "ipv4:10.1.2.3"),  # another connection, same host
        # A host holds its whole /64: fresh IPv6 addresses are not fresh quotas.
        ("ipv6:[2001:db8:1:2::1]:443", "ipv6:2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:ffff::9]:443", "ipv6:2001:db8:1:2::/64"),
        ("ipv6:[::ffff:10.1.2.3]:50000", "ipv4:10.1.2.3"),  # dual-stack listener
        ("ipv6:[fe80::1%eth0]:1", "ipv6:fe80::/64"),
        ("unix:/run/teepsi.sock", "unix:/run/teepsi.sock"),
    ],
)
def test_quota_address_of_a_peer(peer, charged):
    from teepsi.server.limits import peer_address

    assert peer_address(peer) == charged


def _server_settings(tls: ssl.SSLSocket) -> dict[int, int]:
    """The parameters of the server's first HTTP/2 SETTINGS frame (RFC 9113 §6.5)."""
    tls.settimeout(5)
    data = b""
    while True:
        while len(data) < 9:
            data += tls.recv(65536)
        length, kind, flags = int.from_bytes(data[:3], "big"), data[3], data[4]
        while len(data) < 9 + length:
            data += tls.recv(65536)
        payload, data = data[9 : 9 + length], data[9 + length :]
        if kind == 4 and not flags & 1:  # SETTINGS, not an ACK
            return {
                int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6])
                for i in range(0, length, 6)
            }


def test_streams_per_connection_are_capped(server):
    """One connection cannot carry more than 8 calls at once (SETTINGS_MAX_CONCURRENT_STREAMS,
    id 3). Before: gRPC's default, no limit."""
    with _h2(server) as tls:
        assert _server_settings(tls).get(3) == 8
