"""Passing a REST request on to another server (a worker's Unix socket, another pod's
port) and its answer back as it comes: a stream's chunks are relayed as the upstream
writes them, never gathered first, and a client that goes away closes the upstream
connection, so the server generating for it sees the disconnect and stops.

A small HTTP/1.1 client with kept-alive connections: the bodies it sends are whole
(the front has read and bounded them), the bodies it reads are Content-Length or
chunked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
Headers = list[tuple[bytes, bytes]]

# Marks a repository load/unload that one worker replays on the others (server/worker_copies.py).
# Only ever added after the filter below: a client's own copy of it is dropped on the way.
SYNC_HEADER = b"x-meshserve-copy-sync"
HOP = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"te", b"upgrade",
    b"proxy-connection", b"date", b"server", SYNC_HEADER,
})  # fmt: skip
READ_SIZE = 64 * 1024


class UpstreamResponse:
    """One answer whose head is in; ``chunks()`` reads its body as it arrives."""

    def __init__(self, pool: HttpPool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                 headers: Headers, length: int | None, chunked: bool, close: bool) -> None:  # fmt: skip
        self._pool = pool
        self._reader = reader
        self._writer = writer
        self.status = status
        self.headers = headers
        self.length = length
        self._chunked = chunked
        self._close = close
        self._done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        reader = self._reader
        try:
            if self._chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    data = await reader.readexactly(size)
                    await reader.readexactly(2)
                    yield data
            else:
                left = self.length or 0
                while left > 0:
                    data = await reader.read(min(left, READ_SIZE))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    yield data
            self._done = True
        finally:
            self.release()

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def release(self) -> None:
        """Back to the pool when the body was read whole; closed otherwise (an abandoned
        stream: closing is how the upstream learns that nobody listens any more)."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        if self._done and not self._close:
            self._pool._idle.append((self._reader, writer))
        else:
            writer.close()


class HttpPool:
    """Kept-alive HTTP/1.1 connections to one server."""

    def __init__(self, connect: Connect, host: bytes = b"meshserve") -> None:
        self._connect = connect
        self._host = host
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(
        self, method: bytes, target: bytes, headers: Headers, body: bytes, extra: Headers = ()
    ) -> UpstreamResponse:
        """Send the request and read the answer's head (the body is left to read).
        ``extra``: headers of this server's own, added after the hop-by-hop filter."""
        head = [method, b" ", target, b" HTTP/1.1\r\nhost: ", self._host, b"\r\n"]
        for k, v in headers:
            if k not in HOP:
                head += [k, b": ", v, b"\r\n"]
        for k, v in extra:
            head += [k, b": ", v, b"\r\n"]
        head += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n"]
        request = b"".join(head) + body
        while True:
            pooled = bool(self._idle)
            reader, writer = self._idle.pop() if pooled else await self._connect()
            try:
                writer.write(request)
                status_head = await reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                writer.close()
                # A kept-alive connection the server closed meanwhile: the request never
                # got in (nothing came back), so it is safe to send again on a new one.
                if pooled and (not isinstance(e, asyncio.IncompleteReadError) or not e.partial):
                    continue
                if isinstance(e, asyncio.IncompleteReadError):
                    raise ConnectionResetError("the server closed the connection before answering") from None
                raise
            except BaseException:
                writer.close()
                raise
            break
        lines = status_head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        out: Headers = []
        length = None
        chunked = close = False
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            k, v = k.strip().lower(), v.strip()
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding":
                chunked = b"chunked" in v.lower()
            elif k == b"connection":
                close = v.lower() == b"close"
            if k not in HOP:
                out.append((k, v))
        return UpstreamResponse(self, reader, writer, status, out, length, chunked, close)

    async def request(
        self, method: bytes, target: bytes, headers: Headers, body: bytes, extra: Headers = ()
    ) -> tuple[int, Headers, bytes]:
        """The whole answer (small ones: metrics, indexes, health)."""
        response = await self.open(method, target, headers, body, extra)
        return response.status, response.headers, await response.read()

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def relay(
    response: UpstreamResponse, send: Callable[[dict[str, Any]], Awaitable[None]],
    receive: Callable[[], Awaitable[dict[str, Any]]], extra: Headers = (),
) -> None:  # fmt: skip
    """Send ``response`` to the ASGI client chunk by chunk; if the client disconnects
    first, drop the upstream connection (which cancels the work behind it)."""
    headers = [*response.headers, *extra]
    if response.length is not None:
        headers.append((b"content-length", str(response.length).encode()))

    async def pump() -> None:
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        async for chunk in response.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    body = asyncio.ensure_future(pump())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((body, watch), return_when=asyncio.FIRST_COMPLETED)
        if body.done():
            body.result()
    finally:
        for t in (body, watch):
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(body, watch, return_exceptions=True)
        response.release()


def unix_connect(path: str) -> Connect:
    return lambda: asyncio.open_unix_connection(path)


def tcp_connect(address: str, timeout: float) -> Connect:
    """``host:port`` (``[v6]:port``) with a connect timeout (an unreachable pod fails fast)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)

    return connect
