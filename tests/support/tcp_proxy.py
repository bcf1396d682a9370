"""A small threaded TCP proxy for fault tests: latency, bandwidth, cuts and byte counts.

It listens on 127.0.0.1 (a free port) and forwards every connection to a target port on
127.0.0.1. It can

* delay every forwarded chunk by ``latency`` seconds (a delay line holding up to
  ``window`` bytes, like a TCP window: each byte arrives ``latency`` later) and cap the
  rate at ``bytes_per_second``; a full line blocks the sender, as a slow link does;
* cut every open connection once ``cut_after`` bytes have gone in a direction (``"up"``:
  client to server, ``"down"``: server to client, ``"both"``: either), or on demand
  with :meth:`TcpProxy.cut`; a cut resets the connections (RST, as a crashed peer or a
  broken link looks) and, unless ``refuse_after_cut``, later connections are forwarded;
* count the bytes forwarded each way, and let a test block until a count is reached
  (:meth:`TcpProxy.wait_for_bytes`, a condition wait: nothing polls).

It is bounded: at most ``max_connections`` at once, and it stops by itself after
``lifetime`` seconds. Every thread is a daemon blocked in ``recv``/``accept`` or a
condition wait, so a waiting proxy uses no CPU.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_CHUNK = 64 * 1024
_DIRECTIONS = ("up", "down", "both")


@dataclass
class _Link:
    """One proxied connection: the client's socket and ours to the target."""

    client: socket.socket
    upstream: socket.socket
    closed: bool = False
    threads: list[threading.Thread] = field(default_factory=list)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees the connection break, not end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _end(sock: socket.socket) -> None:
    """Close gracefully: data already sent is still delivered, then FIN."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``target_port``; see the module docstring."""

    def __init__(
        self,
        target_port: int,
        *,
        latency: float = 0.0,
        bytes_per_second: float | None = None,
        cut_after: int | None = None,
        direction: str = "both",
        refuse_after_cut: bool = False,
        window: int = 1024 * 1024,
        lifetime: float = 300.0,
        max_connections: int = 256,
        source_address: str | None = None,
    ) -> None:
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}")
        self.target_port = target_port
        self.latency = latency
        self.bytes_per_second = bytes_per_second
        self.direction = direction
        self.window = window
        self.refuse_after_cut = refuse_after_cut
        self.lifetime = lifetime
        self.max_connections = max_connections
        #: The local address connections to the target come from (another loopback
        #: address, e.g. 127.0.0.2, makes them look like another host's).
        self.source_address = source_address
        self._cond = threading.Condition()
        self._cut_after = cut_after
        self._links: list[_Link] = []
        self._stopped = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.cuts = 0
        self.cut_event = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="proxy-accept", daemon=True
        )
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    # -- control -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._acceptor.start()
        self._timer.start()
        return self

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def arm(self, cut_after: int | None, direction: str | None = None) -> None:
        """(Re)arm the byte trigger: cut once ``cut_after`` more bytes have gone."""
        with self._cond:
            if direction is not None:
                if direction not in _DIRECTIONS:
                    raise ValueError(f"direction must be one of {_DIRECTIONS}")
                self.direction = direction
            self._cut_after = None if cut_after is None else self._counted() + cut_after
            self.cut_event.clear()

    def retarget(self, target_port: int) -> None:
        """Forward new connections to another port (a restarted server)."""
        with self._cond:
            self.target_port = target_port

    def cut(self) -> int:
        """Reset every open connection now; returns how many were cut."""
        with self._cond:
            links, self._links = self._links, []
            self.cuts += 1
            self._cut_after = None
            self.cut_event.set()
            self._cond.notify_all()
        for link in links:
            self._close(link, reset=True)
        return len(links)

    def stop(self) -> None:
        """Stop accepting and reset everything; idempotent, also called at ``lifetime``."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            links, self._links = self._links, []
            self._cond.notify_all()
        self._timer.cancel()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        for link in links:
            self._close(link, reset=True)

    def wait_for_bytes(self, *, up: int = 0, down: int = 0, timeout: float = 30.0) -> bool:
        """Block until at least ``up``/``down`` bytes went through (False on timeout)."""
        give_up = time.monotonic() + timeout
        with self._cond:
            while self.bytes_up < up or self.bytes_down < down:
                remaining = give_up - time.monotonic()
                if remaining <= 0 or self._stopped:
                    return False
                self._cond.wait(remaining)
            return True

    def open_connections(self) -> int:
        with self._cond:
            return len(self._links)

    # -- forwarding ----------------------------------------------------------------

    def _counted(self) -> int:
        if self.direction == "up":
            return self.bytes_up
        if self.direction == "down":
            return self.bytes_down
        return self.bytes_up + self.bytes_down

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed: stopped
            with self._cond:
                refuse = (
                    self._stopped
                    or len(self._links) >= self.max_connections
                    or (self.refuse_after_cut and self.cuts > 0)
                )
                target = self.target_port
            if refuse:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(
                    ("127.0.0.1", target),
                    timeout=10,
                    source_address=None
                    if self.source_address is None
                    else (self.source_address, 0),
                )
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._cond:
                if self._stopped:
                    self._close(link, reset=True)
                    return
                self._links.append(link)
                self.connections += 1
            for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                thread = threading.Thread(
                    target=self._pump, args=(link, src, dst, way), name=f"proxy-{way}", daemon=True
                )
                link.threads.append(thread)
                thread.start()

    def _account(self, link: _Link, way: str, data: bytes) -> tuple[bytes, bool]:
        """Count ``data``; returns the part to forward and whether to cut after it."""
        with self._cond:
            if link.closed:
                return b"", False
            counts = way == self.direction or self.direction == "both"
            if self._cut_after is not None and counts:
                room = self._cut_after - self._counted()
                if room <= len(data):
                    data = data[: max(0, room)]
                    self._add(way, len(data))
                    return data, True
            self._add(way, len(data))
            return data, False

    def _add(self, way: str, n: int) -> None:
        if way == "up":
            self.bytes_up += n
        else:
            self.bytes_down += n
        self._cond.notify_all()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, way: str) -> None:
        line: collections.deque[tuple[float, bytes]] = collections.deque()
        line_cond = threading.Condition()
        reading_done = threading.Event()
        delayed = self.latency > 0 or self.bytes_per_second is not None
        # Backpressure: the delay line holds at most this much, so a throttled sender
        # really is slowed down (its writes block) instead of filling our memory.
        room = max(self.window, int(self.latency * (self.bytes_per_second or 0)))
        queued = [0]

        def writer() -> None:
            # The delay line: each chunk leaves ``latency`` after it arrived.
            while True:
                with line_cond:
                    while not line and not reading_done.is_set():
                        line_cond.wait(5.0)
                    if not line:
                        break
                    due, data = line.popleft()
                    queued[0] -= len(data)
                    line_cond.notify_all()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not self._send(link, dst, data):
                    break
                if self.bytes_per_second:
                    time.sleep(len(data) / self.bytes_per_second)
            self._finish(link)
            with line_cond:
                line_cond.notify_all()  # a reader waiting for room sees the link closed

        if delayed:
            threading.Thread(target=writer, name=f"proxy-{way}-delay", daemon=True).start()
        try:
            while True:
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                data, cut = self._account(link, way, data)
                if link.closed:
                    break
                if delayed:
                    with line_cond:
                        while queued[0] >= room and not link.closed:
                            line_cond.wait(1.0)
                        line.append((time.monotonic() + self.latency, data))
                        queued[0] += len(data)
                        line_cond.notify_all()
                elif data and not self._send(link, dst, data):
                    break
                if cut:
                    if data and delayed:
                        # Let the allowed bytes through the delay line, then cut.
                        time.sleep(self.latency + 0.05)
                    self.cut()
                    break
        finally:
            if delayed:
                with line_cond:
                    reading_done.set()
                    line_cond.notify()
            else:
                self._finish(link)

    def _send(self, link: _Link, dst: socket.socket, data: bytes) -> bool:
        if link.closed:
            return False
        try:
            dst.sendall(data)
        except OSError:
            return False
        return True

    def _finish(self, link: _Link) -> None:
        """One side ended or failed: end the whole connection (both directions)."""
        with self._cond:
            if link in self._links:
                self._links.remove(link)
        self._close(link)

    def _close(self, link: _Link, *, reset: bool = False) -> None:
        with self._cond:
            if link.closed:
                return
            link.closed = True
        for sock in (link.client, link.upstream):
            (_reset if reset else _end)(sock)
