"""``inference.GRPCInferenceService`` over the data plane (grpc.aio)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from time import perf_counter_ns

import grpc
from meshserve.protocol.errors import CapacityExhausted, InferenceError, InvalidInput, RequestTimeout
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from meshserve.protocol.grpc.codec import decode_infer_request, encode_infer_response, serialize_infer_response
from meshserve.server import tracing
from meshserve.server.dataplane import DataPlane
from meshserve.server.llm.grpc_stream import stream_llm
from meshserve.server.llm.service import is_llm_model
from meshserve.server.observe import FrontStats, clean_request_id, log_access, new_request_id
from meshserve.server.security import build_auth, grpc_auth_interceptor, redact

log = logging.getLogger(__name__)

STREAM_WINDOW = 64  # requests of one stream in flight at once
GRPC_MAX_STREAMS = 256  # concurrent calls on one connection (HTTP/2 streams)
GRPC_IDLE_MS = 5 * 60 * 1000  # a connection with no call for this long is closed (GOAWAY)
GRPC_KEEPALIVE_MS = 2 * 60 * 1000


async def _abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
    if isinstance(e, InferenceError):
        # The error's class rides in a trailer: a pod that forwarded the call tells a
        # load failure or a full pod (try another) from the model's own answer.
        trailer: tuple[tuple[str, str], ...] = (("meshserve-error", type(e).__name__),)
        if isinstance(e, CapacityExhausted):  # when room is likely, for the pod that forwarded it
            trailer += (("meshserve-retry-after", f"{e.retry_after:.3f}"),)
        await context.abort(getattr(grpc.StatusCode, e.grpc_code), redact(e.message), trailing_metadata=trailer)
    log.exception("unexpected error in gRPC handler")
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error")


def _repository_config(params: dict) -> dict | None:
    """The ``config`` load parameter (a JSON settings document), if given."""
    p = params.get("config")
    if p is None:
        return None
    from meshserve.protocol.rest_codec import loads_object

    which = p.WhichOneof("parameter_choice")
    if which not in ("string_param", "bytes_param"):
        raise InvalidInput("the 'config' parameter must be a string holding a JSON object")
    raw = getattr(p, which)
    return loads_object(raw.encode() if isinstance(raw, str) else raw, "parameters.config")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane
        self.obs = dataplane.observe
        self.timeout = dataplane.settings.request_timeout_seconds
        self._stats: dict[str, FrontStats] = self.obs.kept("grpc") if self.obs is not None else {}

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
        decoded = decode_infer_request(request, self.dp.settings.max_bytes_elements)
        response = await self.dp.infer(decoded)
        # Answer in the form the client used: raw contents for raw requests.
        return encode_infer_response(response, raw=len(request.raw_input_contents) > 0)

    async def _infer_wire(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse | bytes:
        """A unary call's answer, as its wire bytes when served here (see ``_wire``)."""
        if self.dp.fleet is not None:
            return await self.dp.fleet.grpc_infer(request, context)
        decoded = decode_infer_request(request, self.dp.settings.max_bytes_elements)
        response = await self.dp.infer(decoded)
        return serialize_infer_response(response, len(request.raw_input_contents) > 0)

    async def _traced_infer(
        self, request: pb.ModelInferRequest, traceparent: str | None, context
    ) -> pb.ModelInferResponse | bytes:
        tracer = tracing.TRACER
        with tracing.request_span(f"infer {request.model_name}", traceparent, "grpc", request.model_name):
            if self.dp.fleet is not None:  # routed through the fleet: one span for the whole call
                return await self._infer_wire(request, context)
            with tracer.start_as_current_span("decode"):
                decoded = decode_infer_request(request, self.dp.settings.max_bytes_elements)
            response = await self.dp.infer(decoded)
            with tracer.start_as_current_span("encode"):
                return serialize_infer_response(response, len(request.raw_input_contents) > 0)

    async def ModelInfer(self, request, context):  # noqa: N802
        t0 = perf_counter_ns()
        name = request.model_name
        stats = self._stats.get(name) or (self.obs.front(name, "grpc") if self.obs is not None else None)
        if stats is not None:
            stats.in_flight += 1  # stats.begin(), without the call
        rid = traceparent = None
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id":
                rid = value
            elif key == "traceparent":
                traceparent = value
        rid = new_request_id() if rid is None else clean_request_id(rid)
        context.set_trailing_metadata((("x-request-id", rid),))
        code = "OK"
        try:
            # The tighter of the server's timeout and the client's deadline.
            timeout = self.timeout
            left = context.time_remaining()
            if left is not None and (timeout is None or left < timeout):
                timeout = left
            if tracing.TRACER is None:
                work = self._infer_wire(request, context)
            else:
                work = self._traced_infer(request, traceparent, context)
            if timeout is None:
                return await work
            try:
                async with asyncio.timeout(timeout):
                    return await work
            except TimeoutError:
                raise RequestTimeout(f"request not served within {timeout:.3g}s") from None
        except Exception as e:
            code = e.grpc_code if isinstance(e, InferenceError) else "INTERNAL"
            await _abort(context, e)
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            elapsed = perf_counter_ns() - t0
            if stats is not None:
                stats.end(code, elapsed)
            log_access(rid, "grpc", "infer", name, code, elapsed)

    def _local(self, name: str) -> bool:
        return True

    async def _stream_one(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        """One request of a stream, counted like a unary one (by the worker that serves it)."""
        stats = self.obs.front(request.model_name, "grpc") if self.obs and self._local(request.model_name) else None
        if stats is None:
            return await self._infer(request, context)
        t0 = perf_counter_ns()
        stats.begin()
        code = "OK"
        try:
            return await self._infer(request, context)
        except InferenceError as e:
            code = e.grpc_code
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            stats.end(code, perf_counter_ns() - t0)

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
                        source, task = _pumped(self._stream_llm(request, context))
                        started[:] = [t for t in started if not t.done()]
                        started.append(task)
                    else:
                        source = asyncio.ensure_future(self._stream_one(request, context))
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
                    yield pb.ModelStreamInferResponse(error_message=redact(e.message))
                except Exception:
                    log.exception("stream infer failed")
                    yield pb.ModelStreamInferResponse(error_message="internal server error")
        finally:
            reader.cancel()
            for task in started:
                task.cancel()

    def _stream_llm(self, request: pb.ModelInferRequest, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """A language model's responses to one request of a stream (tokens as they come),
        in a fleet from the pod that holds the model."""
        if self.dp.fleet is None:
            return stream_llm(self.dp, request)
        return self._fleet_stream(request, context)

    async def _fleet_stream(self, request: pb.ModelInferRequest, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            async for response in self.dp.fleet.grpc_stream(request, context, lambda: stream_llm(self.dp, request)):
                yield response
        except InferenceError as e:
            yield pb.ModelStreamInferResponse(error_message=redact(e.message))

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


def connection_options(settings) -> list[tuple[str, int]]:
    """The REST front's connection bounds, for gRPC: headers (metadata) size, a deadline to
    finish the handshake, open connections, streams per connection, idle and dead peers."""
    options = [
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_seconds * 1000)),
        ("grpc.max_concurrent_streams", GRPC_MAX_STREAMS),
        ("grpc.max_connection_idle_ms", GRPC_IDLE_MS),
        ("grpc.keepalive_time_ms", GRPC_KEEPALIVE_MS),  # ping a quiet client; no answer in 20 s: gone
        ("grpc.keepalive_timeout_ms", 20_000),
    ]
    if settings.max_connections is not None:
        options.append(("grpc.max_allowed_incoming_connections", settings.max_connections))
    return options


def build_grpc_server(
    dataplane: DataPlane, max_message_bytes: int, reuse_port: bool = False, router=None, peer: bool = False
) -> grpc.aio.Server:
    """``router``: forward calls for other workers' models; ``peer``: the private server
    other workers forward to (they checked the credentials)."""
    settings = dataplane.settings
    auth = None if peer else build_auth(settings)
    server = grpc.aio.server(
        interceptors=[grpc_auth_interceptor(auth)] if auth is not None else None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *connection_options(settings),
        ],
    )
    servicer = InferenceServicer(dataplane) if router is None else RoutingServicer(dataplane, router)
    add_servicer(servicer, server)
    return server


def _wire(response: pb.ModelInferResponse | bytes) -> bytes:
    """ModelInfer's serializer: an answer already in wire bytes goes as it is."""
    return response if type(response) is bytes else response.SerializeToString()


class _Handlers:
    """Stands in for the server to take the generated code's method table."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The generated ``add_..._to_server``, with ModelInfer answering in wire bytes (see
    ``serialize_infer_response``) or a message (a forwarded answer)."""
    table = _Handlers()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, table)
    handlers = dict(table.handlers)
    handlers["ModelInfer"] = handlers["ModelInfer"]._replace(response_serializer=_wire)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(table.service, handlers),))
    server.add_registered_method_handlers(table.service, handlers)


_PASSED_ON = ("authorization", "x-api-key", "x-request-id", "traceparent", "tracestate")


class RoutingServicer(InferenceServicer):
    """One of several workers: calls for a model another worker owns go to that worker
    (server/workers.py) over its private socket; the message is passed on as it is."""

    def __init__(self, dataplane: DataPlane, router) -> None:
        super().__init__(dataplane)
        self.router = router
        self._calls: dict[tuple[int, str, type | None], grpc.aio.UnaryUnaryMultiCallable] = {}
        self._streams: dict[int, grpc.aio.StreamStreamMultiCallable] = {}

    def _call(self, owner: int, method: str, response_cls: type | None) -> grpc.aio.UnaryUnaryMultiCallable:
        """``response_cls`` None: the answer stays in its wire bytes (passed on as it is)."""
        call = self._calls.get((owner, method, response_cls))
        if call is None:
            call = self._calls[(owner, method, response_cls)] = self.router.channel(owner).unary_unary(
                f"/inference.GRPCInferenceService/{method}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=None if response_cls is None else response_cls.FromString,
            )
        return call

    async def _forward(self, name: str, method: str, request, response_cls, context):
        owner = self.router.owner(name)
        metadata = tuple((k, v) for k, v in context.invocation_metadata() or () if k in _PASSED_ON)
        call = self._call(owner, method, response_cls)(request, metadata=metadata, timeout=context.time_remaining())
        try:
            response = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            trailing = e.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            await context.abort(e.code(), e.details() or "")
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        return response

    def _local(self, name: str) -> bool:
        return self.router.mine(name)

    async def ModelInfer(self, request, context):  # noqa: N802
        if not self.router.serve_here(request.model_name, request.model_version or None):
            # The owner's answer goes back in its wire bytes (ModelInfer's serializer passes them).
            return await self._forward(request.model_name, "ModelInfer", request, None, context)
        return await super().ModelInfer(request, context)

    async def _infer(self, request: pb.ModelInferRequest, context=None) -> pb.ModelInferResponse:
        if self.router.serve_here(request.model_name, request.model_version or None):
            return await super()._infer(request, context)
        call = self._call(self.router.owner(request.model_name), "ModelInfer", pb.ModelInferResponse)
        try:
            return await call(request)
        except grpc.aio.AioRpcError as e:
            raise InferenceError(e.details() or str(e.code())) from None

    def _stream_llm(self, request: pb.ModelInferRequest, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        if self.router.mine(request.model_name):
            return super()._stream_llm(request, context)
        return self._forward_stream(request, context)

    async def _forward_stream(
        self, request: pb.ModelInferRequest, context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One request's token stream from the owner worker, response by response as it
        sends them; closing this (the client went away) cancels the owner's call."""
        owner = self.router.owner(request.model_name)
        stream = self._streams.get(owner)
        if stream is None:
            stream = self._streams[owner] = self.router.channel(owner).stream_stream(
                "/inference.GRPCInferenceService/ModelStreamInfer",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ModelStreamInferResponse.FromString,
            )
        metadata = tuple((k, v) for k, v in context.invocation_metadata() or () if k in _PASSED_ON)
        call = stream(iter((request,)), metadata=metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as e:
            log.warning("worker %d: stream call failed: %s", owner, e.code())
            yield pb.ModelStreamInferResponse(error_message=f"the worker serving this model ({owner}) is unavailable")
        finally:
            call.cancel()

    async def ModelReady(self, request, context):  # noqa: N802
        if not self.router.mine(request.name):
            return await self._forward(request.name, "ModelReady", request, pb.ModelReadyResponse, context)
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request, context):  # noqa: N802
        if not self.router.mine(request.name):
            return await self._forward(request.name, "ModelMetadata", request, pb.ModelMetadataResponse, context)
        return await super().ModelMetadata(request, context)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        if not self.router.mine(request.model_name):
            r = pb.RepositoryModelLoadResponse
            answer = await self._forward(request.model_name, "RepositoryModelLoad", request, r, context)
        else:
            answer = await super().RepositoryModelLoad(request, context)
        await self._sync(request.model_name, "load", request, context)
        return answer

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        if not self.router.mine(request.model_name):
            r = pb.RepositoryModelUnloadResponse
            answer = await self._forward(request.model_name, "RepositoryModelUnload", request, r, context)
        else:
            answer = await super().RepositoryModelUnload(request, context)
        await self._sync(request.model_name, "unload", request, context)
        return answer

    async def _sync(self, name: str, action: str, request, context) -> None:
        """The owner took the change (a failure aborted before this): the other workers
        drop their copies, as for REST (server/worker_copies.py)."""
        body = b""
        p = request.parameters.get("config") if action == "load" else None
        if p is not None:
            which = p.WhichOneof("parameter_choice")
            raw = getattr(p, which) if which in ("string_param", "bytes_param") else None
            if raw is not None:
                text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
                from meshserve.protocol.rest_codec import dumps

                body = dumps({"parameters": {"config": text}})
        headers = [(b"content-type", b"application/json")]
        for key, value in context.invocation_metadata() or ():
            if key in ("authorization", "x-api-key"):
                headers.append((key.encode(), value.encode()))
        await self.router.sync(name, action, body, headers)

    async def ServerReady(self, request, context):  # noqa: N802
        """Ready when every worker is (each answers for its own models)."""
        if not self.dp.ready():
            return pb.ServerReadyResponse(ready=False)
        for i, _ in self.router.peers():
            try:
                theirs = await self._call(i, "ServerReady", pb.ServerReadyResponse)(request, timeout=5)
            except grpc.aio.AioRpcError:
                return pb.ServerReadyResponse(ready=False)
            if not theirs.ready:
                return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    async def RepositoryIndex(self, request, context):  # noqa: N802
        own = await super().RepositoryIndex(request, context)
        rows = [m for m in own.models if self.router.mine(m.name)]
        for i, _ in self.router.peers():
            call = self._call(i, "RepositoryIndex", pb.RepositoryIndexResponse)
            try:
                theirs = await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError:
                continue
            rows += [m for m in theirs.models if self.router.owner(m.name) == i]
        rows.sort(key=lambda m: (m.name, m.version))
        return pb.RepositoryIndexResponse(models=rows)
