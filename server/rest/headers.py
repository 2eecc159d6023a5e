"""The one scan of a request's raw ASGI headers: every value the front, auth, the access
log and the codecs need, read in a single pass (header order and case as uvicorn gives
them: names lower-case bytes)."""

from __future__ import annotations

from collections.abc import Iterable

from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.rest_codec import HEADER_LENGTH

_HEADER_LENGTH = HEADER_LENGTH.encode()


class RequestHeaders:
    """The headers meshserve reads; raw bytes (or None), parsed where used."""

    __slots__ = (
        "request_id", "authorization", "api_key", "traceparent", "content_length",
        "content_encoding", "accept_encoding", "header_length",
    )  # fmt: skip

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self.request_id = self.authorization = self.api_key = self.traceparent = None
        self.content_length = self.content_encoding = self.accept_encoding = self.header_length = None
        for key, value in raw:
            if key == b"content-length":
                self.content_length = value
            elif key == b"x-request-id":
                self.request_id = value
            elif key == b"authorization":
                self.authorization = value
            elif key == b"x-api-key":
                self.api_key = value
            elif key == b"content-type":
                continue  # the commonest header, read by no one here
            elif key == _HEADER_LENGTH:
                self.header_length = value
            elif key == b"content-encoding":
                self.content_encoding = value
            elif key == b"accept-encoding":
                self.accept_encoding = value
            elif key == b"traceparent":
                self.traceparent = value

    def declared_length(self) -> int | None:
        """Content-Length, if sent (a 400 if it is not a count)."""
        return None if self.content_length is None else int_header(self.content_length, "Content-Length")

    def json_header_length(self) -> int | None:
        """Triton's Inference-Header-Content-Length, if sent."""
        return None if self.header_length is None else int_header(self.header_length, "Inference-Header-Content-Length")


def int_header(value: bytes, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise InvalidInput(f"{name} header must be an integer") from None
    if n < 0:
        raise InvalidInput(f"{name} header must not be negative")
    return n
