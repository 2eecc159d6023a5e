"""A raw ASGI front: ``POST .../infer`` goes to a lean handler, everything else to FastAPI.

FastAPI's per-request machinery costs about 3x on small infer requests
(DESIGN.md); it stays for what it is good at: metadata, admin and docs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Generator
from time import monotonic, perf_counter_ns
from typing import Any

from meshserve.protocol.errors import (
    BodyTimeout,
    InferenceError,
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    ServerNotReady,
    Unauthenticated,
)
from meshserve.protocol.rest_codec import HEADER_LENGTH, decode_infer_request, encode_infer_response
from meshserve.server import tracing
from meshserve.server.dataplane import DataPlane
from meshserve.server.fleet import ROUTE
from meshserve.server.observe import FrontStats, clean_request_id, log_access, new_request_id
from meshserve.server.rest.encoding import MIN_COMPRESSED_RESPONSE, decode_body, encode_body, response_encoding
from meshserve.server.rest.errors import REQUEST_ID, send_exception
from meshserve.server.rest.headers import RequestHeaders
from meshserve.server.security import HEALTH_PATHS, METRICS_PATH, Deadlines, build_auth
from meshserve.server.upstream import relay
from meshserve.server.workers import MODEL_PATH, REPOSITORY_CHANGE, Router

DASHBOARD_STATE = "/v2/dashboard/state"

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
_HEADER_LENGTH_B = HEADER_LENGTH.encode()
_JOIN_BELOW = 64 * 1024


class RestFront:
    """``api``: the FastAPI app for everything but infer (one per process, shared by its fronts)."""

    def __init__(self, dataplane: DataPlane, api: Any, max_body: int, router: Router | None = None) -> None:
        self.dataplane = dataplane
        self.router = router
        self.max_body = max_body
        self.api = api
        settings = dataplane.settings
        self.auth = build_auth(settings)
        self.request_timeout = settings.request_timeout_seconds
        self.body_timeout = settings.body_timeout_seconds
        self.obs = dataplane.observe
        self._stats: dict[str, FrontStats] = self.obs.kept("rest") if self.obs is not None else {}
        self.deadlines = Deadlines()
        from meshserve.server.rest.model_routes import ModelRoutes

        self.model_routes = ModelRoutes(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        headers = RequestHeaders(scope["headers"])
        rid = new_request_id() if headers.request_id is None else clean_request_id(headers.request_id)
        if self.router is not None:
            path = scope["path"]
            m = MODEL_PATH.match(path)
            if m is not None:
                name = m["name"]
                if scope["method"] == "POST":
                    change = REPOSITORY_CHANGE.match(path)
                    if change is not None:  # on the owner, then replayed on the others
                        owner = self.router.owner(name)
                        await self._forward(scope, receive, send, headers, rid, owner, change=change["action"])
                        return
                    infer = INFER_PATH.match(path)
                    if infer is not None and self.router.serve_here(name, infer["version"]):
                        await self._infer(scope, receive, send, headers, rid, name, infer["version"])
                        return
                if not self.router.mine(name):
                    await self._forward(scope, receive, send, headers, rid, self.router.owner(name))
                    return
            if path in (METRICS_PATH, "/v2/repository/index", "/v2/health/ready", DASHBOARD_STATE):
                await self._gather(scope, receive, send, headers, rid)
                return
        if scope["method"] == "POST":
            m = INFER_PATH.match(scope["path"])
            if m is not None:
                await self._infer(scope, receive, send, headers, rid, m["name"], m["version"])
                return
            if self.model_routes.wants(scope):  # generate and OpenAI: to the owner or holder
                await self.model_routes(scope, receive, send, headers, rid)
                return
        await self._other(scope, receive, send, headers, rid)

    def _check(self, scope: Scope, headers: RequestHeaders) -> None:
        """Credentials where the path needs them, then the declared body size."""
        if self.auth is not None and self.auth.protects(scope["path"]):
            if not self.auth.check(headers.authorization, headers.api_key):
                raise Unauthenticated("missing or invalid credentials")
        declared = headers.declared_length()
        if declared is not None and declared > self.max_body:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {self.max_body}")

    async def _other(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders, rid: str) -> None:
        """Everything but infer: checks, then FastAPI, with the request id and an access line."""
        t0 = perf_counter_ns()
        rid_header = (REQUEST_ID, rid.encode())
        status = 500
        try:
            self._check(scope, headers)
        except InferenceError as e:
            status = await send_exception(send, e, rid)
            _log_other(rid, scope, status, t0)
            return

        async def tagged(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        try:
            await self.api(scope, self._body(receive), tagged)
        finally:
            _log_other(rid, scope, status, t0)

    async def _infer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: RequestHeaders,
        rid: str,
        name: str,
        version: str | None,
    ) -> None:
        t0 = perf_counter_ns()
        stats = self._stats.get(name) or (self.obs.front(name, "rest") if self.obs is not None else None)
        if stats is not None:
            stats.in_flight += 1  # stats.begin(), without the call
        status = 200
        try:
            if self.auth is not None and not self.auth.check(headers.authorization, headers.api_key):
                raise Unauthenticated("missing or invalid credentials")
            declared = headers.declared_length()
            if declared is not None and declared > self.max_body:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {self.max_body}")
            header_length = headers.json_header_length()
            body = await read_body(BodyReceive(receive, self.max_body, self.body_timeout, self.deadlines))
            if headers.content_encoding is not None:
                body = decode_body(body, headers.content_encoding, self.max_body)
            if tracing.TRACER is None:
                work = run_infer(self.dataplane, body, name, version, header_length)
            else:
                work = _traced_infer(self.dataplane, body, name, version, header_length, headers.traceparent)
            if self.request_timeout is None:
                parts, json_length = await work
            else:
                try:
                    async with asyncio.timeout(self.request_timeout):
                        parts, json_length = await work
                except TimeoutError:
                    raise RequestTimeout(f"request not served within {self.request_timeout:g}s") from None
        except Exception as e:
            if not isinstance(e, InferenceError):
                log.exception("infer on %s failed", name)
            status = await send_exception(send, e, rid)
            self._done(stats, rid, name, status, t0)
            return
        total = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        out = [
            (b"content-type", b"application/json" if json_length is None else b"application/octet-stream"),
            (REQUEST_ID, rid.encode()),
        ]
        if self.dataplane.fleet is not None:  # local, forwarded or miss: where the fleet served it
            out.append((b"meshserve-route", ROUTE.get().encode()))
        if json_length is not None:
            out.append((_HEADER_LENGTH_B, str(json_length).encode()))
        if headers.accept_encoding is not None and total >= MIN_COMPRESSED_RESPONSE:
            encoding = response_encoding(headers.accept_encoding)
            if encoding is not None:
                parts = [encode_body(parts, encoding)]
                total = len(parts[0])
                out.append((b"content-encoding", encoding))
        out.append((b"content-length", str(total).encode()))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": out})
            if len(parts) > 1 and total <= _JOIN_BELOW:
                parts = [b"".join(parts)]  # one write beats several for small bodies
            last = len(parts) - 1
            for i, part in enumerate(parts):
                await send({"type": "http.response.body", "body": part, "more_body": i < last})
        finally:
            self._done(stats, rid, name, status, t0)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: RequestHeaders,
        rid: str,
        owner: int,
        body: bytes | None = None,
        *,
        change: str = "",
    ) -> None:
        """Pass the request to the worker that owns its model, bytes through (with this
        worker's request id, so both log the same one); the answer comes back as the owner
        writes it (a stream chunk by chunk), and a client that goes away closes the
        connection to the owner, which stops the work. ``body``: already read (and
        ``receive`` already wrapped) by the caller. ``change``: a repository load/unload,
        replayed on the other workers once the owner took it."""
        assert self.router is not None
        raw = scope["headers"]
        if headers.request_id is None or headers.request_id != rid.encode():
            raw = [*(h for h in raw if h[0] != REQUEST_ID), (REQUEST_ID, rid.encode())]
        try:
            if body is None:
                self._check(scope, headers)
                receive = self._body(receive)
                body = await read_body(receive)
            target = scope["raw_path"] or scope["path"].encode()
            if scope["query_string"]:
                target += b"?" + scope["query_string"]
            try:
                response = await self.router.http(owner).open(scope["method"].encode(), target, raw, body)
            except OSError:
                log.warning("worker %d unreachable", owner)
                raise ServerNotReady(f"the worker serving this model ({owner}) is unavailable") from None
            if change and response.status == 200:
                fwd = [(k, v) for k, v in raw if k in (b"authorization", b"x-api-key", b"content-type")]
                name = scope["path"].split("/")[4]
                await self.router.sync(name, change, body, fwd)
        except InferenceError as e:
            await send_exception(send, e, rid)
            return
        try:
            # Which worker took the connection and passed it on (diagnostics; tests tell the paths apart).
            await relay(response, send, receive, [(b"meshserve-worker", str(self.router.index).encode())])
        except (OSError, EOFError):
            log.warning("worker %d closed the connection before the answer ended", owner)

    async def _gather(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders, rid: str) -> None:
        """/metrics, readiness and the repository index over every worker."""
        assert self.router is not None
        status = 200
        try:
            self._check(scope, headers)
            body = await read_body(self._body(receive))
            creds = ((b"authorization", headers.authorization), (b"x-api-key", headers.api_key))
            fwd = [(k, v) for k, v in creds if v is not None]
            if scope["path"] == "/v2/health/ready":
                # The pod is ready when every worker is (each answers for its own models).
                ok = self.dataplane.ready() and await self.router.all_ready(fwd)
                status, text = readiness(ok)
                ctype = b"application/json"
            elif scope["path"] == DASHBOARD_STATE:
                text = await self._dashboard_state(scope, fwd)
                ctype = b"application/json"
            elif scope["path"] == METRICS_PATH:
                from meshserve.server.metrics import scrape
                from prometheus_client import CONTENT_TYPE_LATEST

                text = await self.router.metrics(await scrape(self.dataplane.metrics), fwd)
                ctype = CONTENT_TYPE_LATEST.encode()
            else:
                from meshserve.protocol.rest_codec import dumps, loads_object

                ready = (loads_object(body) if body.strip() else {}).get("ready", False)
                if not isinstance(ready, bool):
                    raise InvalidInput("'ready' must be a boolean")
                own = self.dataplane.repository_index(ready_only=ready)
                fwd.append((b"content-type", b"application/json"))
                text = dumps(await self.router.repository_index(own, body, fwd))
                ctype = b"application/json"
        except InferenceError as e:
            await send_exception(send, e, rid)
            return
        out = [(b"content-type", ctype), (b"content-length", str(len(text)).encode()), (REQUEST_ID, rid.encode())]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": text})

    async def _dashboard_state(self, scope: Scope, fwd: list[tuple[bytes, bytes]]) -> bytes:
        """The dashboard's feed over every worker (server/dashboard.py)."""
        from urllib.parse import parse_qsl

        from meshserve.protocol.rest_codec import dumps
        from meshserve.server.dashboard import Query, dashboard_state, merge_states

        assert self.router is not None
        query = Query.parse(dict(parse_qsl(scope["query_string"].decode("latin-1"))))
        # The peers work on their share while this worker does its own.
        peers = asyncio.ensure_future(self.router.dashboard_states(query.peer_params(), fwd))
        await asyncio.sleep(0)
        own = dashboard_state(self.dataplane, query, own=True)
        return dumps(merge_states(own, await peers, query))

    def _body(self, receive: Receive) -> BodyReceive:
        return BodyReceive(receive, self.max_body, self.body_timeout, self.deadlines)

    @staticmethod
    def _done(stats: FrontStats | None, rid: str | None, name: str, status: int, t0: int) -> None:
        elapsed = perf_counter_ns() - t0
        if stats is not None:
            stats.end(status, elapsed)
        log_access(rid or "-", "rest", "infer", name, status, elapsed)


NOT_READY = "not ready"


def readiness(ok: bool, name: str | None = None) -> tuple[int, bytes]:
    """A readiness answer as Triton gives it: 200 when ready, 400 when not (Kubernetes
    probes count any 4xx as failure), with ``ready`` in the body either way."""
    from meshserve.protocol.rest_codec import dumps

    doc: dict[str, Any] = {} if name is None else {"name": name}
    doc["ready"] = ok
    if ok:
        return 200, dumps(doc)
    what = "server" if name is None else f"model {name!r}"
    return 400, dumps({"error": f"{what} is {NOT_READY}", **doc})


def _log_other(rid: str | None, scope: Scope, status: int, t0: int) -> None:
    path = scope["path"]
    if path in HEALTH_PATHS or path == METRICS_PATH:
        return  # probes and scrapes every few seconds would drown the access log
    log_access(rid or "-", "rest", f"{scope['method']} {path}", "", status, perf_counter_ns() - t0)


async def run_infer(
    dp: DataPlane, body: bytes, name: str, version: str | None, header_length: int | None
) -> tuple[list[bytes | memoryview], int | None]:
    """Decode, infer, encode: the whole REST infer path, shared by the front and the documented route."""
    key = dp.repository.resolve(name, version)  # an unknown model is a 404 whatever the body
    request = decode_infer_request(body, name, version, header_length, dp.settings.max_bytes_elements)
    response = await dp.infer(request, key)
    return encode_infer_response(response, request)


async def _traced_infer(
    dp: DataPlane, body: bytes, name: str, version: str | None, header_length: int | None, traceparent: bytes | None
) -> tuple[list[bytes | memoryview], int | None]:
    """run_infer with spans (server/tracing.py): decode, the model's queue and predict, encode."""
    tracer = tracing.TRACER
    with tracing.request_span(f"infer {name}", traceparent, "rest", name):
        key = dp.repository.resolve(name, version)
        with tracer.start_as_current_span("decode"):
            request = decode_infer_request(body, name, version, header_length, dp.settings.max_bytes_elements)
        response = await dp.infer(request, key)
        with tracer.start_as_current_span("encode"):
            return encode_infer_response(response, request)


class BodyReceive:
    """``receive`` for one request, on every route: the whole body must arrive within
    ``timeout`` seconds of the first receive (408, however it trickles) and within
    ``limit`` bytes (413). Once the body is complete no timeout applies: a later receive
    waits for the disconnect as long as the response takes (a generation, a stream).
    A receive that is answered at once (a small body is whole before the app runs) needs
    no deadline: it is tried first, and only one that has to wait is timed, with
    :class:`Deadlines` (``asyncio.timeout`` costs ~9 us a use)."""

    __slots__ = ("_receive", "_limit", "_timeout", "_deadlines", "_due", "_seen", "_done")

    def __init__(self, receive: Receive, limit: int, timeout: float, deadlines: Deadlines) -> None:
        self._receive = receive
        self._limit = limit
        self._timeout = timeout
        self._deadlines = deadlines
        self._due = 0.0
        self._seen = 0
        self._done = False

    async def __call__(self) -> dict[str, Any]:
        if self._done:
            return await self._receive()
        now = monotonic()
        if not self._due:
            self._due = now + self._timeout
        elif now >= self._due:
            raise BodyTimeout(f"request body not received within {self._timeout:g}s")
        waiting = self._receive()
        if isinstance(waiting, Coroutine):
            try:
                signal = waiting.send(None)
            except StopIteration as answered:  # no wait: no deadline to keep
                message = answered.value
            else:
                message = await self._timed(_Started(waiting, signal))
        else:
            message = await self._timed(waiting)
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {self._limit} bytes")
            self._done = not message.get("more_body", False)
        else:
            self._done = True  # http.disconnect: nothing more will come
        return message

    async def _timed(self, waiting: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        task = self._deadlines.arm(self._due - monotonic())
        try:
            return await waiting
        except asyncio.CancelledError:
            if self._deadlines.fired(task):
                raise BodyTimeout(f"request body not received within {self._timeout:g}s") from None
            raise
        finally:
            self._deadlines.disarm(task)


class _Started:
    """Awaits a coroutine that was already started and is now waiting on ``signal``
    (what it yielded for the task to wait on): the rest of its run, as ``await`` would."""

    __slots__ = ("_coro", "_signal")

    def __init__(self, coro: Coroutine[Any, Any, Any], signal: Any) -> None:
        self._coro = coro
        self._signal = signal

    def __await__(self) -> Generator[Any, None, Any]:
        coro, signal = self._coro, self._signal
        while True:
            try:
                yield signal
            except BaseException as e:  # a cancel: the coroutine cleans up, then ends or goes on
                try:
                    signal = coro.throw(e)
                except StopIteration as done:
                    return done.value
                continue
            try:
                signal = coro.send(None)
            except StopIteration as done:
                return done.value


async def read_body(receive: BodyReceive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("client disconnected before sending the whole body")
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


def build_rest_app(dataplane: DataPlane, api: Any, max_body: int, router: Router | None = None) -> Any:
    """The front, wrapped in CORS when origins are configured (off by default)."""
    front = RestFront(dataplane, api, max_body, router=router)
    origins = dataplane.settings.cors_origins
    if not origins:
        return front
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(
        front, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"], expose_headers=["x-request-id", HEADER_LENGTH],
    )  # fmt: skip
