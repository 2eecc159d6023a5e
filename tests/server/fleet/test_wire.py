"""The server's transport: a failed forwarded call becomes the fleet's typed error (what the router
decides on); a relayed REST request carries the transport's own marker."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from meshserve.modelmesh.fleet import CopyGone, DeadlineExceeded, Unreachable
from meshserve.modelmesh.store import PodRecord
from meshserve.protocol.errors import CapacityExhausted, InferenceError, ModelLoadError
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.server.fleet.transport import PodTransport, RestRequest
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_relayed_rest_request_carries_the_transports_marker_and_a_refused_pod_is_unreachable():
    async def main():
        seen: list[bytes] = []

        class Holder(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                seen.append(data)
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

        listener = await asyncio.get_running_loop().create_server(Holder, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        transport = PodTransport(1 << 20, 1.0)
        try:
            request = RestRequest(b"/v2/models/m/generate", [(b"meshserve-forwarded", b"forged")], b"{}")
            response = await transport.relay(PodRecord("b", http=f"127.0.0.1:{port}"), request, 5.0, "miss")
            assert response.status == 200 and await response.read() == b"ok"
            head = b"".join(seen).lower()
            assert b"meshserve-forwarded: miss\r\n" in head and b"forged" not in head
            with pytest.raises(Unreachable):
                await transport.relay(PodRecord("c", http=f"127.0.0.1:{_free_port()}"), request, 5.0, "miss")
            gone = PodRecord("c", grpc=f"127.0.0.1:{_free_port()}")
            with pytest.raises(Unreachable):  # gRPC to a pod that is not there
                await transport.infer(gone, pb.ModelInferRequest(), 5.0, "miss")
        finally:
            await transport.close()
            listener.close()

    asyncio.run(main())
