"""uvicorn's httptools protocol with the bounds it lacks.

llhttp puts no limit on a request head (a 60 MiB header block was accepted, buffered
whole) and uvicorn no deadline on receiving one (a client that connects and says
nothing, or trickles a header a byte at a time, kept its connection for ever). Here a
head past ``max_header_bytes`` gets 431 and the connection is closed, and a connection
that has not finished a head within ``header_timeout`` seconds of its first byte (or of
opening) is closed (408 if it had sent part of one).

The deadline costs a normal request no timer: a connection notes when its head began
(one clock read), and one sweeper per server (:class:`HeadSweeper`) looks at the open
connections a few times per timeout. A timer armed and cancelled per request cost more
than the rest of the bounds together. The same sweeper closes a kept-alive connection that
stays idle past uvicorn's keep-alive timeout, which uvicorn does with a timer armed after
every response and cancelled by the next request (1.7 us a request in-process).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

SWEEPS_PER_TIMEOUT = 10  # a late head is cut within 1.1x the timeout
MAX_SWEEP_PERIOD = 1.0


def _response(status: bytes, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)  # fmt: skip


class HeadCork:
    """The transport as one response cycle sees it: the response's head (its first write)
    is held back and goes out with the next write (one ``writev``: one system call and
    one TCP segment instead of two; a system call costs microseconds on a VM). A head
    whose body does not follow in the same loop turn (a stream that waits for its first
    chunk) goes out alone at the end of that turn. Nothing after the head is ever held."""

    __slots__ = ("transport", "loop", "held", "started")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held: bytes | None = None
        self.started = False

    def write(self, data: bytes | memoryview) -> None:
        held = self.held
        if held is not None:
            self.held = None
            self.transport.writelines((held, data))
        elif not self.started:
            self.started = True
            self.held = data  # type: ignore[assignment]  # the head: bytes uvicorn joined
            self.loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HeadSweeper:
    """Closes the connections whose head is overdue, and those idle between requests past the
    keep-alive timeout (the server's ``timeout_keep_alive``, read from the first connection).
    It runs (a timer every ``period`` seconds) only while connections are open, so an idle
    server does not wake up."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.keepalive: float | None = None
        self.period = min(MAX_SWEEP_PERIOD, timeout / SWEEPS_PER_TIMEOUT)
        self.connections: set[Any] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, conn: Any) -> None:
        if self.keepalive is None:
            self.keepalive = conn.timeout_keep_alive
            self.period = min(self.period, self.keepalive / SWEEPS_PER_TIMEOUT)
        self.connections.add(conn)
        if self._timer is None:
            self._timer = conn.loop.call_later(self.period, self._sweep, conn.loop)

    def discard(self, conn: Any) -> None:
        self.connections.discard(conn)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        due, idle_due = now - self.timeout, now - (self.keepalive or 0.0)
        for conn in list(self.connections):
            if conn._head_since is not None and conn._head_since <= due:
                conn._head_overdue()
            elif conn._idle_since is not None and conn._idle_since <= idle_due:
                conn._idle_overdue()
        if self.connections:
            self._timer = loop.call_later(self.period, self._sweep, loop)


def bounded_http_protocol(max_header_bytes: int, header_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)`` (its connections share one sweeper)."""
    too_large = _response(b"431 Request Header Fields Too Large", f"request head exceeds {max_header_bytes} bytes")
    too_slow = _response(b"408 Request Timeout", f"request head not received within {header_timeout:g}s")
    sweeper = HeadSweeper(header_timeout)

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        head_sweeper = sweeper
        _in_head = True  # between requests or inside a head: bytes now belong to a head
        _head_bytes = 0
        _head_since: float | None = None  # loop time the head began (or the connection opened)
        _idle_since: float | None = None  # loop time the last response ended, nothing after it yet

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_since = self.loop.time()
            sweeper.add(self)

        def connection_lost(self, exc: Exception | None) -> None:
            sweeper.discard(self)
            self._head_since = self._idle_since = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._idle_since = None
            if self._in_head:
                if self._head_since is None:
                    self._head_since = self.loop.time()
                seen = self._head_bytes + len(data)
                if seen > max_header_bytes:
                    end = data.find(b"\r\n\r\n")  # the head may end in this read, a body follow
                    if end < 0 or self._head_bytes + end + 4 > max_header_bytes:
                        self._close_with(too_large)
                        return
                self._head_bytes = seen
            super().data_received(data)

        def handle_websocket_upgrade(self) -> None:
            sweeper.discard(self)  # the connection is the WebSocket protocol's from here on
            super().handle_websocket_upgrade()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_since = None
            cycle = self.cycle
            super().on_headers_complete()
            if self.cycle is not cycle:  # a new request (not an upgrade): its own cork
                self.cycle.transport = HeadCork(self.transport, self.loop)  # type: ignore[assignment]

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True
            self._head_bytes = 0

        def on_response_complete(self) -> None:
            """uvicorn's, except that an idle kept-alive connection is left to the sweeper
            instead of a timer armed per response (``timeout_keep_alive_task`` stays None)."""
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self._unset_keepalive_if_required()
            self.flow.resume_reading()
            if self.pipeline:  # pipelined requests: the next one starts
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self._idle_since = self.loop.time()

        def _idle_overdue(self) -> None:
            self._idle_since = None
            if self._in_head and not self._head_bytes and (self.cycle is None or self.cycle.response_complete):
                self._close_with(b"")

        def _head_overdue(self) -> None:
            self._head_since = None
            # Not while a response is still going out (a pipelined head waits for it):
            # its clock starts again with its next bytes.
            if self._in_head and (self.cycle is None or self.cycle.response_complete):
                self._close_with(too_slow if self._head_bytes else b"")

        def _close_with(self, response: bytes) -> None:
            self._head_since = None
            if not self.transport.is_closing():
                if response:
                    self.transport.write(response)
                self.transport.close()

    return BoundedHttpToolsProtocol
