"""What travels between pods: the call's markers, remote errors as the fleet's typed
errors, this pod's address and the token pods call each other with."""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

import grpc
from meshserve.modelmesh.fleet.routing import ROUTE
from meshserve.modelmesh.fleet.transport import CopyGone, DeadlineExceeded, Unreachable
from meshserve.modelmesh.store import CoordinationStore, PodRecord
from meshserve.protocol import errors
from meshserve.protocol.errors import InferenceError

# A forwarded call's answer is decoded by the protocol's codec, beside its encoder (re-exported here).
from meshserve.protocol.grpc.codec import decode_infer_response

if TYPE_CHECKING:
    from meshserve.server.settings import Settings

__all__ = [
    "ERROR_KEY", "MARKER", "RETRY_AFTER_KEY", "ROUTE", "CopyGone", "decode_infer_response", "remote_error",
]  # fmt: skip

# Metadata on a forwarded call: serve it here, do not route it again. Its value says why it
# came: "forwarded" (the sender saw a copy here; if it is gone, say so and the sender tries
# elsewhere), "miss" (this pod was chosen to load the model) or "copy" (load a copy).
MARKER = "meshserve-forwarded"
ERROR_KEY = "meshserve-error"  # trailing metadata: the InferenceError class a pod answered with
RETRY_AFTER_KEY = "meshserve-retry-after"  # and, for CapacityExhausted, seconds until it expects room


def remote_error(e: grpc.aio.AioRpcError) -> Exception:
    """A failed forwarded call as the fleet's typed errors: the pod's own error (it names
    its class), the deadline spent, or the pod unreachable."""
    trailer = e.trailing_metadata() or ()
    kind = next((v for k, v in trailer if k == ERROR_KEY), None)
    if kind is not None:
        cls = CopyGone if kind == "CopyGone" else getattr(errors, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, InferenceError)):
            cls = InferenceError
        error = cls(e.details() or kind)
        if isinstance(error, errors.CapacityExhausted):  # when that pod expects room
            after = next((v for k, v in trailer if k == RETRY_AFTER_KEY), "")
            with contextlib.suppress(ValueError):
                seconds = float(after)
                if 0.0 <= seconds <= 3600.0:  # not NaN, not absurd
                    error.retry_after = seconds
        return error
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("the pod holding the model did not answer within the deadline")
    return Unreachable(f"{e.code().name}: {e.details()}")


def pod_record(settings: Settings, capacity_bytes: int | None) -> PodRecord:
    """This pod as the others see it."""
    host = _advertised_host(settings)
    return PodRecord(
        id=settings.pod_id or f"{socket.gethostname()}-{settings.grpc_port}",
        http=f"{host}:{settings.http_port}",
        grpc=f"{host}:{settings.grpc_port}",
        capacity=capacity_bytes or 0,
    )


def _advertised_host(settings: Settings) -> str:
    if settings.advertise_host:
        return settings.advertise_host
    if settings.host not in ("0.0.0.0", "::", ""):
        return settings.host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def auth_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
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


def forwarded(context: grpc.aio.ServicerContext) -> str | None:
    """Why another pod sent this call here, or None for a client's call."""
    return next((v for k, v in context.invocation_metadata() or () if k == MARKER), None)


def store_lease(store: CoordinationStore, settings: Settings) -> float:
    return float(getattr(store, "lease_ttl", settings.fleet_lease_seconds))
