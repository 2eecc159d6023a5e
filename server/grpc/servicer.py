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
from server.llm.grpc_stream import stream_llm
from server.llm.service import is_llm_model

log = logging.getLogger(__name__)

STREAM_WINDOW = 64  # requests of one stream in flight at once


async def _abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
    if isinstance(e, InferenceError):
        await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)
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

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        decoded = decode_infer_request(request)
        response = await self.dp.infer(decoded)
        # Answer in the form the client used: raw contents for raw requests.
        return encode_infer_response(response, raw=bool(request.raw_input_contents))

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            return await self._infer(request)
        except Exception as e:
            await _abort(context, e)

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests are pipelined (up to STREAM_WINDOW at once); answers keep request order.
        A failed request yields an ``error_message`` and the stream goes on, as Triton does.
        A language model's request may answer several times (token streaming, server/llm)."""
        pending: asyncio.Queue[asyncio.Task | AsyncIterator | None] = asyncio.Queue(STREAM_WINDOW)
        started: list[asyncio.Task] = []

        async def read() -> None:
            try:
                async for request in request_iterator:
                    if is_llm_model(self.dp, request.model_name, request.model_version or None):
                        source, task = _pumped(stream_llm(self.dp, request))
                        started[:] = [t for t in started if not t.done()]
                        started.append(task)
                    else:
                        source = asyncio.ensure_future(self._infer(request))
                    await pending.put(source)
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (source := await pending.get()) is not None:
                if not isinstance(source, asyncio.Task):
                    async for response in source:
                        yield response
                    continue
                try:
                    yield pb.ModelStreamInferResponse(infer_response=await source)
                except InferenceError as e:
                    yield pb.ModelStreamInferResponse(error_message=e.message)
                except Exception:
                    log.exception("stream infer failed")
                    yield pb.ModelStreamInferResponse(error_message="internal server error")
        finally:
            reader.cancel()
            for task in started:
                task.cancel()

    async def RepositoryIndex(self, request, context):  # noqa: N802
        Index = pb.RepositoryIndexResponse.ModelIndex
        rows = self.dp.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[Index(name=r["name"], version=r["version"], state=r["state"], reason=r["reason"]) for r in rows]
        )

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        try:
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


def _pumped(responses: AsyncIterator[pb.ModelStreamInferResponse]) -> tuple[AsyncIterator, asyncio.Task]:
    """Run ``responses`` now (so a stream's sequences decode together) and read them in order later."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for r in responses:
                queue.put_nowait(r)
        except Exception:
            log.exception("stream infer failed")
            queue.put_nowait(pb.ModelStreamInferResponse(error_message="internal server error"))
        finally:
            queue.put_nowait(None)

    task = asyncio.ensure_future(pump())

    async def read() -> AsyncIterator[pb.ModelStreamInferResponse]:
        while (r := await queue.get()) is not None:
            yield r

    return read(), task


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
