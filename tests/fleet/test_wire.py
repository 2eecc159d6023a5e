"""A failed forwarded gRPC call becomes the fleet's typed error (what the router decides on)."""

from __future__ import annotations

import grpc
from meshserve.modelmesh.fleet import CopyGone, DeadlineExceeded, Unreachable
from meshserve.protocol.errors import CapacityExhausted, InferenceError, ModelLoadError
from meshserve.server.fleet.wire import ERROR_KEY, RETRY_AFTER_KEY, remote_error


def _failed(code: grpc.StatusCode, details: str, *trailer: tuple[str, str]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailer), details)


def test_the_pods_own_error_comes_back_as_its_class():
    e = remote_error(_failed(grpc.StatusCode.INTERNAL, "loading failed", (ERROR_KEY, "ModelLoadError")))
    assert type(e) is ModelLoadError and e.message == "loading failed"
    gone = remote_error(_failed(grpc.StatusCode.UNAVAILABLE, "evicted", (ERROR_KEY, "CopyGone")))
    assert type(gone) is CopyGone
    odd = remote_error(_failed(grpc.StatusCode.UNKNOWN, "?", (ERROR_KEY, "NoSuchError")))
    assert type(odd) is InferenceError  # a class name that is not an error: no retry on it


def test_no_room_carries_when_that_pod_expects_some_and_absurd_values_are_dropped():
    full = (ERROR_KEY, "CapacityExhausted")
    e = remote_error(_failed(grpc.StatusCode.UNAVAILABLE, "full", full, (RETRY_AFTER_KEY, "2.500")))
    assert isinstance(e, CapacityExhausted) and e.retry_after == 2.5
    for bad in ("nan", "-1", "1e9", "soon"):
        e = remote_error(_failed(grpc.StatusCode.UNAVAILABLE, "full", full, (RETRY_AFTER_KEY, bad)))
        assert e.retry_after == CapacityExhausted("x").retry_after


def test_no_answer_is_unreachable_and_a_spent_deadline_is_not():
    assert isinstance(remote_error(_failed(grpc.StatusCode.UNAVAILABLE, "connection refused")), Unreachable)
    assert isinstance(remote_error(_failed(grpc.StatusCode.DEADLINE_EXCEEDED, "")), DeadlineExceeded)
