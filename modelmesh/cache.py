"""The per-pod model cache: a byte-weighted LRU of loaded models with in-use counts.

Models are registered apart from being loaded. The first request for a model
that is not resident loads it (one load, however many requests wait); a load
that needs room evicts the least recently used models, only as many as needed,
never one serving a request. When only busy or recently used models stand in
the way, the load waits (woken when a request ends, a load or unload settles,
or the youngest blocker ages past the churn guard) up to ``capacity_wait``
before it is refused. Loads reserve their predicted size before they
start and settle to the measured size after, so the pod never loads past its
capacity. Every state change is kept on the entry for the repository API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from meshserve.modelmesh.placement import PlacementPolicy
from meshserve.protocol.errors import (
    CapacityExhausted,
    InferenceError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
)

log = logging.getLogger(__name__)

H = TypeVar("H")  # a loaded model handle, opaque to the cache


class ModelState(str, Enum):
    REGISTERED = "REGISTERED"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"
    UNLOADED = "UNLOADED"  # by request: not loaded again until asked
    EVICTED = "EVICTED"  # to make room: loaded again on its next request


@dataclass(eq=False)
class CacheEntry(Generic[H]):
    key: str
    spec: Any
    pinned: bool = False
    state: ModelState = ModelState.REGISTERED
    reason: str = ""
    handle: H | None = None
    size_bytes: int = 0  # measured, while resident
    reserved_bytes: int = 0  # predicted, while loading
    last_size: int | None = None  # measured at the previous load: the best prediction
    loaded_at: float | None = None  # wall clock
    last_used: float = 0.0  # monotonic
    load_seconds: float | None = None
    inflight: int = 0
    waiting: int = 0  # requests waiting for it to become ready
    failures: int = 0
    retry_at: float = 0.0  # monotonic; FAILED models load again on a request after this
    requests: int = 0
    hits: int = 0  # requests that found it resident (the dashboard's hit ratio)
    failed_requests: int = 0
    extra: bool = False  # another pod holds the first copy: evicted before single copies
    transition: asyncio.Future | None = field(default=None, repr=False)
    drained: asyncio.Future | None = field(default=None, repr=False)  # an unload waits for inflight == 0

    def last_used_wall(self) -> float | None:
        return time.time() - (time.monotonic() - self.last_used) if self.last_used else None


LoadFn = Callable[[Any], Awaitable[tuple[Any, int]]]
UnloadFn = Callable[[Any], Awaitable[None]]
SizeFn = Callable[[Any], int]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0


def _consume_exception(task: asyncio.Task) -> None:
    """The load's error reaches the requests awaiting it; none left is not a reason to warn."""
    if not task.cancelled():
        task.exception()


class _NoRoom(CapacityExhausted):
    """Refused for now; ``ages_out``: when the youngest blocker passes the churn guard (monotonic)."""

    def __init__(self, message: str, ages_out: float | None) -> None:
        super().__init__(message)
        self.ages_out = ages_out


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Lease(Generic[H]):
    """Holds a model for one request (an async context manager, cheaper than a generator)."""

    __slots__ = ("_cache", "_key", "_entry")

    def __init__(self, cache: ModelCache[H], key: str) -> None:
        self._cache = cache
        self._key = key

    async def __aenter__(self) -> H:
        cache = self._cache
        entry = cache.hit(self._key)
        if entry is None:
            entry = cache._entries.get(self._key)
            if entry is None:
                raise ModelNotFound(f"model {self._key!r} is not registered")
            await cache._ensure_ready(entry)
            entry.inflight += 1
            entry.requests += 1
            cache._lru.move_to_end(entry.key)
        self._entry = entry
        return entry.handle  # type: ignore[return-value]

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        self._cache.release(self._entry, exc_type is not None)


class ModelCache(Generic[H]):
    """``load_fn(spec) -> (handle, size_bytes)``, ``unload_fn(handle)``,
    ``size_fn(spec) -> predicted bytes``. ``capacity_bytes=None`` means unbounded."""

    def __init__(
        self,
        load_fn: LoadFn,
        unload_fn: UnloadFn,
        *,
        capacity_bytes: int | None = None,
        size_fn: SizeFn | None = None,
        policy: PlacementPolicy | None = None,
        load_timeout: float | None = None,
        retry_backoff: tuple[float, float] = (1.0, 60.0),
        capacity_wait: float = 5.0,
    ) -> None:
        self._load_fn = load_fn
        self._unload_fn = unload_fn
        self._size_fn = size_fn
        self.capacity_bytes = capacity_bytes
        self.policy = policy or PlacementPolicy()
        self.load_timeout = load_timeout
        self.retry_backoff = retry_backoff
        self.capacity_wait = capacity_wait
        self.stats = CacheStats()
        self.on_load: Callable[[float], None] | None = None  # e.g. a histogram's observe
        # Called when a model becomes READY, and when an unload begins and ends (a fleet publishes it).
        self.on_change: Callable[[CacheEntry[H]], None] | None = None
        self._entries: dict[str, CacheEntry[H]] = {}
        self._lru: OrderedDict[str, CacheEntry[H]] = OrderedDict()  # resident models, oldest first
        self._used = 0  # bytes held or reserved
        # Loads waiting for room, oldest first (a dict as an ordered set).
        self._room_waiters: dict[asyncio.Future, None] = {}

    # -- registration ----------------------------------------------------------
    def register(self, key: str, spec: Any, pinned: bool = False) -> CacheEntry[H]:
        """Add a model, or give a known one a new spec for its next load."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = CacheEntry(key, spec, pinned)
        else:
            entry.spec, entry.pinned = spec, pinned
        return entry

    def get(self, key: str) -> CacheEntry[H] | None:
        return self._entries.get(key)

    def entries(self) -> list[CacheEntry[H]]:
        return list(self._entries.values())

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def resident(self) -> int:
        return len(self._lru)

    def resident_entries(self) -> list[CacheEntry[H]]:
        """The models held now, least recently used first."""
        return list(self._lru.values())

    @property
    def loading(self) -> int:
        """Loads in progress."""
        return sum(1 for e in self._entries.values() if e.state is ModelState.LOADING)

    def set_extra(self, key: str, extra: bool) -> None:
        """Another pod holds the first copy of ``key``: evict this one before single copies."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.extra = extra

    def _entry(self, key: str) -> CacheEntry[H]:
        entry = self._entries.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key!r} is not registered")
        return entry

    # -- requests ----------------------------------------------------------------
    def acquire(self, key: str) -> _Lease[H]:
        """``async with cache.acquire(key) as handle``: loads the model on a miss."""
        return _Lease(self, key)

    def hit(self, key: str) -> CacheEntry[H] | None:
        """A resident model held for one request with no await (the hit path: no lease, no
        coroutine), or None when it is not ready (then ``acquire``). Pair with ``release``."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not ModelState.READY:
            return None
        self.stats.hits += 1
        entry.hits += 1
        entry.inflight += 1
        entry.requests += 1
        self._lru.move_to_end(key)
        return entry

    def release(self, entry: CacheEntry[H], failed: bool) -> None:
        """The request holding ``entry`` (from ``hit`` or ``acquire``) is done."""
        entry.inflight -= 1
        if failed:
            entry.failed_requests += 1
        entry.last_used = time.monotonic()
        if not entry.inflight:
            if entry.drained is not None:
                _wake(entry.drained)
            if self._room_waiters:
                self._room_changed()

    async def _ensure_ready(self, entry: CacheEntry[H]) -> None:
        """Wait for, or start, the load a request needs; refused requests are not misses.
        While a request waits, the model is not a victim (``waiting``): a load that just
        finished is not evicted before the requests it was for have used it."""
        entry.waiting += 1
        try:
            await self._wait_ready(entry)
        finally:
            entry.waiting -= 1

    async def _wait_ready(self, entry: CacheEntry[H]) -> None:
        missed = False
        while entry.state is not ModelState.READY:
            if entry.transition is not None:
                if not missed:
                    missed, self.stats.misses = True, self.stats.misses + 1
                refused = await asyncio.shield(entry.transition)
                if refused is not None:  # the load this request waited for found no room
                    raise CapacityExhausted(refused.message, refused.retry_after)
                continue
            if entry.state is ModelState.UNLOADED:
                raise ModelNotReady(f"model {entry.key!r} is not ready (unloaded); load it through the repository API")
            if entry.state is ModelState.FAILED and time.monotonic() < entry.retry_at:
                wait = entry.retry_at - time.monotonic()
                raise ModelNotReady(f"model {entry.key!r} failed to load: {entry.reason} (next retry in {wait:.1f}s)")
            if not missed:
                missed, self.stats.misses = True, self.stats.misses + 1
            # The load runs as its own task: a request that goes away (a cancelled gRPC call)
            # does not cancel a load that other requests are waiting for.
            loop = asyncio.get_running_loop()
            done = entry.transition = loop.create_future()
            task = loop.create_task(self._load(entry, entry.spec, done))
            task.add_done_callback(_consume_exception)
            await asyncio.shield(task)

    # -- loading -----------------------------------------------------------------
    async def load(self, key: str, spec: Any = None) -> CacheEntry[H]:
        """Load a model now (startup, repository API). With a new ``spec`` a serving
        model is reloaded and swapped only once the new copy is ready."""
        entry = self._entry(key)
        while entry.transition is not None:
            await asyncio.shield(entry.transition)
        if entry.state is ModelState.READY and spec is None:
            return entry
        await self._load(entry, entry.spec if spec is None else spec)
        return entry

    def predict_bytes(self, key: str) -> int:
        """What loading ``key`` is expected to take (its last measured size, else the prediction)."""
        entry = self._entry(key)
        return self._predict(entry, entry.spec)

    def fits_without_eviction(self, spec: Any) -> bool:
        return self.capacity_bytes is None or self._used + self._predict(None, spec) <= self.capacity_bytes

    def _predict(self, entry: CacheEntry[H] | None, spec: Any) -> int:
        if entry is not None and entry.last_size is not None and spec is entry.spec:
            return entry.last_size
        return max(0, int(self._size_fn(spec))) if self._size_fn else 0

    async def _load(self, entry: CacheEntry[H], spec: Any, done: asyncio.Future | None = None) -> None:
        """One load of ``entry`` (the caller saw no transition in progress, or set ``done`` as it)."""
        if done is None:
            done = entry.transition = asyncio.get_running_loop().create_future()
        serving = entry.state is ModelState.READY
        before = entry.state
        if not serving:
            entry.state, entry.reason = ModelState.LOADING, ""
        started = time.monotonic()
        refused: CapacityExhausted | None = None
        try:
            need = self._predict(entry, spec)
            try:
                victims = await self._reserve_waiting(entry, need)
            except CapacityExhausted as e:
                refused = e
                if not serving:
                    if self.capacity_bytes is not None and need > self.capacity_bytes:
                        entry.state, entry.reason, entry.retry_at = ModelState.FAILED, e.message, float("inf")
                    else:
                        entry.state = before
                raise
            for victim in victims:
                await self._evict(victim)
            try:
                coro = self._load_fn(spec)
                handle, size = await (asyncio.wait_for(coro, self.load_timeout) if self.load_timeout else coro)
            except BaseException as e:
                self._used -= entry.reserved_bytes
                entry.reserved_bytes = 0
                if isinstance(e, asyncio.TimeoutError):
                    e = ModelLoadError(f"load timed out after {self.load_timeout:g}s")
                elif not isinstance(e, Exception):  # cancelled: leave things as they were
                    if not serving:
                        entry.state = before
                    raise
                self._failed(entry, e, serving)
            self._used += size - entry.reserved_bytes
            entry.reserved_bytes = 0
            old = entry.handle if serving else None
            if serving:
                self._used -= entry.size_bytes
            entry.spec, entry.handle, entry.size_bytes, entry.last_size = spec, handle, size, size
            entry.state, entry.reason, entry.failures = ModelState.READY, "", 0
            entry.loaded_at, entry.last_used = time.time(), time.monotonic()
            entry.load_seconds = time.monotonic() - started
            self._lru[entry.key] = entry
            self._lru.move_to_end(entry.key)
            self.stats.loads += 1
            if self.on_load is not None:
                self.on_load(entry.load_seconds)
            if self.on_change is not None:
                self.on_change(entry)
            log.info("model %s ready in %.3fs (%d bytes, predicted %d)", entry.key, entry.load_seconds, size, need)
            if old is not None:
                await self._unload_fn(old)
            await self._trim(exclude=entry)
        finally:
            entry.transition = None
            done.set_result(refused)  # the requests waiting on it share the refusal, not retry it
            self._room_changed()  # evictable now, or its reservation is free again

    def _reserve(self, entry: CacheEntry[H], need: int) -> list[CacheEntry[H]]:
        """Reserve ``need`` bytes for ``entry``, choosing victims; no await in here,
        so concurrent loads never both count the same free bytes."""
        cap = self.capacity_bytes
        if cap is not None:
            if need > cap:
                raise CapacityExhausted(
                    f"model {entry.key!r} needs about {need} bytes, more than the whole capacity of {cap} bytes"
                )
            short = self._used + need - cap
            victims: list[CacheEntry[H]] = []
            if short > 0:
                choice = self.policy.choose_victims(self._candidates(entry), short, time.monotonic())
                if choice.victims is None:
                    why = "used too recently to evict" if choice.churn else "in use, pinned or being loaded"
                    raise _NoRoom(
                        f"capacity exhausted: model {entry.key!r} needs {need} bytes, {max(0, cap - self._used)} "
                        f"are free and the resident models are {why}",
                        self._ages_out(entry) if choice.churn else None,
                    )
                victims = choice.victims
            for v in victims:
                self._begin_unload(v, ModelState.UNLOADING, "evicted")
        else:
            victims = []
        entry.reserved_bytes = need
        self._used += need
        return victims

    def _candidates(self, entry: CacheEntry[H]) -> Iterator[CacheEntry[H]]:
        """Who may make room for ``entry``: any other resident model, but only other extra
        copies when ``entry`` is itself an extra copy (a copy never displaces a single one)."""
        for e in self._lru.values():
            if e is not entry and (e.extra or not entry.extra):
                yield e

    def _ages_out(self, entry: CacheEntry[H]) -> float | None:
        """When the next resident model that the churn guard protects becomes evictable."""
        now, age, policy = time.monotonic(), self.policy.min_churn_age, self.policy
        times = [
            e.last_used + age
            for e in self._lru.values()
            if e is not entry and policy.evictable(e) and e.last_used + age > now
        ]
        return min(times, default=None)

    def _room_changed(self) -> None:
        """Something that blocked a load may be gone: the waiting loads try again, oldest first."""
        waiters, self._room_waiters = self._room_waiters, {}
        for waiter in waiters:
            _wake(waiter)

    async def _reserve_waiting(self, entry: CacheEntry[H], need: int) -> list[CacheEntry[H]]:
        """Reserve; while only busy or recently used models block, wait for one to free up
        or age out, up to ``capacity_wait`` (a request's own deadline ends its wait sooner:
        it stops awaiting). Past that, 503 with a Retry-After."""
        loop = asyncio.get_running_loop()
        give_up = time.monotonic() + self.capacity_wait
        while True:
            try:
                return self._reserve(entry, need)
            except _NoRoom as e:
                now = time.monotonic()
                if now >= give_up:
                    after = 1.0 if e.ages_out is None else max(1.0, e.ages_out - now)
                    raise CapacityExhausted(e.message, retry_after=after) from None
                until = give_up if e.ages_out is None else min(give_up, e.ages_out)
            waiter = loop.create_future()
            self._room_waiters[waiter] = None
            timer = loop.call_later(max(0.0, until - now), _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._room_waiters.pop(waiter, None)

    def _failed(self, entry: CacheEntry[H], e: Exception, serving: bool) -> None:
        reason = e.message if isinstance(e, InferenceError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, InferenceError):
            log.error("loading model %s failed: %s", entry.key, reason)
        self.stats.load_failures += 1
        if serving:
            raise ModelLoadError(f"reloading model {entry.key!r} failed, the loaded copy still serves: {reason}")
        entry.failures += 1
        base, cap = self.retry_backoff
        entry.retry_at = time.monotonic() + min(cap, base * 2 ** (entry.failures - 1))
        entry.state, entry.reason = ModelState.FAILED, reason
        raise ModelLoadError(f"loading model {entry.key!r} failed: {reason}") from None

    # -- unloading ---------------------------------------------------------------
    def _begin_unload(self, entry: CacheEntry[H], state: ModelState, reason: str) -> None:
        entry.state, entry.reason = state, reason
        entry.transition = asyncio.get_running_loop().create_future()
        self._lru.pop(entry.key, None)
        self._used -= entry.size_bytes  # promised free: the load that evicts waits for it
        if self.on_change is not None:  # no longer a copy to send requests to
            self.on_change(entry)
        if self._room_waiters:
            self._room_changed()

    async def _finish_unload(self, entry: CacheEntry[H], final: ModelState, reason: str) -> None:
        done = entry.transition
        try:
            if entry.inflight:  # the last request to end wakes this
                entry.drained = asyncio.get_running_loop().create_future()
                try:
                    await entry.drained
                finally:
                    entry.drained = None
            handle, entry.handle, entry.size_bytes = entry.handle, None, 0
            if handle is not None:
                try:
                    await self._unload_fn(handle)
                except Exception:
                    log.exception("unloading model %s failed", entry.key)
        finally:
            entry.state, entry.reason, entry.transition = final, reason, None
            if done is not None and not done.done():
                done.set_result(None)
            if self.on_change is not None:
                self.on_change(entry)

    async def _evict(self, entry: CacheEntry[H]) -> None:
        self.stats.evictions += 1
        log.info("evicting model %s (%d bytes)", entry.key, entry.size_bytes)
        await self._finish_unload(entry, ModelState.EVICTED, "evicted to make room")

    async def _trim(self, exclude: CacheEntry[H]) -> None:
        """After a load measured bigger than predicted, evict until back under capacity."""
        cap = self.capacity_bytes
        if cap is None or self._used <= cap:
            return
        victims = self.policy.choose_victims(self._candidates(exclude), self._used - cap, float("inf")).victims
        if not victims:
            log.warning("cache holds %d bytes, over its capacity of %d; nothing can be evicted", self._used, cap)
            return
        for v in victims:
            self._begin_unload(v, ModelState.UNLOADING, "evicted")
        for v in victims:
            await self._evict(v)

    async def unload(self, key: str) -> None:
        """Unload a model by request; it stays registered. In-flight requests finish first."""
        entry = self._entry(key)
        while entry.transition is not None:
            await asyncio.shield(entry.transition)
        if entry.handle is None:
            entry.state, entry.reason = ModelState.UNLOADED, "unloaded"
            return
        self._begin_unload(entry, ModelState.UNLOADING, "unloading")
        await self._finish_unload(entry, ModelState.UNLOADED, "unloaded")

    async def drop(self, key: str) -> None:
        """Unload a copy that is no longer wanted here; unlike ``unload`` it stays eligible
        to load again (state EVICTED). In-flight requests finish first."""
        entry = self._entry(key)
        while entry.transition is not None:
            await asyncio.shield(entry.transition)
        if entry.handle is None:
            if entry.state in (ModelState.UNLOADED, ModelState.FAILED):
                entry.state, entry.reason = ModelState.REGISTERED, None
            return
        self._begin_unload(entry, ModelState.UNLOADING, "dropping a copy")
        await self._finish_unload(entry, ModelState.EVICTED, "copy dropped")

    async def close(self) -> None:
        """Unload every model (at shutdown)."""
        for key, entry in list(self._entries.items()):
            if entry.handle is not None:
                try:
                    await self.unload(key)
                except Exception:
                    log.exception("unloading model %s at shutdown failed", key)
