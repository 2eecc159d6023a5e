"""How one pod reaches another: the interface the fleet is handed, and the errors it raises.

The server implements it (gRPC for infer, streams and copies; raw HTTP for REST relays);
tests hand in a stand-in. A transport turns its own failures into these types, so the
fleet's decisions never look at a wire format or a status code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from meshserve.modelmesh.store import PodRecord
from meshserve.protocol.errors import ModelNotReady, ServerNotReady

T = TypeVar("T")

# One request's way to a pod: ``forward(pod, timeout, why)``; ``why`` is "forwarded" (the
# pod holds a copy), "miss" (the pod was chosen to load the model) or "copy".
Forward = Callable[[PodRecord, float, str], Awaitable[T]]


class Unreachable(Exception):
    """The pod did not answer (refused, reset, its channel closed): skip it for a while."""


class CopyGone(ModelNotReady):
    """A forwarded hit reached a pod whose copy has just gone (evicted, unloaded)."""


class DeadlineExceeded(ServerNotReady):
    """The pod took the whole deadline: the request's time is spent, so it is not retried."""


class Transport(Protocol):
    """Forward a request to another pod, or ask it for a copy. ``why`` travels with the
    call so the receiving pod serves it itself (never routes it again). Failures raise
    :class:`Unreachable`, :class:`CopyGone`, :class:`DeadlineExceeded` or the pod's own
    :class:`~meshserve.protocol.errors.InferenceError` (``CapacityExhausted`` with its
    ``retry_after``, ``ModelLoadError``, ...). Requests and answers are opaque here."""

    async def infer(self, pod: PodRecord, request: Any, timeout: float, why: str) -> Any:
        """One request, one answer."""

    async def stream(self, pod: PodRecord, request: Any, timeout: float, why: str) -> AsyncIterator[Any]:
        """Returns once the first answer is in (within ``timeout``): an iterator of the
        answers from there on; closing it cancels the call."""

    async def relay(self, pod: PodRecord, request: Any, timeout: float, why: str) -> Any:
        """A REST request passed on as it came; returns once the answer has begun (its body
        is the caller's to relay: from there on it is the request's answer, never retried)."""

    async def load(self, pod: PodRecord, key: str, timeout: float) -> None:
        """Ask ``pod`` to load a copy of ``key``."""

    def forget(self, pod_id: str) -> None:
        """The pod stopped answering: drop what is kept open to it (calls on it may finish)."""

    async def close(self) -> None: ...


def cancelled_here() -> bool:
    """A CancelledError is this task's own cancellation (not a call cancelled with its channel)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return cancelling is None or cancelling() > 0
