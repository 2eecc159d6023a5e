"""What travels between pods: the call's markers, remote errors, the forwarded answer, auth."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
from typing import TYPE_CHECKING

import grpc
from meshserve.modelmesh import CacheEntry, ModelState
from meshserve.modelmesh.store import CoordinationStore
from meshserve.protocol import errors
from meshserve.protocol.errors import InferenceError, ModelNotReady, ServerNotReady

# A forwarded call's answer is decoded by the protocol's codec, beside its encoder (re-exported here).
from meshserve.protocol.grpc.codec import decode_infer_response  # noqa: F401

if TYPE_CHECKING:
    from meshserve.server.settings import Settings


# Metadata on a forwarded call: serve it here, do not route it again. Its value says why it
# came: "forwarded" (the sender saw a copy here; if it is gone, say so and the sender tries
# elsewhere) or "miss" (this pod was chosen to load the model).
MARKER = "meshserve-forwarded"
ERROR_KEY = "meshserve-error"  # trailing metadata: the InferenceError class a pod answered with
RETRY_AFTER_KEY = "meshserve-retry-after"  # and, for CapacityExhausted, seconds until it expects room
# How the last request of this task was served: local, forwarded (to a holder) or miss (a load).
ROUTE: contextvars.ContextVar[str] = contextvars.ContextVar("meshserve_route", default="local")


class _Unreachable(Exception):
    pass


class CopyGone(ModelNotReady):
    """A forwarded hit reached a pod whose copy has just gone (evicted, unloaded)."""


class _RemoteError(Exception):
    def __init__(self, kind: str, error: InferenceError) -> None:
        super().__init__(error.message)
        self.kind, self.error = kind, error


def _remote_error(e: grpc.aio.AioRpcError) -> Exception:
    """A failed forwarded call: the pod's own error (it names its class), or the pod is gone."""
    kind = next((v for k, v in (e.trailing_metadata() or ()) if k == ERROR_KEY), None)
    if kind is not None:
        cls = CopyGone if kind == "CopyGone" else getattr(errors, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, InferenceError)):
            cls = InferenceError
        error = cls(e.details() or kind)
        if isinstance(error, errors.CapacityExhausted):  # when that pod expects room
            after = next((v for k, v in (e.trailing_metadata() or ()) if k == RETRY_AFTER_KEY), "")
            with contextlib.suppress(ValueError):
                seconds = float(after)
                if 0.0 <= seconds <= 3600.0:  # not NaN, not absurd
                    error.retry_after = seconds
        return _RemoteError(kind, error)
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerNotReady("the pod holding the model did not answer within the deadline")
    return _Unreachable(f"{e.code().name}: {e.details()}")


def _advertised_host(settings: Settings) -> str:
    if settings.advertise_host:
        return settings.advertise_host
    if settings.host not in ("0.0.0.0", "::", ""):
        return settings.host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _auth_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    """Pods call each other with the server's own token when one is configured
    (a production setting; absent here, nothing is added)."""
    token = getattr(settings, "auth_token", None)
    if token is not None and hasattr(token, "get_secret_value"):
        token = token.get_secret_value()
    path = getattr(settings, "auth_token_file", None)
    if not token and path:
        try:
            token = next((line.strip() for line in open(path) if line.strip()), None)
        except OSError:
            token = None
    return (("authorization", f"Bearer {token}"),) if token else ()


def _cancelled_here() -> bool:
    """A CancelledError is this task's own cancellation (not a call cancelled with its channel)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return cancelling is None or cancelling() > 0


def _message(e: Exception) -> str:
    return e.message if isinstance(e, InferenceError) else str(e)


def _load_failed_here(entry: CacheEntry | None) -> bool:
    return entry is not None and entry.state is ModelState.FAILED


def _forwarded(context: grpc.aio.ServicerContext) -> str | None:
    """Why another pod sent this call here, or None for a client's call."""
    return next((v for k, v in context.invocation_metadata() or () if k == MARKER), None)


def store_lease(store: CoordinationStore, settings: Settings) -> float:
    return float(getattr(store, "lease_ttl", settings.fleet_lease_seconds))
