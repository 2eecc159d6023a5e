"""A raw ASGI front: ``POST .../infer`` goes to a lean handler, everything else to FastAPI.

FastAPI's per-request machinery costs about 3x on small infer requests
(DESIGN.md); it stays for what it is good at: metadata, admin and docs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any

from meshserve.protocol.errors import (
    BodyTimeout,
    CapacityExhausted,
    InferenceError,
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    ServerNotReady,
    Unauthenticated,
)
from meshserve.protocol.rest_codec import HEADER_LENGTH, decode_infer_request, encode_error, encode_infer_response
from meshserve.server import tracing
from meshserve.server.dataplane import DataPlane
from meshserve.server.fleet import ROUTE
from meshserve.server.observe import FrontStats, clean_request_id, log_access
from meshserve.server.rest.encoding import MIN_COMPRESSED_RESPONSE, decode_body, encode_body, response_encoding
from meshserve.server.security import (
    HEALTH_PATHS,
    METRICS_PATH,
    WWW_AUTHENTICATE,
    Deadlines,
    build_auth,
    redact,
)
from meshserve.server.settings import Settings
from meshserve.server.workers import MODEL_PATH, Router

DASHBOARD_STATE = "/v2/dashboard/state"

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
_JSON = [(b"content-type", b"application/json")]
_HEADER_LENGTH_B = HEADER_LENGTH.encode()
_JOIN_BELOW = 64 * 1024


class RestFront:
    def __init__(
        self, dataplane: DataPlane, max_body: int, settings: Settings | None = None, router: Router | None = None
    ) -> None:
        self.dataplane = dataplane
        self.router = router
        self.max_body = max_body
        from meshserve.server.rest.routes import build_api

        self.api = build_api(dataplane)
        settings = settings or dataplane.settings
        self.auth = build_auth(settings)
        self.request_timeout = settings.request_timeout_seconds
        self.body_timeout = settings.body_timeout_seconds
        self.obs = getattr(dataplane, "observe", None)
        self.deadlines = Deadlines()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.router is not None:
                path = scope["path"]
                m = MODEL_PATH.match(path)
                if m is not None and not self.router.mine(m["name"]):
                    await self._forward(scope, receive, send, self.router.owner(m["name"]))
                    return
                if path in (METRICS_PATH, "/v2/repository/index", "/v2/health/ready", DASHBOARD_STATE):
                    await self._gather(scope, receive, send)
                    return
            if scope["method"] == "POST":
                m = INFER_PATH.match(scope["path"])
                if m is not None:
                    await self._infer(scope, receive, send, m["name"], m["version"])
                    return
            await self._other(scope, receive, send)
            return
        await self.api(scope, receive, send)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Everything but infer: checks, then FastAPI, with the request id and an access line."""
        t0 = perf_counter_ns()
        rid = authorization = api_key = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value
            elif key == b"authorization":
                authorization = value
            elif key == b"x-api-key":
                api_key = value
        rid = clean_request_id(rid)
        rid_header = (b"x-request-id", rid.encode())
        status = 500
        try:
            if self.auth is not None and self.auth.protects(scope["path"]):
                if not self.auth.check(authorization, api_key):
                    raise Unauthenticated("missing or invalid credentials")
            declared = _declared_length(scope)
            if declared is not None and declared > self.max_body:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {self.max_body}")
        except InferenceError as e:
            status = e.http_status
            extra = _ERROR_HEADER.get(status)
            await _send_json(send, status, encode_error(redact(e.message)), rid_header, extra)
            _log_other(rid, scope, status, t0)
            return

        async def tagged(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
                if status in (408, 413, 503):
                    message["headers"].append(_ERROR_HEADER[status])
            await send(message)

        try:
            await self.api(scope, self._body(receive), tagged)
        finally:
            _log_other(rid, scope, status, t0)

    async def _infer(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None) -> None:
        t0 = perf_counter_ns()
        rid = authorization = api_key = traceparent = None
        stats = self.obs.front(name, "rest") if self.obs is not None else None
        if stats is not None:
            stats.begin()
        status = 200
        try:
            header_length = declared = content_encoding = accept_encoding = None
            for key, value in scope["headers"]:
                if key == b"content-length":
                    declared = _int_header(value, "Content-Length")
                elif key == _HEADER_LENGTH_B:
                    header_length = _int_header(value, "Inference-Header-Content-Length")
                elif key == b"content-encoding":
                    content_encoding = value
                elif key == b"accept-encoding":
                    accept_encoding = value
                elif key == b"x-request-id":
                    rid = value
                elif key == b"authorization":
                    authorization = value
                elif key == b"x-api-key":
                    api_key = value
                elif key == b"traceparent":
                    traceparent = value
            rid = clean_request_id(rid)
            if self.auth is not None and not self.auth.check(authorization, api_key):
                raise Unauthenticated("missing or invalid credentials")
            if declared is not None and declared > self.max_body:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {self.max_body}")
            body = await _read_body(BodyReceive(receive, self.max_body, self.body_timeout, self.deadlines))
            if content_encoding is not None:
                body = decode_body(body, content_encoding, self.max_body)
            if tracing.TRACER is None:
                work = run_infer(self.dataplane, body, name, version, header_length)
            else:
                work = _traced_infer(self.dataplane, body, name, version, header_length, traceparent)
            if self.request_timeout is None:
                parts, json_length = await work
            else:
                try:
                    async with asyncio.timeout(self.request_timeout):
                        parts, json_length = await work
                except TimeoutError:
                    raise RequestTimeout(f"request not served within {self.request_timeout:g}s") from None
        except InferenceError as e:
            status = e.http_status
            extra = _retry_after(e) or _ERROR_HEADER.get(status)
            await _send_json(send, status, encode_error(redact(e.message)), (b"x-request-id", str(rid).encode()), extra)
            self._done(stats, rid, name, status, t0)
            return
        except Exception:
            log.exception("infer on %s failed", name)
            status = 500
            await _send_json(send, 500, encode_error("internal server error"), (b"x-request-id", str(rid).encode()))
            self._done(stats, rid, name, status, t0)
            return
        total = sum(len(p) for p in parts)
        headers = [
            (b"content-type", b"application/json" if json_length is None else b"application/octet-stream"),
            (b"x-request-id", rid.encode()),
        ]
        if self.dataplane.fleet is not None:  # local, forwarded or miss: where the fleet served it
            headers.append((b"meshserve-route", ROUTE.get().encode()))
        if json_length is not None:
            headers.append((_HEADER_LENGTH_B, str(json_length).encode()))
        if accept_encoding is not None and total >= MIN_COMPRESSED_RESPONSE:
            encoding = response_encoding(accept_encoding)
            if encoding is not None:
                parts = [encode_body(parts, encoding)]
                total = len(parts[0])
                headers.append((b"content-encoding", encoding))
        headers.append((b"content-length", str(total).encode()))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if len(parts) > 1 and total <= _JOIN_BELOW:
                parts = [b"".join(parts)]  # one write beats several for small bodies
            last = len(parts) - 1
            for i, part in enumerate(parts):
                await send({"type": "http.response.body", "body": part, "more_body": i < last})
        finally:
            self._done(stats, rid, name, status, t0)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, owner: int) -> None:
        """Pass the request to the worker that owns its model, bytes through."""
        assert self.router is not None
        headers = scope["headers"]
        try:
            self._check_auth(scope)
            declared = _declared_length(scope)
            if declared is not None and declared > self.max_body:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {self.max_body}")
            body = await _read_body(self._body(receive))
            target = scope["raw_path"] or scope["path"].encode()
            if scope["query_string"]:
                target += b"?" + scope["query_string"]
            try:
                status, out, data = await self.router.http(owner).request(
                    scope["method"].encode(), target, headers, body
                )
            except OSError:
                log.warning("worker %d unreachable", owner)
                raise ServerNotReady(f"the worker serving this model ({owner}) is unavailable") from None
        except InferenceError as e:
            extra = _ERROR_HEADER.get(e.http_status)
            await _send_json(send, e.http_status, encode_error(redact(e.message)), extra)
            return
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": data})

    async def _gather(self, scope: Scope, receive: Receive, send: Send) -> None:
        """/metrics and the repository index over every worker."""
        assert self.router is not None
        try:
            self._check_auth(scope)
            body = await _read_body(self._body(receive))
            fwd = [(k, v) for k, v in scope["headers"] if k in (b"authorization", b"x-api-key")]
            if scope["path"] == "/v2/health/ready":
                # The pod is ready when every worker is (each answers for its own models).
                ok = self.dataplane.ready() and await self.router.all_ready(fwd)
                await _send_json(send, 200 if ok else 503, b'{"ready":true}' if ok else b'{"ready":false}')
                return
            if scope["path"] == DASHBOARD_STATE:
                text = await self._dashboard_state(scope, fwd)
                ctype = b"application/json"
            elif scope["path"] == METRICS_PATH:
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                text = await self.router.metrics(generate_latest(self.dataplane.metrics), fwd)
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
            await _send_json(send, e.http_status, encode_error(redact(e.message)), _ERROR_HEADER.get(e.http_status))
            return
        headers = [(b"content-type", ctype), (b"content-length", str(len(text)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
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

    def _check_auth(self, scope: Scope) -> None:
        if self.auth is None or not self.auth.protects(scope["path"]):
            return
        authorization = api_key = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value
            elif key == b"x-api-key":
                api_key = value
        if not self.auth.check(authorization, api_key):
            raise Unauthenticated("missing or invalid credentials")

    @staticmethod
    def _done(stats: FrontStats | None, rid: str | None, name: str, status: int, t0: int) -> None:
        elapsed = perf_counter_ns() - t0
        if stats is not None:
            stats.end(status, elapsed)
        log_access(rid or "-", "rest", "infer", name, status, elapsed)


_CHALLENGE = (b"www-authenticate", WWW_AUTHENTICATE)
_CLOSE = (b"connection", b"close")  # the rest of the body will not be read: end the connection
_RETRY = (b"retry-after", b"1")  # 503: a full queue, a loading model, a draining pod are all brief
_ERROR_HEADER = {401: _CHALLENGE, 408: _CLOSE, 413: _CLOSE, 503: _RETRY}


def _retry_after(e: InferenceError) -> tuple[bytes, bytes] | None:
    """A full cache says when room is likely (RFC 9110 Retry-After, whole seconds)."""
    if isinstance(e, CapacityExhausted):
        return (b"retry-after", str(max(1, math.ceil(e.retry_after))).encode())
    return None


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


def _int_header(value: bytes, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise InvalidInput(f"{name} header must be an integer") from None
    if n < 0:
        raise InvalidInput(f"{name} header must not be negative")
    return n


def _declared_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return _int_header(value, "Content-Length")
    return None


class BodyReceive:
    """``receive`` for one request, on every route: the whole body must arrive within
    ``timeout`` seconds of the first receive (408, however it trickles) and within
    ``limit`` bytes (413). Once the body is complete no timeout applies: a later receive
    waits for the disconnect as long as the response takes (a generation, a stream).
    Timed with :class:`Deadlines`, as ``asyncio.timeout`` costs ~9 us a use."""

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
        now = asyncio.get_running_loop().time()
        if not self._due:
            self._due = now + self._timeout
        elif now >= self._due:
            raise BodyTimeout(f"request body not received within {self._timeout:g}s")
        task = self._deadlines.arm(self._due - now)
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if self._deadlines.fired(task):
                raise BodyTimeout(f"request body not received within {self._timeout:g}s") from None
            raise
        finally:
            self._deadlines.disarm(task)
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {self._limit} bytes")
            self._done = not message.get("more_body", False)
        else:
            self._done = True  # http.disconnect: nothing more will come
        return message


async def _read_body(receive: BodyReceive) -> bytes:
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


async def _send_json(send: Send, status: int, body: bytes, *extra: tuple[bytes, bytes] | None) -> None:
    headers = [*_JSON, (b"content-length", str(len(body)).encode())]
    headers.extend(h for h in extra if h is not None)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_rest_app(dataplane: DataPlane, max_body: int, router: Router | None = None) -> Any:
    """The front, wrapped in CORS when origins are configured (off by default)."""
    front = RestFront(dataplane, max_body, router=router)
    origins = dataplane.settings.cors_origins
    if not origins:
        return front
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(
        front, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"], expose_headers=["x-request-id", HEADER_LENGTH],
    )  # fmt: skip
