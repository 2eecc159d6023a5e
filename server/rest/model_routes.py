"""Generate and OpenAI requests reach their model the way infer does.

With ``--workers N`` the worker that owns the model serves it (``generate`` paths name
it in the URL and are passed on with every ``/v2/models/{m}`` path; the OpenAI routes
name it in the body, which is decoded once here and handed to the route). In a fleet
a pod that does not hold the model passes the request to a holder's REST port, or
places the model by the fleet's rules; the holder answers with its own response
(OpenAI or OIP shapes, Server-Sent Events), relayed chunk by chunk.

Why raw HTTP between pods, not gRPC: the answer is the holder's own REST answer (each
route's JSON shapes, SSE framing, error bodies, status codes), so nothing is rebuilt on
the way and a new route needs no new message; the stream stays a stream, and dropping
the connection is the cancel. Infer keeps gRPC (decoded tensors travel better there).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import orjson
from meshserve.protocol.errors import InferenceError
from meshserve.server.fleet.transport import MARKER_B, RestRequest
from meshserve.server.fleet.wire import ROUTE
from meshserve.server.llm.request_stats import OIP, OPENAI, RequestStats
from meshserve.server.llm.service import PARSED_BODY
from meshserve.server.observe import log_access
from meshserve.server.rest.errors import REQUEST_ID, send_error, send_exception
from meshserve.server.rest.front import read_body
from meshserve.server.rest.headers import RequestHeaders
from meshserve.server.security import redact
from meshserve.server.upstream import relay

if TYPE_CHECKING:
    from meshserve.modelmesh.store import PodRecord
    from meshserve.server.rest.front import RestFront

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

OPENAI_PATHS = frozenset(
    f"{prefix}/{route}" for prefix in ("/v1", "/openai/v1") for route in ("completions", "chat/completions")
)
GENERATE_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/generate(?:_stream)?$")


class ModelRoutes:
    """The generate and OpenAI paths of one REST front (its checks, body reading and
    local handling are the front's)."""

    def __init__(self, front: RestFront) -> None:
        self.front = front
        self.dp = front.dataplane

    def wants(self, scope: Scope) -> bool:
        """Cheap: only where there is somewhere else to send a request."""
        path = scope["path"]
        if path in OPENAI_PATHS:
            return self.front.router is not None or self.dp.fleet is not None
        return self.dp.fleet is not None and GENERATE_PATH.match(path) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders, rid: str) -> None:
        front = self.front
        t0 = perf_counter_ns()
        path = scope["path"]
        openai = path in OPENAI_PATHS
        if headers.request_id != rid.encode():
            # One id for the whole way: this front's log, the worker or pod that serves it.
            scope["headers"] = [*(h for h in scope["headers"] if h[0] != REQUEST_ID), (REQUEST_ID, rid.encode())]
            headers = RequestHeaders(scope["headers"])
        name = ""
        try:
            front._check(scope, headers)
            receive = front._body(receive)
            body = await read_body(receive)
            if openai:
                name = self._model_in_body(scope, body)
                version = None
            else:
                m = GENERATE_PATH.match(path)
                name, version = m["name"], m["version"]
            if name:
                router = front.router
                if router is not None and not router.mine(name):
                    await front._forward(scope, receive, send, headers, rid, router.owner(name), body)
                    return
                fleet = self.dp.fleet
                if fleet is not None and not any(k == MARKER_B for k, _ in scope["headers"]):
                    key = self.dp.repository.resolve(name, version)
                    if not fleet.serves_here(self.dp.cache.get(key)):
                        await self._fleet(scope, receive, send, headers, key, name, body, rid, t0)
                        return
                    fleet.counts["local"] += 1
                    send = _routed(send, "local")
        except InferenceError as e:
            await _send_error(send, e, openai, rid)
            stats = RequestStats(self.dp, OPENAI if openai else OIP, name)
            stats.fail(e)
            stats.end()
            log_access(rid, "rest", path, name, e.http_status, perf_counter_ns() - t0)
            return
        await front._other(scope, _replay(body, receive), send, headers, rid)

    def _model_in_body(self, scope: Scope, body: bytes) -> str:
        """The OpenAI body's ``model``; the decoded object goes on with the request (the
        route reads it from the scope, not decoding the body again). A body that is not
        a JSON object is left to the route, which answers its 400."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return ""
        if not isinstance(doc, dict):
            return ""
        scope[PARSED_BODY] = doc
        model = doc.get("model")
        return model if isinstance(model, str) else ""

    async def _fleet(self, scope: Scope, receive: Receive, send: Send, headers: RequestHeaders, key: str, name: str,
                     body: bytes, rid: str, t0: int) -> None:  # fmt: skip
        """Served here (the fleet places the model here) or relayed from a holder."""
        fleet = self.dp.fleet
        front = self.front
        target = scope["raw_path"] or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        request = RestRequest(target, scope["headers"], body)

        async def local() -> None:
            await front._other(scope, _replay(body, receive), _routed(send, ROUTE.get()), headers, rid)

        async def forward(pod: PodRecord, timeout: float, kind: str) -> None:
            # Unreachable (refused, reset before an answer began): the fleet tries another pod.
            response = await fleet.transport.relay(pod, request, timeout, kind)
            # The answer has begun: from here on it is this request's answer, never retried.
            stats = RequestStats(self.dp, OPENAI if scope["path"] in OPENAI_PATHS else OIP, name)
            stats.status = response.status
            try:
                await relay(response, send, receive, [(b"meshserve-route", kind.encode())])
            except (OSError, EOFError):
                log.warning("pod %s closed the connection before the answer for %s ended", pod.id, name)
            finally:
                stats.end()
                log_access(rid, "rest", scope["path"], name, response.status, perf_counter_ns() - t0)

        await fleet.serve_on(key, local, forward, None)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for a route, the body already read: once whole, then the client's own."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _routed(send: Send, kind: str) -> Send:
    """``send`` that says how the fleet served the request (``meshserve-route``, as infer)."""
    header = (b"meshserve-route", kind.encode())

    async def tagged(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return tagged


async def _send_error(send: Send, e: InferenceError, openai: bool, rid: str) -> None:
    """Through the one error builder (server/rest/errors.py); OpenAI routes keep their shape."""
    if not openai:
        await send_exception(send, e, rid)
        return
    from meshserve.server.llm.openai_api import error_body

    status, doc = error_body(e)
    doc["error"]["message"] = redact(doc["error"]["message"])
    await send_error(send, status, doc["error"]["message"], rid, e, orjson.dumps(doc))
