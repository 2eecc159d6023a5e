"""uvicorn's httptools protocol with the bounds it lacks.

llhttp puts no limit on a request head (a 60 MiB header block was accepted, buffered
whole) and uvicorn no deadline on receiving one (a client that connects and says
nothing, or trickles a header a byte at a time, kept its connection for ever). Here a
head past ``max_header_bytes`` gets 431 and the connection is closed, and a connection
that has not finished a head within ``header_timeout`` seconds of its first byte (or of
opening) is closed (408 if it had sent part of one). The cost on a normal request is an
addition and a comparison per read.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _response(status: bytes, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)  # fmt: skip


def bounded_http_protocol(max_header_bytes: int, header_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``."""
    too_large = _response(b"431 Request Header Fields Too Large", f"request head exceeds {max_header_bytes} bytes")
    too_slow = _response(b"408 Request Timeout", f"request head not received within {header_timeout:g}s")

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = True  # between requests or inside a head: bytes now belong to a head
        _head_bytes = 0
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)
                seen = self._head_bytes + len(data)
                if seen > max_header_bytes:
                    end = data.find(b"\r\n\r\n")  # the head may end in this read, a body follow
                    if end < 0 or self._head_bytes + end + 4 > max_header_bytes:
                        self._close_with(too_large)
                        return
                self._head_bytes = seen
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._stop_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True
            self._head_bytes = 0

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            # Not while a response is still going out (a pipelined head waits for it).
            if self._in_head and (self.cycle is None or self.cycle.response_complete):
                self._close_with(too_slow if self._head_bytes else b"")

        def _close_with(self, response: bytes) -> None:
            self._stop_head_timer()
            if not self.transport.is_closing():
                if response:
                    self.transport.write(response)
                self.transport.close()

    return BoundedHttpToolsProtocol
