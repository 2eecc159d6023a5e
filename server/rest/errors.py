"""Every REST error response is built here: the raw front's paths (infer, checks, worker
forwarding, the pod-wide views), FastAPI's exception handlers (404/405 included) and the
LLM routes. One place decides the body (``{"error": ...}``, redacted), the headers a status
implies (a challenge on 401, ``connection: close`` when the body will not be read, a
``retry-after`` on 503) and the request id, so no path can drop one of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from meshserve.protocol.errors import CapacityExhausted, InferenceError
from meshserve.protocol.rest_codec import encode_error
from meshserve.server.observe import REQUEST_ID_HEADER
from meshserve.server.security import WWW_AUTHENTICATE, redact
from starlette.responses import Response

log = logging.getLogger(__name__)

Header = tuple[bytes, bytes]
Send = Callable[[dict[str, Any]], Awaitable[None]]

REQUEST_ID = REQUEST_ID_HEADER.encode()
JSON = (b"content-type", b"application/json")
_CHALLENGE = (b"www-authenticate", WWW_AUTHENTICATE)
_CLOSE = (b"connection", b"close")  # the rest of the body will not be read: end the connection
_RETRY = (b"retry-after", b"1")  # 503: a full queue, a loading model, a draining pod are all brief
STATUS_HEADER: dict[int, Header] = {401: _CHALLENGE, 408: _CLOSE, 413: _CLOSE, 503: _RETRY}


def error_status(e: BaseException) -> tuple[int, str]:
    """The status and the client-safe (redacted) message of an exception; anything but an
    :class:`InferenceError` is a bug, logged here and answered as a bare 500."""
    if isinstance(e, InferenceError):
        return e.http_status, redact(e.message)
    log.error("unexpected error", exc_info=e)
    return 500, "internal server error"


def status_headers(status: int, e: BaseException | None = None) -> list[Header]:
    """The headers an error status implies; a full cache says when room is likely
    (RFC 9110 Retry-After, whole seconds)."""
    if isinstance(e, CapacityExhausted):
        return [(b"retry-after", str(max(1, math.ceil(e.retry_after))).encode())]
    extra = STATUS_HEADER.get(status)
    return [extra] if extra is not None else []


def error_parts(
    status: int, message: str, rid: str | None, e: BaseException | None = None, body: bytes | None = None
) -> tuple[list[Header], bytes]:
    """The headers and body of one error response. ``message`` is redacted here; ``body``
    replaces the ``{"error": message}`` document where a route has its own shape (OpenAI's).
    ``rid`` is None only where the front adds the id itself (FastAPI's responses)."""
    if body is None:
        body = encode_error(redact(message))
    headers = [JSON, (b"content-length", str(len(body)).encode()), *status_headers(status, e)]
    if rid is not None:
        headers.append((REQUEST_ID, rid.encode()))
    return headers, body


async def send_error(
    send: Send, status: int, message: str, rid: str | None, e: BaseException | None = None, body: bytes | None = None
) -> None:
    """An error answered straight on an ASGI ``send``."""
    headers, body = error_parts(status, message, rid, e, body)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_exception(send: Send, e: BaseException, rid: str | None) -> int:
    """An exception answered on ``send``; returns the status sent."""
    status, message = error_status(e)
    await send_error(send, status, message, rid, e)
    return status


def error_response(
    status: int, message: str, rid: str | None = None, e: BaseException | None = None, body: bytes | None = None
) -> Response:
    """The same error as a Starlette response, for FastAPI handlers and routes."""
    headers, body = error_parts(status, message, rid, e, body)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


def exception_response(e: BaseException, rid: str | None = None) -> Response:
    status, message = error_status(e)
    return error_response(status, message, rid, e)
