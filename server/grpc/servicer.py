"""``inference.GRPCInferenceService`` over the data plane (grpc.aio)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from protocol.errors import InferenceError, InvalidInput
from protocol.grpc import grpc_service_pb2 as pb
from protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from protocol.grpc.codec import decode_infer_request, encode_infer_response
from server.dataplane import DataPlane

log = logging.getLogger(__name__)

STREAM_WINDOW = 64  # requests of one stream in flight at once


async def _abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
    if isinstance(e, InferenceError):
        # The error's class rides in a trailer: a pod that forwarded the call tells a
        # load failure or a full pod (try another) from the model's own answer.
        await context.abort(
            getattr(grpc.StatusCode, e.grpc_code), e.message, trailing_metadata=(("meshserve-error", type(e).__name__),)
        )
    log.exception("unexpected error in gRPC handler")
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error")


def _repository_config(params: dict) -> dict | None:
    """The ``config`` load parameter (a JSON settings document), if given."""
    p = params.get("config")
    if p is None:
        return None
    from protocol.rest_codec import loads_object

    which = p.WhichOneof("parameter_choice")
    if which not in ("string_param", "bytes_param"):
        raise InvalidInput("the 'config' parameter must be a string holding a JSON object")
    raw = getattr(p, which)
    return loads_object(raw.encode() if isinstance(raw, str) else raw, "parameters.config")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

    async def ServerLive(self, request, context):  # noqa: N802 - names fixed by the proto
        return pb.ServerLiveResponse(live=self.dp.live())

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.dp.ready())

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            return pb.ModelReadyResponse(ready=self.dp.model_ready(request.name, request.version or None))
        except Exception as e:
            await _abort(context, e)

    async def ServerMetadata(self, request, context):  # noqa: N802
        meta = self.dp.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            meta = self.dp.model_metadata(request.name, request.version or None)
        except Exception as e:
            await _abort(context, e)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def _infer(self, request: pb.ModelInferRequest, context=None) -> pb.ModelInferResponse:
        if self.dp.fleet is not None and context is not None:
            return await self.dp.fleet.grpc_infer(request, context)
        decoded = decode_infer_request(request)
        response = await self.dp.infer(decoded)
        # Answer in the form the client used: raw contents for raw requests.
        return encode_infer_response(response, raw=bool(request.raw_input_contents))

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            return await self._infer(request, context)
        except Exception as e:
            await _abort(context, e)

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests are pipelined (up to STREAM_WINDOW at once); answers keep request order.
        A failed request yields an ``error_message`` and the stream goes on, as Triton does."""
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._infer(request, context)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                try:
                    yield pb.ModelStreamInferResponse(infer_response=await task)
                except InferenceError as e:
                    yield pb.ModelStreamInferResponse(error_message=e.message)
                except Exception:
                    log.exception("stream infer failed")
                    yield pb.ModelStreamInferResponse(error_message="internal server error")
        finally:
            reader.cancel()

    async def RepositoryIndex(self, request, context):  # noqa: N802
        Index = pb.RepositoryIndexResponse.ModelIndex
        rows = self.dp.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[Index(name=r["name"], version=r["version"], state=r["state"], reason=r["reason"]) for r in rows]
        )

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        try:
            fleet = self.dp.fleet
            if fleet is not None and any(k == "meshserve-forwarded" for k, _ in context.invocation_metadata() or ()):
                await fleet.internal_load(request.model_name)  # a copy another pod asked for
                return pb.RepositoryModelLoadResponse()
            await self.dp.load_model(request.model_name, _repository_config(request.parameters))
        except Exception as e:
            await _abort(context, e)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        try:
            await self.dp.unload_model(request.model_name)
        except Exception as e:
            await _abort(context, e)
        return pb.RepositoryModelUnloadResponse()


def build_grpc_server(dataplane: DataPlane, max_message_bytes: int) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane), server)
    return server
