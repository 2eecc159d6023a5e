"""One exception type per failure; each knows its HTTP status and gRPC code.

The gRPC code is kept as the name of a ``grpc.StatusCode`` member so this
module does not import grpc.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error a client can see. The message is sent verbatim."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(InferenceError):
    """The request is malformed or does not fit the model."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class ModelNotFound(InferenceError):
    """No model (or version) of that name is registered."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class ModelNotReady(InferenceError):
    """The model exists but cannot serve now (loading, unloaded, failed)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class CapacityExhausted(ModelNotReady):
    """No room for the model: every resident model is in use, pinned or hot.
    ``retry_after``: seconds after which room is likely (REST sends it as Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(InferenceError):
    """The model's line of waiting requests is full: try again shortly (REST adds Retry-After)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ServerNotReady(InferenceError):
    """The server is starting or draining."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class PayloadTooLarge(InferenceError):
    """The request body exceeds the configured limit."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class Unauthenticated(InferenceError):
    """No or wrong credentials on a route that needs them."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class Forbidden(InferenceError):
    """Refused by the server's policy whoever asks (a repository load naming code or a path
    outside ``--model-dir``); the message says which setting would allow it."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class BodyTimeout(InferenceError):
    """The client did not send its whole body in time (a slow or stalled client)."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class RequestTimeout(InferenceError):
    """The server did not finish the request within the per-request timeout."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class ModelExecutionError(InferenceError):
    """The model itself raised; the only error that maps to 500."""

    http_status = 500
    grpc_code = "INTERNAL"


class ModelLoadError(InferenceError):
    """Loading the model failed; what was serving before keeps serving."""

    http_status = 500
    grpc_code = "INTERNAL"
