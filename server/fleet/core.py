"""The Fleet as the server sees it: the mesh's objects (``meshserve.modelmesh.fleet``)
behind the data plane's fronts. Decisions are the mesh's; this module turns requests into
what the transport carries and answers into what the fronts send."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from meshserve.modelmesh import CacheEntry, ModelState
from meshserve.modelmesh.fleet import Forward, Lifecycle, Membership, Router
from meshserve.modelmesh.fleet.routing import ROUTE, T
from meshserve.modelmesh.fleet.transport import CopyGone
from meshserve.protocol.errors import InferenceError, ModelNotFound, ServerNotReady
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc.codec import (
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
)
from meshserve.protocol.types import InferenceRequest, InferenceResponse
from meshserve.server.fleet import view
from meshserve.server.fleet.transport import PodTransport
from meshserve.server.fleet.wire import forwarded

if TYPE_CHECKING:
    from meshserve.modelmesh.store import CoordinationStore
    from meshserve.server.dataplane import DataPlane
    from meshserve.server.repository import ModelRepository

log = logging.getLogger(__name__)


class Fleet:
    """One pod's part of the mesh, built by the composition root from its parts."""

    def __init__(
        self,
        dp: DataPlane,
        store: CoordinationStore,
        members: Membership,
        router: Router,
        lifecycle: Lifecycle,
        transport: PodTransport,
    ) -> None:
        self.dp = dp
        self.cache = dp.cache
        self.store = store
        self.members = members
        self.router = router
        self.lifecycle = lifecycle
        self.transport = transport
        self.view = members.view
        self.id = members.id
        self.counts = router.counts

    # -- the mesh's state, for the fronts --------------------------------------------
    def serves_here(self, entry: CacheEntry | None) -> bool:
        return self.router.serves_here(entry)

    def ready_elsewhere(self, key: str) -> bool:
        return self.members.ready_elsewhere(key)

    async def start(self) -> None:
        await self.lifecycle.start()

    async def leave(self) -> None:
        await self.lifecycle.leave()

    async def close(self) -> None:
        """Deregister, then close the channels to the other pods."""
        await self.lifecycle.close()
        await self.transport.close()

    async def serve_on(
        self, key: str, local: Callable[[], Awaitable[T]], forward: Forward[T], timeout: float | None
    ) -> T:
        """Serve here or with any transport (REST relays go to the pod's HTTP address)."""
        return await self.router.serve(key, local, forward, timeout)

    # -- the fronts --------------------------------------------------------------------
    async def infer(self, request: InferenceRequest, key: str) -> InferenceResponse:
        """REST (and any decoded request): here, or forwarded as a gRPC call."""
        entry = self.cache.get(key)
        if self.router.serves_here(entry):
            self.counts["local"] += 1
            ROUTE.set("local")
            return await self.dp.local_infer(request, key)

        async def forward(pod: Any, timeout: float, why: str) -> InferenceResponse:
            msg = encode_infer_request(request)
            msg.model_name = entry.spec.name
            msg.model_version = entry.spec.version or ""
            return decode_infer_response(await self.transport.infer(pod, msg, timeout, why))

        return await self.router.serve(key, lambda: self.dp.local_infer(request, key), forward, None)

    async def grpc_infer(self, msg: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        """gRPC: a request held elsewhere goes on as the very message that came in."""
        key = self.dp.repository.resolve(msg.model_name, msg.model_version or None)
        entry = self.cache.get(key)
        raw = bool(msg.raw_input_contents)
        limit = self.dp.settings.max_bytes_elements

        async def local() -> pb.ModelInferResponse:
            return encode_infer_response(await self.dp.local_infer(decode_infer_request(msg, limit), key), raw=raw)

        if self.router.serves_here(entry):
            self.counts["local"] += 1
            return await local()
        why = forwarded(context)
        if why is not None:  # another pod routed it here: serve it here, or say why not
            if why == "forwarded" and entry.state is not ModelState.LOADING and entry.state is not ModelState.READY:
                raise CopyGone(f"model {key!r} is no longer held by pod {self.id}")
            return await local()

        async def forward(pod: Any, timeout: float, why: str) -> pb.ModelInferResponse:
            return await self.transport.infer(pod, msg, timeout, why)

        return await self.router.serve(key, local, forward, context.time_remaining())

    async def grpc_stream(
        self,
        msg: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext,
        local: Callable[[], AsyncIterator[pb.ModelStreamInferResponse]],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One request of ``ModelStreamInfer`` to a token-streaming model: here (``local``),
        or passed on as the very message to a holder, whose responses are relayed as they
        come. Another pod is tried only until its first response is in."""
        key = self.dp.repository.resolve(msg.model_name, msg.model_version or None)
        if self.router.serves_here(self.cache.get(key)) or forwarded(context) is not None:
            async for response in local():
                yield response
            return

        async def here() -> None:
            return None

        async def forward(pod: Any, timeout: float, why: str) -> AsyncIterator[pb.ModelStreamInferResponse]:
            return await self.transport.stream(pod, msg, timeout, why)

        relayed = await self.router.serve(key, here, forward, None)
        if relayed is None:  # placed here
            async for response in local():
                yield response
            return
        async with contextlib.aclosing(relayed):
            async for response in relayed:
                yield response

    async def internal_load(self, key: str) -> None:
        """Another pod asks this one for a copy (scale-up, hand-off)."""
        if self.members.leaving:
            raise ServerNotReady("this pod is shutting down")
        if self.cache.get(key) is None:
            raise ModelNotFound(f"model {key!r} is not registered")
        await self.cache.load(key)

    # -- the fleet view ------------------------------------------------------------------
    def index_rows(self, ready_only: bool = False) -> list[dict[str, Any]]:
        return view.index_rows(self.cache, self.members, ready_only)

    def metrics(self) -> list[Any]:
        """Prometheus families for the fleet (read at scrape time)."""
        return view.metrics(self.router, self.members, self.store)

    def pods_summary(self) -> list[dict[str, Any]]:
        return self.members.summary()


def describe(entry: CacheEntry) -> dict[str, Any]:
    """A model's registration as the store keeps it: its model-settings document."""
    return entry.spec.model_dump(mode="json", exclude_defaults=True)


def registrar(repository: ModelRepository) -> Callable[[str, dict[str, Any]], None]:
    """Registers here a model another pod registered (a bad document is logged, not fatal)."""

    def register(key: str, doc: dict[str, Any]) -> None:
        from meshserve.server.model_settings import parse_model_settings

        try:
            repository.register(parse_model_settings(doc))
        except InferenceError as e:
            log.warning("fleet registration %s ignored: %s", key, e.message)

    return register
