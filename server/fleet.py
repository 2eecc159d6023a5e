"""The mesh across pods: routing, placement, copies and leaving, over a coordination store.

Any pod accepts any request. A model this pod holds is served here (the hot path reads
one dict entry, no store round trip). A model held elsewhere is forwarded to a holder
with gRPC ModelInfer over a kept-alive channel; the call carries the request id, the
remaining deadline and a marker so the receiving pod serves it itself. A model held
nowhere is claimed (an etcd transaction: one pod wins a race) for the best pod in
ModelMesh's order and loaded there; a failed load is recorded and the next pod tried.
A pod that does not answer is skipped until its lease lapses, and the request is
retried on another holder or loads elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from modelmesh import CacheEntry, ModelState
from modelmesh.placement import rank_pods
from modelmesh.store import CoordinationStore, PodRecord, StoreUnavailable
from protocol import errors
from protocol.datatypes import DTYPES
from protocol.errors import (
    CapacityExhausted,
    InferenceError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    ServerNotReady,
)
from protocol.grpc import grpc_service_pb2 as pb
from protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from protocol.grpc.codec import (
    CONTENTS_FIELD,
    decode_infer_request,
    decode_parameters,
    encode_infer_request,
    encode_infer_response,
)
from protocol.types import InferenceRequest, InferenceResponse, Tensor

if TYPE_CHECKING:
    from server.dataplane import DataPlane
    from server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Metadata on a forwarded call: serve it here, do not route it again. Its value says why it
# came: "forwarded" (the sender saw a copy here; if it is gone, say so and the sender tries
# elsewhere) or "miss" (this pod was chosen to load the model).
MARKER = "meshserve-forwarded"
ERROR_KEY = "meshserve-error"  # trailing metadata: the InferenceError class a pod answered with
# How the last request of this task was served: local, forwarded (to a holder) or miss (a load).
ROUTE: contextvars.ContextVar[str] = contextvars.ContextVar("meshserve_route", default="local")
MAX_ATTEMPTS = 5
HANDOFF_CONCURRENCY = 4


class _Unreachable(Exception):
    pass


class CopyGone(ModelNotReady):
    """A forwarded hit reached a pod whose copy has just gone (evicted, unloaded)."""


class _RemoteError(Exception):
    def __init__(self, kind: str, error: InferenceError) -> None:
        super().__init__(error.message)
        self.kind, self.error = kind, error


def _remote_error(e: grpc.aio.AioRpcError) -> Exception:
    """A failed forwarded call: the pod's own error (it names its class), or the pod is gone."""
    kind = next((v for k, v in (e.trailing_metadata() or ()) if k == ERROR_KEY), None)
    if kind is not None:
        cls = CopyGone if kind == "CopyGone" else getattr(errors, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, InferenceError)):
            cls = InferenceError
        return _RemoteError(kind, cls(e.details() or kind))
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerNotReady("the pod holding the model did not answer within the deadline")
    return _Unreachable(f"{e.code().name}: {e.details()}")


def decode_infer_response(msg: pb.ModelInferResponse) -> InferenceResponse:
    """A forwarded call's answer, back as the data plane's response (raw contents stay in
    their received buffers)."""
    raw = msg.raw_output_contents
    outputs = []
    for i, out in enumerate(msg.outputs):
        shape = tuple(out.shape)
        if raw:
            buf = raw[i]
            if out.datatype == "BYTES":
                from protocol.datatypes import bytes_array, decode_bytes_elements

                data = bytes_array(decode_bytes_elements(out.name, buf), shape)
            else:
                data = np.frombuffer(buf, dtype=DTYPES[out.datatype]).reshape(shape)
        else:
            values = getattr(out.contents, CONTENTS_FIELD[out.datatype])
            if out.datatype == "BYTES":
                from protocol.datatypes import bytes_array

                data = bytes_array(list(values), shape)
            else:
                data = np.array(values, dtype=DTYPES[out.datatype]).reshape(shape)
        params = decode_parameters(out.parameters) if out.parameters else {}
        outputs.append(Tensor(out.name, out.datatype, data, params))
    return InferenceResponse(
        msg.model_name,
        outputs,
        model_version=msg.model_version or None,
        id=msg.id or None,
        parameters=decode_parameters(msg.parameters) if msg.parameters else None,
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


class Fleet:
    def __init__(self, dp: DataPlane, settings: Settings, store: CoordinationStore) -> None:
        self.dp = dp
        self.settings = settings
        self.store = store
        self.view = store.view
        self.cache = dp.cache
        host = _advertised_host(settings)
        self.id = settings.pod_id or f"{socket.gethostname()}-{settings.grpc_port}"
        self.pod = PodRecord(
            id=self.id,
            http=f"{host}:{settings.http_port}",
            grpc=f"{host}:{settings.grpc_port}",
            capacity=self.cache.capacity_bytes or 0,
        )
        self.leaving = False  # SIGTERM: no new loads here
        self.left = False  # models handed off: requests go to other pods
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]] = {}
        self._suspect: dict[str, float] = {}  # pod id -> monotonic time until which it is skipped
        self._pending: dict[str, bool] = {}  # holder records to write: model -> held
        self._gone_used: dict[str, float] = {}  # last use of copies that went, for the store
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_requests: dict[str, int] = {}
        self._copy_tried: dict[str, float] = {}
        self._tick_at = time.monotonic()
        self._published: tuple = ()
        self.counts = {"local": 0, "forwarded": 0, "miss": 0, "retried": 0}
        self._suspect_for = max(2.0 * store_lease(store, settings), 3.0)
        auth = _auth_metadata(settings)
        self._metadata = {k: ((MARKER, k), *auth) for k in ("copy", "forwarded", "miss")}

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Join (raises StoreUnavailable), publish the registrations, follow the store."""
        self.view.listeners.append(self._on_record)
        await self.store.start(self.pod)
        if hasattr(self.store, "on_reconnect"):
            self.store.on_reconnect = self._republish
        self.cache.on_change = self._on_cache_change
        docs = {}
        for entry in self.cache.entries():
            docs[entry.key] = entry.spec.model_dump(mode="json", exclude_defaults=True)
        added = await self.store.register(docs)
        # Registrations other pods made that this one lacks.
        for key, doc in list(self.view.models.items()):
            self._register_remote(key, doc)
        log.info("joined the fleet at %s as %s (%d pods, %d models, %d registered now)",
                 self.store.url, self.id, len(self.view.pods), len(self.view.models), added)  # fmt: skip
        self._tasks = [asyncio.ensure_future(self._writer()), asyncio.ensure_future(self._ticker())]

    async def leave(self) -> None:
        """SIGTERM: stop taking loads, hand the models only this pod holds to others (hot
        ones first), then stop being a holder; requests already here finish."""
        if self.leaving:
            return
        self.leaving = True
        self.pod.shutting_down = True
        with contextlib.suppress(StoreUnavailable):
            await self.store.publish_pod(self.pod)
        budget = max(1.0, self.settings.shutdown_grace_seconds * 0.6)
        hot = sorted(
            (e for e in list(self.cache._lru.values()) if e.state is ModelState.READY),
            key=lambda e: e.last_used,
            reverse=True,
        )
        lonely = [e for e in hot if not self._other_holders(e.key)]
        slots = asyncio.Semaphore(HANDOFF_CONCURRENCY)

        async def handoff(entry: CacheEntry) -> None:
            async with slots:
                await self._add_copy(entry.key, why="hand-off")

        if lonely and self.store.connected:
            tasks = [asyncio.ensure_future(handoff(e)) for e in lonely]
            done, pending = await asyncio.wait(tasks, timeout=budget)
            for t in pending:
                t.cancel()
            log.info("handed off %d of %d models held only here", len(done), len(lonely))
        self.left = True
        with contextlib.suppress(StoreUnavailable):
            used = {e.key: e.last_used_wall() or 0.0 for e in hot}
            await self.store.set_holdings([(e.key, False) for e in hot], used)
        await asyncio.sleep(0.1)  # the other pods' views follow within milliseconds

    async def close(self) -> None:
        """Deregister (the lease goes, and every record bound to it) and close channels."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self.cache.on_change = None
        await self.store.close()
        for channel, _ in self._channels.values():
            await channel.close()

    # -- the store's records ---------------------------------------------------
    def _register_remote(self, key: str, doc: dict[str, Any]) -> None:
        if self.cache.get(key) is not None:
            return
        from server.model_settings import parse_model_settings

        try:
            self.dp.repository.register(parse_model_settings(doc))
        except InferenceError as e:
            log.warning("fleet registration %s ignored: %s", key, e.message)

    def _on_record(self, kind: str, key: str, present: bool) -> None:
        if kind == "holders":
            model = key.rpartition("/")[0]
            entry = self.cache.get(model)
            if entry is not None:
                copies = self.view.holders_of(model)
                mine = copies.get(self.id)
                entry.extra = mine is not None and any(r < mine for p, r in copies.items() if p != self.id)
        elif kind == "models" and present:
            doc = self.view.models.get(key)
            if doc is not None:
                self._register_remote(key, doc)

    def _on_cache_change(self, entry: CacheEntry) -> None:
        held = entry.state is ModelState.READY
        if held and self.left:
            return
        self._pending[entry.key] = held
        if not held and entry.last_used:
            self._gone_used[entry.key] = entry.last_used_wall() or 0.0
        self._wake.set()
        if held and entry.key not in self.view.models:  # registered here through the repository API
            doc = entry.spec.model_dump(mode="json", exclude_defaults=True)
            asyncio.ensure_future(self._register_quietly({entry.key: doc}))

    async def _register_quietly(self, docs: dict[str, dict[str, Any]]) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.store.register(docs)

    async def _writer(self) -> None:
        """Holder records, written in batches, in order, retried while etcd is away."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = list(self._pending.items())[:64]
                for k, _ in batch:
                    del self._pending[k]
                used = {k: self._gone_used.pop(k) for k, held in batch if not held and k in self._gone_used}
                try:
                    await self.store.set_holdings(batch, used)
                except StoreUnavailable:
                    for k, held in batch:
                        self._pending.setdefault(k, held)
                    for k, when in used.items():
                        self._gone_used.setdefault(k, when)
                    await asyncio.sleep(0.5)
                except Exception:
                    log.exception("writing holder records failed")
                    await asyncio.sleep(0.5)

    async def _republish(self) -> None:
        """Back from an etcd outage with a new lease: every copy held here, again."""
        for entry in list(self.cache._lru.values()):
            if entry.state is ModelState.READY and not self.left:
                self._pending[entry.key] = True
        self._wake.set()
        self._published = ()
        with contextlib.suppress(StoreUnavailable):
            await self.store.publish_pod(self._stats())

    # -- the periodic work: the pod record and the copy rules -------------------
    def _stats(self) -> PodRecord:
        pod = self.pod
        lru = self.cache._lru
        pod.used = self.cache.used_bytes
        pod.models = len(lru)
        head = next(iter(lru.values()), None)
        pod.oldest_lru = (head.last_used_wall() or 0.0) if head is not None else 0.0
        pod.loading = sum(1 for e in self.cache._entries.values() if e.state is ModelState.LOADING)
        return pod

    def setting(self, name: str) -> float:
        """A dynamic setting from the store, else this pod's."""
        value = self.view.settings.get(name)
        return float(value) if isinstance(value, (int, float)) else float(getattr(self.settings, name))

    async def _ticker(self) -> None:
        interval = min(1.0, store_lease(self.store, self.settings) / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._tick()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("fleet tick failed")

    async def _tick(self) -> None:
        now = time.monotonic()
        dt = max(1e-3, now - self._tick_at)
        self._tick_at = now
        threshold = self.setting("copy_rate_per_minute")
        second_after = self.setting("second_copy_after_seconds")
        max_copies = int(self.setting("max_copies"))
        total = 0.0
        last = self._last_requests
        wall = time.time()
        for entry in list(self.cache._lru.values()):
            before = last.get(entry.key, entry.requests)
            last[entry.key] = entry.requests
            delta = entry.requests - before
            if delta <= 0 or entry.state is not ModelState.READY or self.leaving:
                continue
            rate = delta / dt * 60.0
            total += rate
            copies = len(self._live_holders(entry.key, include_self=True))
            if copies >= max_copies or now < self._copy_tried.get(entry.key, 0.0):
                continue
            if rate > threshold or (
                copies <= 1 and entry.loaded_at is not None and wall - entry.loaded_at >= second_after
            ):
                self._copy_tried[entry.key] = now + max(5.0, min(60.0, second_after))
                why = "request rate" if rate > threshold else "used again"
                asyncio.ensure_future(self._add_copy(entry.key, why=why))
        pod = self._stats()
        pod.rate = round(total)
        # Written only when it changed (the lease keeps it alive): an idle fleet writes nothing.
        shown = (pod.used, pod.models, round(pod.oldest_lru), pod.loading, pod.rate, pod.shutting_down)
        if self.store.connected and shown != self._published:
            await self.store.publish_pod(pod)
            self._published = shown

    async def _add_copy(self, key: str, why: str) -> bool:
        """Load one more copy of ``key`` on the best other pod that lacks one."""
        holders = self.view.holders_of(key)
        entry = self.cache.get(key)
        need = self.cache._predict(entry, entry.spec) if entry is not None else 0
        candidates = [
            p for p in self.view.pods.values() if p.id != self.id and p.id not in holders and self._alive(p.id)
        ]
        for pod in rank_pods(candidates, need)[:2]:
            try:
                _, stub = self._stub(pod)
                await stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name=key),
                    timeout=self.settings.forward_timeout_seconds,
                    metadata=self._metadata["copy"],
                )
                log.info("copy of %s loaded on %s (%s)", key, pod.id, why)
                return True
            except grpc.aio.AioRpcError as e:
                err = _remote_error(e)
                if isinstance(err, _Unreachable):
                    self._mark_suspect(pod.id)
                log.info("copy of %s on %s failed: %s", key, pod.id, err)
            except asyncio.CancelledError:
                if _cancelled_here():
                    raise
        return False

    # -- who is alive ------------------------------------------------------------
    def _alive(self, pod_id: str) -> bool:
        if pod_id not in self.view.pods:
            return False
        until = self._suspect.get(pod_id)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self._suspect[pod_id]
            return True
        return False

    def _mark_suspect(self, pod_id: str) -> None:
        if pod_id not in self._suspect:
            log.warning("pod %s does not answer; skipped until its lease lapses", pod_id)
        self._suspect[pod_id] = time.monotonic() + self._suspect_for
        channel = self._channels.pop(pod_id, None)
        if channel is not None:  # calls still on it end on their own (closing now would cancel them)
            asyncio.ensure_future(channel[0].close(grace=self.settings.forward_timeout_seconds))

    def _other_holders(self, key: str) -> list[str]:
        return [p for p in self.view.holders_of(key) if p != self.id and self._alive(p)]

    def ready_elsewhere(self, key: str) -> bool:
        return bool(self._other_holders(key))

    def _live_holders(self, key: str, include_self: bool = False) -> list[str]:
        return [
            p for p in self.view.holders_of(key) if (p == self.id and include_self) or (p != self.id and self._alive(p))
        ]

    def _stub(self, pod: PodRecord) -> tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]:
        got = self._channels.get(pod.id)
        if got is None or got[0].get_state() is grpc.ChannelConnectivity.SHUTDOWN:
            limit = self.settings.max_request_bytes
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
        return got

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
        """Serve a request for ``key`` here or on another pod, retrying on pods that fail."""
        deadline = time.monotonic() + min(
            timeout or self.settings.forward_timeout_seconds, self.settings.forward_timeout_seconds
        )
        exclude: set[str] = set()  # pods that failed this request
        gone: set[str] = set()  # pods whose copy went away: still fine to load it again
        last_error: Exception | None = None
        for _ in range(MAX_ATTEMPTS):
            try:
                pod, kind = await self._route(key, exclude, gone)
            except ModelNotReady as e:
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
                _, stub = self._stub(pod)
                return await forward(stub, remaining, kind)
            except grpc.aio.AioRpcError as e:
                err = _remote_error(e)
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
            else:
                raise err
            self.counts["retried"] += 1
            with contextlib.suppress(StoreUnavailable):
                claim = self.view.claims.get(key)
                if claim is not None and claim.pod == pod.id:
                    await self.store.release_claim(key)
            exclude.add(pod.id)
            last_error = err
        if isinstance(last_error, InferenceError):
            raise last_error
        raise ModelNotReady(f"model {key!r}: no pod could serve it ({last_error})")

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
        if self.serves_here(entry):
            self.counts["local"] += 1
            return encode_infer_response(await self.dp.local_infer(decode_infer_request(msg), key), raw=raw)
        why = _forwarded(context)
        if why is not None:  # another pod routed it here: serve it here, or say why not
            if why == "forwarded" and entry.state is not ModelState.LOADING and entry.state is not ModelState.READY:
                raise CopyGone(f"model {key!r} is no longer held by pod {self.id}")
            return encode_infer_response(await self.dp.local_infer(decode_infer_request(msg), key), raw=raw)

        async def local() -> pb.ModelInferResponse:
            return encode_infer_response(await self.dp.local_infer(decode_infer_request(msg), key), raw=raw)

        async def forward(stub: pb_grpc.GRPCInferenceServiceStub, timeout: float, kind: str) -> pb.ModelInferResponse:
            return await stub.ModelInfer(msg, timeout=timeout, metadata=self._metadata[kind])

        return await self.serve(key, local, forward, context.time_remaining())

    async def internal_load(self, key: str) -> None:
        """Another pod asks this one for a copy (scale-up, hand-off)."""
        if self.leaving:
            raise ServerNotReady("this pod is shutting down")
        entry = self.cache.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key!r} is not registered")
        await self.cache.load(key)

    # -- the fleet view ----------------------------------------------------------------
    def index_rows(self, ready_only: bool = False) -> list[dict[str, Any]]:
        rows = []
        pods = self.view.pods
        for entry in self.cache.entries():
            spec = entry.spec
            copies = []
            for pod_id in sorted(self.view.holders_of(entry.key)):
                pod = pods.get(pod_id)
                if pod is None:
                    continue
                state = "READY" if self._alive(pod_id) else "UNREACHABLE"
                if pod_id == self.id:
                    state = entry.state.value
                copy = {"pod": pod_id, "http": pod.http, "grpc": pod.grpc, "state": state}
                if pod_id == self.id:
                    copy["extra"] = entry.extra  # evicted before single copies
                copies.append(copy)
            here = entry.state
            if any(c["state"] == "READY" for c in copies) or here is ModelState.READY:
                state = "READY"
            elif here is ModelState.LOADING or entry.key in self.view.claims:
                state = "LOADING"
            else:
                state = here.value
            if ready_only and state != "READY":
                continue
            failures = {p: f.get("reason", "") for p, f in self.view.failures.get(entry.key, {}).items()}
            rows.append(
                {
                    "name": spec.name,
                    "version": spec.version or "",
                    "state": state,
                    "reason": entry.reason if state == here.value else "",
                    "size_bytes": entry.size_bytes,
                    "last_used": entry.last_used_wall() or self.view.last_used.get(entry.key),
                    "pinned": entry.pinned,
                    "requests": entry.requests,
                    "copies": copies,
                    "failures": failures,
                }
            )
        return rows

    def metrics(self) -> list[Any]:
        """Prometheus families for the fleet (read at scrape time)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        routed = CounterMetricFamily(
            "meshserve_fleet_requests", "Requests by how the fleet served them (local, forwarded, miss, retried).",
            labels=["route"],
        )  # fmt: skip
        for route, n in self.counts.items():
            routed.add_metric([route], n)
        live = sum(1 for p in list(self.view.pods) if self._alive(p))
        return [
            routed,
            GaugeMetricFamily("meshserve_fleet_pods", "Live pods in this pod's view of the fleet.", value=live),
            GaugeMetricFamily(
                "meshserve_fleet_store_connected",
                "1 while the coordination store answers.",
                value=int(self.store.connected),
            ),
        ]

    def pods_summary(self) -> list[dict[str, Any]]:
        return [
            {**p.__dict__, "alive": self._alive(p.id), "self": p.id == self.id}
            for p in sorted(self.view.pods.values(), key=lambda p: p.id)
        ]


def _auth_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
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


def _cancelled_here() -> bool:
    """A CancelledError is this task's own cancellation (not a call cancelled with its channel)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return cancelling is None or cancelling() > 0


def _message(e: Exception) -> str:
    return e.message if isinstance(e, InferenceError) else str(e)


def _load_failed_here(entry: CacheEntry | None) -> bool:
    return entry is not None and entry.state is ModelState.FAILED


def _forwarded(context: grpc.aio.ServicerContext) -> str | None:
    """Why another pod sent this call here, or None for a client's call."""
    return next((v for k, v in context.invocation_metadata() or () if k == MARKER), None)


def store_lease(store: CoordinationStore, settings: Settings) -> float:
    return float(getattr(store, "lease_ttl", settings.fleet_lease_seconds))
