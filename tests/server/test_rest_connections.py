"""The bounded uvicorn protocol (server/rest/connections.py): a response's head goes out
with its body in one write, a head whose body is late is not held back, and one sweeper
enforces the head deadline and the keep-alive timeout for every connection. And the front's body deadline
(server/rest/front.py BodyReceive), timed only when a receive has to wait."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvicorn
from meshserve.protocol.errors import BodyTimeout
from meshserve.server.rest.connections import HeadCork, bounded_http_protocol
from meshserve.server.rest.front import BodyReceive
from meshserve.server.security import Deadlines

BIG = bytes(range(256)) * 1024  # a 256 KiB tensor, sent as a memoryview as the front does


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    if scope["path"] == "/parts":
        length = str(5 + len(BIG)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]})
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        await send({"type": "http.response.body", "body": memoryview(BIG)})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    if scope["path"] == "/late":
        await asyncio.sleep(0.5)
    await send({"type": "http.response.body", "body": b"hello"})


async def _serve(
    header_timeout: float = 10.0, http: Any = None, keepalive: float = 5.0
) -> tuple[uvicorn.Server, asyncio.Task, int]:
    http = http or bounded_http_protocol(65536, header_timeout)
    config = uvicorn.Config(
        _app, host="127.0.0.1", port=0, http=http, lifespan="off", log_config=None, timeout_keep_alive=keepalive
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


async def _stop(server: uvicorn.Server, task: asyncio.Task) -> None:
    server.should_exit = True
    await asyncio.wait_for(task, 10)


class _Writes(asyncio.Transport):
    """Which writes reach the transport, and grouped how (a socket shows no seams)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bytes, ...]] = []

    def write(self, data: Any) -> None:
        self.calls.append((bytes(data),))

    def writelines(self, parts: Any) -> None:
        self.calls.append(tuple(bytes(p) for p in parts))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.calls.append(("closed",))  # type: ignore[arg-type]


def test_the_cork_sends_a_head_with_its_body_and_never_holds_a_body():
    async def go() -> list[tuple[bytes, ...]]:
        t = _Writes()
        loop = asyncio.get_running_loop()
        cork = HeadCork(t, loop)
        cork.write(b"HTTP/1.1 200 OK\r\n\r\n")
        cork.write(b"body")  # one call for both
        cork.write(memoryview(b"more"))  # after the head nothing is held
        cork.write(b"HTTP/1.1 looks like a head")  # a body, whatever it holds
        late = HeadCork(t, loop)  # the next response, whose body is late
        late.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await asyncio.sleep(0)  # no body this turn: the head goes alone
        await asyncio.sleep(0)
        closing = HeadCork(t, loop)
        closing.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        closing.close()  # a held head is written before the close
        return t.calls

    assert asyncio.run(go()) == [
        (b"HTTP/1.1 200 OK\r\n\r\n", b"body"), (b"more",), (b"HTTP/1.1 looks like a head",),
        (b"HTTP/1.1 200 OK\r\n\r\n",), (b"HTTP/1.1 204 No Content\r\n\r\n",), ("closed",),
    ]  # fmt: skip


def test_head_and_body_leave_together_and_a_late_body_does_not_hold_the_head():
    async def go() -> tuple[bytes, bytes, float, bytes]:
        server, task, port = await _serve()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /now HTTP/1.1\r\nhost: x\r\n\r\n")
            first = await asyncio.wait_for(reader.read(65536), 5)
            t = time.monotonic()
            writer.write(b"GET /late HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            head_after = time.monotonic() - t
            body = await asyncio.wait_for(reader.readexactly(5), 5)
            writer.write(b"GET /parts HTTP/1.1\r\nhost: x\r\n\r\n")  # a body in parts, the last a big view
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            parts = await asyncio.wait_for(reader.readexactly(5 + len(BIG)), 5)
            writer.close()
            assert parts == b"hello" + BIG
            return first, head, head_after, body
        finally:
            await _stop(server, task)

    first, head, head_after, body = asyncio.run(go())
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"\r\n\r\nhello"), first
    assert head.startswith(b"HTTP/1.1 200") and head_after < 0.4, head_after  # before the body's 0.5 s
    assert body == b"hello"


def test_one_sweeper_cuts_every_overdue_head_and_spares_finished_requests():
    async def go() -> tuple[list[bytes], bytes, float]:
        server, task, port = await _serve(header_timeout=0.5)
        try:
            t = time.monotonic()
            stalled = []
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /now HTTP/1.1\r\nhost: x\r\nx-slow: ")
                stalled.append((reader, writer))
            outs = [await asyncio.wait_for(r.read(), 5) for r, _ in stalled]
            took = time.monotonic() - t
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # a quick client is served
            writer.write(b"GET /now HTTP/1.1\r\nhost: x\r\n\r\n")
            ok = await asyncio.wait_for(reader.read(65536), 5)
            for _, w in [*stalled, (reader, writer)]:
                w.close()
            return outs, ok, took
        finally:
            await _stop(server, task)

    outs, ok, took = asyncio.run(go())
    assert all(o.startswith(b"HTTP/1.1 408") and b"within 0.5s" in o for o in outs), outs
    assert 0.45 < took < 2, took
    assert ok.startswith(b"HTTP/1.1 200")


def _body_receive(queue: asyncio.Queue, deadlines: Deadlines, timeout: float = 0.3) -> BodyReceive:
    async def receive() -> dict[str, Any]:
        try:
            return await queue.get()
        finally:
            receive.finished += 1  # type: ignore[attr-defined]

    receive.finished = 0  # type: ignore[attr-defined]
    return BodyReceive(receive, 1000, timeout, deadlines)


def test_a_body_receive_that_is_answered_at_once_arms_no_deadline():
    async def go() -> tuple[dict[str, Any], bool]:
        deadlines = Deadlines(period=0.05)
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})
        message = await _body_receive(queue, deadlines)()
        return message, deadlines._runner is None

    message, no_timer = asyncio.run(go())
    assert message["body"] == b"{}" and no_timer


def test_a_body_receive_that_waits_is_timed_and_cancels_cleanly():
    async def go() -> tuple[bytes, str, bool, int]:
        deadlines = Deadlines(period=0.05)
        queue: asyncio.Queue = asyncio.Queue()
        late = _body_receive(queue, deadlines)
        asyncio.get_running_loop().call_later(0.1, queue.put_nowait, {"type": "http.request", "body": b"late"})
        got = (await late())["body"]  # waited 0.1 s of its 0.3: served
        never = _body_receive(asyncio.Queue(), deadlines)
        try:
            await never()
            timed_out = "no"
        except BodyTimeout as e:
            timed_out = str(e)
        cancelled = _body_receive(asyncio.Queue(), deadlines)
        task = asyncio.ensure_future(cancelled())
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
            was_cancelled = False
        except asyncio.CancelledError:
            was_cancelled = True
        return got, timed_out, was_cancelled, cancelled._receive.finished  # type: ignore[attr-defined]

    got, timed_out, was_cancelled, finished = asyncio.run(go())
    assert got == b"late"
    assert "not received within 0.3s" in timed_out
    assert was_cancelled and finished == 1  # the cancel reached the waiting receive


def test_the_sweeper_lets_go_of_closed_and_upgraded_connections():
    http = bounded_http_protocol(65536, 10.0)

    async def go() -> tuple[int, int, bytes]:
        server, task, port = await _serve(http=http)
        try:
            conns = []
            for _ in range(3):
                conns.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.1)
            open_now = len(http.head_sweeper.connections)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # a WebSocket upgrade
            writer.write(
                b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
                b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            answer = await asyncio.wait_for(reader.read(65536), 5)
            for _, w in [*conns, (reader, writer)]:
                w.close()
            await asyncio.sleep(0.3)
            return open_now, len(http.head_sweeper.connections), answer
        finally:
            await _stop(server, task)

    open_now, left, answer = asyncio.run(go())
    assert open_now == 3 and left == 0, (open_now, left)
    assert answer.startswith(b"HTTP/1.1"), answer


def test_an_idle_kept_alive_connection_is_closed_by_the_sweeper_with_no_timer_per_response():
    http = bounded_http_protocol(65536, 10.0)

    async def go() -> tuple[list[Any], bytes, float, int]:
        server, task, port = await _serve(http=http, keepalive=1.0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            armed = []
            for i in range(6):  # a request every 0.25 s keeps it open past the 1 s timeout (1.25 s)
                if i:
                    await asyncio.sleep(0.25)
                writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                await reader.readuntil(b"hello")
                armed += [c.timeout_keep_alive_task for c in http.head_sweeper.connections]
            answered = time.monotonic()  # the server finished its last response before this
            rest = await asyncio.wait_for(reader.read(), 5)  # EOF: the server closed it
            idle = time.monotonic() - answered
            await asyncio.sleep(0.1)
            return armed, rest, idle, len(http.head_sweeper.connections)
        finally:
            await _stop(server, task)

    armed, rest, idle, left = asyncio.run(go())
    assert armed == [None] * 6  # uvicorn's per-response timer was never armed
    assert rest == b"" and left == 0
    # Closed after the timeout (a sweep is a tenth of it), long before the 10 s head deadline.
    assert 0.95 <= idle <= 2.0, idle
