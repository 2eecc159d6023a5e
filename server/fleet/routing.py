"""Routing: serve here, forward to a holder, or place a model held nowhere; the REST and gRPC fronts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from meshserve.modelmesh import CacheEntry, ModelState
from meshserve.modelmesh.placement import rank_pods
from meshserve.modelmesh.store import PodRecord, StoreUnavailable
from meshserve.protocol.errors import (
    CapacityExhausted,
    InferenceError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    ServerNotReady,
)
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from meshserve.protocol.grpc.codec import decode_infer_request, encode_infer_request, encode_infer_response
from meshserve.protocol.types import InferenceRequest, InferenceResponse
from meshserve.server.fleet.wire import (
    ROUTE,
    CopyGone,
    _cancelled_here,
    _forwarded,
    _load_failed_here,
    _message,
    _remote_error,
    _RemoteError,
    _Unreachable,
    decode_infer_response,
)

T = TypeVar("T")

MAX_ATTEMPTS = 5


def _no_room_anywhere(key: str, room: dict[str, float], last: Exception | None) -> CapacityExhausted:
    """503 past the fleet's wait, with the soonest time any pod expects room."""
    after = max(1.0, min(room.values()) - time.monotonic())
    why = f": {_message(last)}" if last is not None else ""
    return CapacityExhausted(f"no pod has room for model {key!r} now ({len(room)} refused){why}", retry_after=after)


async def _wait_for_room(key: str, room: dict[str, float], give_up: float, last: Exception | None) -> str:
    """Every pod refused for room: sleep until the first expects some (within the bound), and
    name it; past the bound, 503."""
    first, at = min(room.items(), key=lambda kv: kv[1])
    if at > give_up:
        raise _no_room_anywhere(key, room, last)
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    del room[first]
    return first


class Routing:
    """Part of :class:`meshserve.server.fleet.Fleet` (its state is set in ``Fleet.__init__``)."""

    # -- routing -----------------------------------------------------------------
    def serves_here(self, entry: CacheEntry | None) -> bool:
        """The hot path: a model ready here is served here."""
        return entry is not None and entry.state is ModelState.READY and not self.left

    async def _route(
        self, key: str, exclude: set[str], gone: frozenset[str] | set[str] = frozenset()
    ) -> tuple[PodRecord | None, str]:
        """Where to send a request for ``key``: (None, kind) for here, else (pod, kind)."""
        entry = self.cache.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key!r} is not registered")
        here_ok = not self.left and self.id not in exclude
        if here_ok and (entry.state is ModelState.READY or entry.state is ModelState.LOADING):
            return None, "local" if entry.state is ModelState.READY else "miss"
        holders = [p for p in self._other_holders(key) if p not in exclude and p not in gone]
        if holders:
            awake = [p for p in holders if not self.view.pods[p].shutting_down] or holders
            return self.view.pods[random.choice(awake)], "forwarded"
        claim = self.view.claims.get(key)
        if claim is not None and claim.pod not in exclude and time.time() - claim.at < self._claim_age():
            if claim.pod == self.id and here_ok:
                return None, "miss"
            if claim.pod != self.id and self._alive(claim.pod):
                return self.view.pods[claim.pod], "miss"
        if not self.store.connected:
            raise ModelNotReady(
                f"model {key!r} is not loaded on any reachable pod and the fleet store is unreachable: "
                "new models are placed again once it returns"
            )
        retry_window = self.settings.load_retry_max_seconds
        failed = self.view.failures.get(key, {})
        now = time.time()
        candidates = [
            p
            for p in self.view.pods.values()
            if p.id not in exclude
            and self._alive(p.id)
            and not (p.id == self.id and not here_ok)
            and not (p.id in failed and now - failed[p.id].get("at", 0) < retry_window)
        ]
        need = self.cache._predict(entry, entry.spec)
        ranked = rank_pods(candidates, need)
        if not ranked:
            reasons = "; ".join(f"{p}: {f.get('reason', '')}" for p, f in failed.items())
            raise ModelNotReady(f"no pod can load model {key!r} now" + (f" (failed: {reasons})" if reasons else ""))
        best = ranked[0]
        try:
            owner = await self.store.claim(key, best)
            if owner != best.id and (owner in exclude or not self._alive(owner)):
                await self.store.release_claim(key)  # a claim of a pod that is gone
                owner = await self.store.claim(key, best)
        except StoreUnavailable as e:
            raise ModelNotReady(f"model {key!r} is not loaded anywhere and cannot be placed now: {e}") from None
        if owner == best.id:  # placed: count it until that pod's record says so
            best.models += 1
            best.used += need
        if owner == self.id:
            return None, "miss"
        pod = self.view.pods.get(owner)
        if pod is None:
            return best if best.id != self.id else None, "miss"
        return pod, "miss"

    def _claim_age(self) -> float:
        return (self.settings.load_timeout_seconds or 300.0) + 5.0

    async def serve(
        self,
        key: str,
        local: Callable[[], Awaitable[T]],
        forward: Callable[[pb_grpc.GRPCInferenceServiceStub, float, str], Awaitable[T]],
        timeout: float | None,
    ) -> T:
        """Serve a request for ``key`` here or on another pod (over gRPC), retrying on pods that fail."""
        return await self.serve_on(key, local, lambda pod, t, kind: forward(self._stub(pod)[1], t, kind), timeout)

    async def serve_on(
        self,
        key: str,
        local: Callable[[], Awaitable[T]],
        forward: Callable[[PodRecord, float, str], Awaitable[T]],
        timeout: float | None,
    ) -> T:
        """``serve`` with any transport: ``forward(pod, timeout, kind)`` reaches the pod
        itself (REST streams go to its HTTP address). An ``OSError`` from it (refused,
        reset before an answer began) counts as the pod being unreachable.

        A pod with no room (all its models young or busy) waits for room itself, up to
        ``capacity_wait_seconds``; that bound holds for the whole fleet, not per pod: once it
        has passed the request gets 503 with the soonest Retry-After any pod gave. When every
        pod refused sooner, the request waits for the pod whose room comes first and loads there.
        """
        started = time.monotonic()
        forward_timeout = self.settings.forward_timeout_seconds
        deadline = started + min(timeout or forward_timeout, forward_timeout)
        give_up = min(deadline, started + self.settings.capacity_wait_seconds)
        room: dict[str, float] = {}  # pods that refused for room -> when room is likely there (monotonic)
        exclude: set[str] = set()  # pods that failed this request
        gone: set[str] = set()  # pods whose copy went away: still fine to load it again
        last_error: Exception | None = None
        for _ in range(MAX_ATTEMPTS):
            if room and time.monotonic() >= give_up and not self._copy_or_room(key, exclude, gone):
                raise _no_room_anywhere(key, room, last_error)
            try:
                pod, kind = await self._route(key, exclude, gone)
            except ModelNotReady as e:
                if room and self.store.connected:  # every pod left refused for room: wait for the first
                    first = await _wait_for_room(key, room, give_up, last_error)
                    exclude.discard(first)
                    continue
                if last_error is None:
                    raise
                raise type(e)(f"{e.message}; last attempt: {_message(last_error)}") from None
            ROUTE.set(kind)
            if pod is None or pod.id == self.id:
                self.counts[kind] += 1
                try:
                    return await local()
                except (ModelLoadError, CapacityExhausted, ModelNotReady) as e:
                    if isinstance(e, ModelLoadError) and not _load_failed_here(self.cache.get(key)):
                        raise  # an execution error, not a load
                    await self._failed_here(key, e)
                    exclude.add(self.id)
                    last_error = e
                    if isinstance(e, CapacityExhausted):
                        room[self.id] = time.monotonic() + e.retry_after
                    if (
                        isinstance(e, ModelNotReady)
                        and not isinstance(e, CapacityExhausted)
                        and not self._other_candidates(key, exclude)
                    ):
                        raise
                    continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.counts[kind] += 1
            try:
                return await forward(pod, remaining, kind)
            except grpc.aio.AioRpcError as e:
                err = _remote_error(e)
            except (OSError, TimeoutError) as e:
                err = _Unreachable(f"{type(e).__name__}: {e}")
            except asyncio.CancelledError:
                if _cancelled_here():
                    raise  # this request was cancelled
                err = _Unreachable("the call was cancelled with its channel")
            if isinstance(err, _Unreachable):
                self._mark_suspect(pod.id)
            elif isinstance(err, _RemoteError) and err.kind == "CopyGone":
                gone.add(pod.id)
                self.counts["retried"] += 1
                last_error = err.error
                continue
            elif isinstance(err, _RemoteError):
                if err.kind == "ModelLoadError":
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.record_failure(key, pod.id, err.error.message)
                if err.kind not in ("ModelLoadError", "CapacityExhausted", "ServerNotReady", "ModelNotReady"):
                    raise err.error
                err = err.error
                if isinstance(err, CapacityExhausted):
                    room[pod.id] = time.monotonic() + err.retry_after
            else:
                raise err
            self.counts["retried"] += 1
            with contextlib.suppress(StoreUnavailable):
                claim = self.view.claims.get(key)
                if claim is not None and claim.pod == pod.id:
                    await self.store.release_claim(key)
            exclude.add(pod.id)
            last_error = err
        if room:
            raise _no_room_anywhere(key, room, last_error)
        if isinstance(last_error, InferenceError):
            raise last_error
        raise ModelNotReady(f"model {key!r}: no pod could serve it ({last_error})")

    def _copy_or_room(self, key: str, exclude: set[str], gone: set[str]) -> bool:
        """Past the wait, still worth a try: a copy that appeared meanwhile (here, or on a pod
        this request has not given up on), or a pod not tried yet whose record says the model
        fits (records lag: the first choice may have filled up since its last one)."""
        entry = self.cache.get(key)
        if self.serves_here(entry) or any(p not in exclude and p not in gone for p in self._other_holders(key)):
            return True
        need = self.cache._predict(entry, entry.spec) if entry is not None else 0
        pods = [p for p in self.view.pods.values() if p.id not in exclude and self._alive(p.id)]
        return any(not p.shutting_down and (p.capacity <= 0 or p.used + need <= p.capacity) for p in pods)

    def _other_candidates(self, key: str, exclude: set[str]) -> bool:
        return any(p not in exclude and self._alive(p) for p in self.view.pods)

    async def _failed_here(self, key: str, e: InferenceError) -> None:
        with contextlib.suppress(StoreUnavailable):
            if isinstance(e, ModelLoadError):
                await self.store.record_failure(key, self.id, e.message)
            claim = self.view.claims.get(key)
            if claim is not None and claim.pod == self.id:
                await self.store.release_claim(key)

    # -- the two fronts ------------------------------------------------------------
    async def infer(self, request: InferenceRequest, key: str) -> InferenceResponse:
        """REST (and any decoded request): here, or forwarded as a gRPC call."""
        entry = self.cache.get(key)
        if self.serves_here(entry):
            self.counts["local"] += 1
            ROUTE.set("local")
            return await self.dp.local_infer(request, key)

        async def forward(stub: pb_grpc.GRPCInferenceServiceStub, timeout: float, kind: str) -> InferenceResponse:
            msg = encode_infer_request(request)
            msg.model_name = entry.spec.name
            msg.model_version = entry.spec.version or ""
            reply = await stub.ModelInfer(msg, timeout=timeout, metadata=self._metadata[kind])
            return decode_infer_response(reply)

        return await self.serve(key, lambda: self.dp.local_infer(request, key), forward, None)

    async def grpc_infer(self, msg: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        """gRPC: a request held elsewhere goes on as the very message that came in."""
        key = self.dp.repository.resolve(msg.model_name, msg.model_version or None)
        entry = self.cache.get(key)
        raw = bool(msg.raw_input_contents)
        limit = self.dp.settings.max_bytes_elements
        if self.serves_here(entry):
            self.counts["local"] += 1
            return encode_infer_response(await self.dp.local_infer(decode_infer_request(msg, limit), key), raw=raw)
        why = _forwarded(context)
        if why is not None:  # another pod routed it here: serve it here, or say why not
            if why == "forwarded" and entry.state is not ModelState.LOADING and entry.state is not ModelState.READY:
                raise CopyGone(f"model {key!r} is no longer held by pod {self.id}")
            return encode_infer_response(await self.dp.local_infer(decode_infer_request(msg, limit), key), raw=raw)

        async def local() -> pb.ModelInferResponse:
            return encode_infer_response(await self.dp.local_infer(decode_infer_request(msg, limit), key), raw=raw)

        async def forward(stub: pb_grpc.GRPCInferenceServiceStub, timeout: float, kind: str) -> pb.ModelInferResponse:
            return await stub.ModelInfer(msg, timeout=timeout, metadata=self._metadata[kind])

        return await self.serve(key, local, forward, context.time_remaining())

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
        if self.serves_here(self.cache.get(key)) or _forwarded(context) is not None:
            async for response in local():
                yield response
            return

        async def here() -> None:
            return None

        async def forward(pod: PodRecord, timeout: float, kind: str) -> tuple[Any, Any]:
            _, stub = self._stub(pod)
            call = stub.ModelStreamInfer(iter((msg,)), metadata=self._metadata[kind])
            try:
                return call, await asyncio.wait_for(call.read(), timeout)
            except BaseException:
                call.cancel()
                raise

        got = await self.serve_on(key, here, forward, None)
        if got is None:  # placed here
            async for response in local():
                yield response
            return
        call, response = got
        try:
            while response is not grpc.aio.EOF:
                yield response
                response = await call.read()
        finally:
            call.cancel()

    async def internal_load(self, key: str) -> None:
        """Another pod asks this one for a copy (scale-up, hand-off)."""
        if self.leaving:
            raise ServerNotReady("this pod is shutting down")
        entry = self.cache.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key!r} is not registered")
        await self.cache.load(key)
