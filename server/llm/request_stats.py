"""The server's per-request figures (``meshserve_inference_requests_total``, the duration
histogram, the in-flight gauge; see :mod:`meshserve.server.observe`) for the generate and
OpenAI endpoints: one stats lookup per request, nothing per token.

A request is counted once, with its final HTTP status: the error's status when it is
refused before the stream begins (bad parameters, a prompt past the context, a full
queue, an unknown model), 499 when the client left first, and for a stream 200, or
the status of the error event if one ended it; its time runs until the last byte.
"""

from __future__ import annotations

from time import perf_counter_ns
from typing import Any

from meshserve.protocol.errors import InferenceError

OIP = "rest"  # the OIP generate extension is counted with the REST front's infer
OPENAI = "openai"


class RequestStats:
    __slots__ = ("_obs", "_protocol", "_stats", "_t0", "_done", "status")

    def __init__(self, dp: Any, protocol: str, model: str | None = None) -> None:
        self._t0 = perf_counter_ns()
        self._obs = getattr(dp, "observe", None)
        self._protocol = protocol
        self._stats = None
        self._done = False
        self.status = 200
        if model is not None:
            self.model(model)

    def model(self, name: str) -> None:
        """The request's model, once known (unknown names count under ``""``)."""
        if self._stats is None and self._obs is not None and not self._done:
            self._stats = self._obs.front(name if isinstance(name, str) else "", self._protocol)
            self._stats.begin()

    def fail(self, e: BaseException) -> None:
        self.status = e.http_status if isinstance(e, InferenceError) else 500

    def end(self, status: int | None = None) -> None:
        if self._done:
            return
        if self._stats is None:
            self.model("")
        self._done = True
        if self._stats is not None:
            self._stats.end(self.status if status is None else status, perf_counter_ns() - self._t0)
