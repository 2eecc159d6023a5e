"""A raw ASGI front: ``POST .../infer`` goes to a lean handler, everything else to FastAPI.

FastAPI's per-request machinery costs about 3x on small infer requests
(DESIGN.md); it stays for what it is good at: metadata, admin and docs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from protocol.errors import InferenceError, InvalidInput, PayloadTooLarge
from protocol.rest_codec import HEADER_LENGTH, decode_infer_request, encode_error, encode_infer_response
from server.dataplane import DataPlane
from server.fleet import ROUTE
from server.rest.encoding import MIN_COMPRESSED_RESPONSE, decode_body, encode_body, response_encoding

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
_JSON = [(b"content-type", b"application/json")]
_HEADER_LENGTH_B = HEADER_LENGTH.encode()
_JOIN_BELOW = 64 * 1024


class RestFront:
    def __init__(self, dataplane: DataPlane, max_body: int) -> None:
        self.dataplane = dataplane
        self.max_body = max_body
        from server.rest.routes import build_api

        self.api = build_api(dataplane)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST":
                m = INFER_PATH.match(scope["path"])
                if m is not None:
                    await self._infer(scope, receive, send, m["name"], m["version"])
                    return
            try:
                declared = _declared_length(scope)
                if declared is not None and declared > self.max_body:
                    raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {self.max_body}")
            except InferenceError as e:
                await _send_json(send, e.http_status, encode_error(e.message))
                return
            receive = _limited(receive, self.max_body)
        await self.api(scope, receive, send)

    async def _infer(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None) -> None:
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
            if declared is not None and declared > self.max_body:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {self.max_body}")
            body = await _read_body(receive, self.max_body)
            if content_encoding is not None:
                body = decode_body(body, content_encoding, self.max_body)
            parts, json_length = await run_infer(self.dataplane, body, name, version, header_length)
        except InferenceError as e:
            await _send_json(send, e.http_status, encode_error(e.message))
            return
        except Exception:
            log.exception("infer on %s failed", name)
            await _send_json(send, 500, encode_error("internal server error"))
            return
        total = sum(len(p) for p in parts)
        headers = [(b"content-type", b"application/json" if json_length is None else b"application/octet-stream")]
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
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if len(parts) > 1 and total <= _JOIN_BELOW:
            parts = [b"".join(parts)]  # one write beats several for small bodies
        last = len(parts) - 1
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})


async def run_infer(
    dp: DataPlane, body: bytes, name: str, version: str | None, header_length: int | None
) -> tuple[list[bytes | memoryview], int | None]:
    """Decode, infer, encode: the whole REST infer path, shared by the front and the documented route."""
    key = dp.repository.resolve(name, version)  # an unknown model is a 404 whatever the body
    request = decode_infer_request(body, name, version, header_length)
    response = await dp.infer(request, key)
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


async def _read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _limited(receive: Receive, limit: int) -> Receive:
    """Wrap receive so a streamed body past the limit ends the request."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        return message

    return wrapped


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def build_rest_app(dataplane: DataPlane, max_body: int) -> RestFront:
    return RestFront(dataplane, max_body)
