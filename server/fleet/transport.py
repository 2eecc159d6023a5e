"""The fleet's transport: gRPC for infer, token streams and copies (kept-alive channels),
raw HTTP for REST requests relayed as they came (generate, OpenAI: kept-alive connections
to the pod's REST port); the forwarded call's marker and token; failures turned into the
fleet's typed errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NamedTuple

import grpc
from meshserve.modelmesh.fleet.transport import Unreachable
from meshserve.modelmesh.store import PodRecord
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from meshserve.server.fleet.wire import MARKER, remote_error
from meshserve.server.upstream import HttpPool, UpstreamResponse, tcp_connect

MARKER_B = MARKER.encode()
CONNECT_TIMEOUT = 5.0


class RestRequest(NamedTuple):
    """A REST request as it came: passed on byte for byte (the holder answers in its own shapes)."""

    target: bytes  # path and query
    headers: list[tuple[bytes, bytes]]
    body: bytes


class PodTransport:
    """:class:`meshserve.modelmesh.fleet.Transport`: ``infer`` and ``stream`` pass a
    ``ModelInferRequest`` on as it came; ``relay`` a :class:`RestRequest`."""

    def __init__(self, max_message_bytes: int, close_grace: float, auth: tuple[tuple[str, str], ...] = ()) -> None:
        self.max_message_bytes = max_message_bytes
        self.close_grace = close_grace
        self._metadata = {why: ((MARKER, why), *auth) for why in ("copy", "forwarded", "miss")}
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]] = {}
        self._pools: dict[str, HttpPool] = {}  # by the pod's REST address

    def stub(self, pod: PodRecord) -> pb_grpc.GRPCInferenceServiceStub:
        got = self._channels.get(pod.id)
        if got is None or got[0].get_state() is grpc.ChannelConnectivity.SHUTDOWN:
            limit = self.max_message_bytes
            channel = grpc.aio.insecure_channel(
                pod.grpc,
                options=[
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                    ("grpc.keepalive_time_ms", 30000),
                    ("grpc.enable_retries", 0),
                ],
            )
            got = self._channels[pod.id] = (channel, pb_grpc.GRPCInferenceServiceStub(channel))
        return got[1]

    async def infer(
        self, pod: PodRecord, request: pb.ModelInferRequest, timeout: float, why: str
    ) -> pb.ModelInferResponse:
        try:
            return await self.stub(pod).ModelInfer(request, timeout=timeout, metadata=self._metadata[why])
        except grpc.aio.AioRpcError as e:
            raise remote_error(e) from None

    async def stream(
        self, pod: PodRecord, request: pb.ModelInferRequest, timeout: float, why: str
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        call = self.stub(pod).ModelStreamInfer(iter((request,)), metadata=self._metadata[why])
        try:
            first = await asyncio.wait_for(call.read(), timeout)
        except grpc.aio.AioRpcError as e:
            call.cancel()
            raise remote_error(e) from None
        except BaseException:
            call.cancel()
            raise
        return _relay(call, first)

    async def relay(self, pod: PodRecord, request: RestRequest, timeout: float, why: str) -> UpstreamResponse:
        """Returns once the answer's head is in; its body is the caller's to relay. No
        deadline of its own: a non-streamed generate answers only once it is done."""
        headers = [(k, v) for k, v in request.headers if k != MARKER_B]
        headers.append((MARKER_B, why.encode()))
        pool = self._pools.get(pod.http)
        if pool is None:
            pool = self._pools[pod.http] = HttpPool(tcp_connect(pod.http, CONNECT_TIMEOUT), pod.http.encode())
        try:
            return await pool.open(b"POST", request.target, headers, request.body)
        except OSError as e:  # refused, reset before an answer began
            raise Unreachable(f"{type(e).__name__}: {e}") from None

    async def load(self, pod: PodRecord, key: str, timeout: float) -> None:
        try:
            await self.stub(pod).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=key), timeout=timeout, metadata=self._metadata["copy"]
            )
        except grpc.aio.AioRpcError as e:
            raise remote_error(e) from None

    def forget(self, pod_id: str) -> None:
        channel = self._channels.pop(pod_id, None)
        if channel is not None:  # calls still on it end on their own (closing now would cancel them)
            asyncio.ensure_future(channel[0].close(grace=self.close_grace))

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close()


async def _relay(call: grpc.aio.StreamStreamCall, response: object) -> AsyncIterator[pb.ModelStreamInferResponse]:
    try:
        while response is not grpc.aio.EOF:
            yield response  # type: ignore[misc]
            response = await call.read()
    finally:
        call.cancel()
