"""The one REST error builder and the one header scan, in-process (their paths over real
sockets: tests/server/prod/test_error_responses.py)."""

from __future__ import annotations

import orjson
import pytest
from meshserve.protocol.errors import CapacityExhausted, InvalidInput, PayloadTooLarge, QueueFull, Unauthenticated
from meshserve.server.rest.errors import error_parts, error_response, error_status, exception_response
from meshserve.server.rest.front import readiness
from meshserve.server.rest.headers import RequestHeaders
from meshserve.server.security import register_secrets


def _headers(pairs: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    out = dict(pairs)
    assert len(out) == len(pairs), "a header given twice"
    return out


@pytest.mark.parametrize(
    "error, status, extra",
    [
        (InvalidInput("bad"), 400, None),
        (Unauthenticated("who"), 401, (b"www-authenticate", b"Bearer")),
        (PayloadTooLarge("big"), 413, (b"connection", b"close")),
        (QueueFull("busy"), 503, (b"retry-after", b"1")),
        (CapacityExhausted("full", retry_after=7.2), 503, (b"retry-after", b"8")),
    ],
)
def test_each_status_gets_its_headers_and_the_request_id(error, status, extra):
    code, message = error_status(error)
    headers, body = error_parts(code, message, "rid-1", error)
    h = _headers(headers)
    assert code == status and orjson.loads(body) == {"error": error.message}
    assert h[b"x-request-id"] == b"rid-1" and h[b"content-type"] == b"application/json"
    assert h[b"content-length"] == str(len(body)).encode()
    if extra is not None:
        assert h[extra[0]].startswith(extra[1])


def test_messages_are_redacted_and_bugs_hidden():
    register_secrets("sup3r-secret-value")
    status, message = error_status(InvalidInput("https://u:pw@host/x failed with sup3r-secret-value"))
    assert status == 400 and "pw@" not in message and "sup3r-secret-value" not in message
    assert error_status(RuntimeError("a bug at /etc/passwd")) == (500, "internal server error")
    r = exception_response(KeyError("x"))
    assert r.status_code == 500 and orjson.loads(r.body) == {"error": "internal server error"}


def test_fastapi_responses_leave_the_id_to_the_front_and_keep_a_custom_shape():
    r = error_response(404, "no such route")
    assert b"x-request-id" not in dict(r.raw_headers) and orjson.loads(r.body) == {"error": "no such route"}
    openai = orjson.dumps({"error": {"message": "m", "type": "invalid_request_error"}})
    r = error_response(400, "", body=openai)
    assert r.body == openai and dict(r.raw_headers)[b"content-length"] == str(len(openai)).encode()


def test_one_scan_reads_every_header_the_server_uses():
    h = RequestHeaders([
        (b"host", b"x"), (b"content-length", b"12"), (b"x-request-id", b"abc"), (b"authorization", b"Bearer t"),
        (b"x-api-key", b"k"), (b"inference-header-content-length", b"5"), (b"content-encoding", b"gzip"),
        (b"accept-encoding", b"br"), (b"traceparent", b"00-1-2-01"), (b"content-type", b"application/json"),
    ])  # fmt: skip
    assert (h.request_id, h.authorization, h.api_key, h.traceparent) == (b"abc", b"Bearer t", b"k", b"00-1-2-01")
    assert (h.content_encoding, h.accept_encoding) == (b"gzip", b"br")
    assert h.declared_length() == 12 and h.json_header_length() == 5
    none = RequestHeaders([])
    assert none.declared_length() is None and none.json_header_length() is None and none.request_id is None
    for bad in (b"x", b"-1"):
        with pytest.raises(InvalidInput, match="Content-Length"):
            RequestHeaders([(b"content-length", bad)]).declared_length()


def test_readiness_is_200_or_400_as_triton():
    assert readiness(True) == (200, b'{"ready":true}')
    status, body = readiness(False, "m")
    assert status == 400 and orjson.loads(body) == {"error": "model 'm' is not ready", "name": "m", "ready": False}
