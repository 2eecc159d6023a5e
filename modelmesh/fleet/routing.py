"""Routing: serve here, forward to a holder, or place a model held nowhere, with retries.

A model ready here is served here (the hot path reads one dict entry, no store round
trip). A model held elsewhere goes to a live holder (one not shutting down, if any). A
model held nowhere is claimed (one pod wins a race) for the best pod in ModelMesh's
order and loaded there; a failed load is recorded and the next pod tried. A pod that
does not answer is a suspect; a pod whose copy went away is passed over for a holder but
may load the model again; a pod with no room says when it expects some.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
from collections.abc import Awaitable, Callable

from meshserve.modelmesh.cache import CacheEntry, ModelCache, ModelState
from meshserve.modelmesh.fleet.config import FleetConfig
from meshserve.modelmesh.fleet.membership import Membership
from meshserve.modelmesh.fleet.transport import CopyGone, DeadlineExceeded, Forward, T, Unreachable, cancelled_here
from meshserve.modelmesh.placement import rank_pods
from meshserve.modelmesh.store import CoordinationStore, PodRecord, StoreUnavailable
from meshserve.protocol.errors import (
    CapacityExhausted,
    InferenceError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    ServerNotReady,
)

MAX_ATTEMPTS = 5
# How the last request of this task was served: local, forwarded (to a holder) or miss (a load).
ROUTE: contextvars.ContextVar[str] = contextvars.ContextVar("meshserve_route", default="local")
# What a pod may answer that another pod may not: try the next one.
RETRIED = (ModelLoadError, CapacityExhausted, ServerNotReady, ModelNotReady)


def message(e: BaseException | None) -> str:
    return e.message if isinstance(e, InferenceError) else str(e)


def no_room_anywhere(key: str, room: dict[str, float], last: Exception | None) -> CapacityExhausted:
    """503 past the fleet's wait, with the soonest time any pod expects room."""
    after = max(1.0, min(room.values()) - time.monotonic())
    why = f": {message(last)}" if last is not None else ""
    return CapacityExhausted(f"no pod has room for model {key!r} now ({len(room)} refused){why}", retry_after=after)


async def wait_for_room(key: str, room: dict[str, float], give_up: float, last: Exception | None) -> str:
    """Every pod refused for room: sleep until the first expects some (within the bound), and
    name it; past the bound, 503."""
    first, at = min(room.items(), key=lambda kv: kv[1])
    if at > give_up:
        raise no_room_anywhere(key, room, last)
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    del room[first]
    return first


class Router:
    """Where each request for a model goes. ``counts``: requests by how they were served."""

    def __init__(self, cache: ModelCache, store: CoordinationStore, members: Membership, config: FleetConfig) -> None:
        self.cache = cache
        self.store = store
        self.members = members
        self.config = config
        self.counts = {"local": 0, "forwarded": 0, "miss": 0, "retried": 0}

    def serves_here(self, entry: CacheEntry | None) -> bool:
        """The hot path: a model ready here is served here."""
        return entry is not None and entry.state is ModelState.READY and not self.members.left

    async def route(
        self, key: str, exclude: set[str] | frozenset[str] = frozenset(), gone: set[str] | frozenset[str] = frozenset()
    ) -> tuple[PodRecord | None, str]:
        """Where to send a request for ``key``: (None, kind) for here, else (pod, kind);
        ``kind`` is local, forwarded or miss. ``exclude``: pods that failed this request;
        ``gone``: pods whose copy went away (they may load it again)."""
        members, view = self.members, self.members.view
        entry = self.cache.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key!r} is not registered")
        here_ok = not members.left and members.id not in exclude
        if here_ok and (entry.state is ModelState.READY or entry.state is ModelState.LOADING):
            return None, "local" if entry.state is ModelState.READY else "miss"
        holders = [p for p in members.other_holders(key) if p not in exclude and p not in gone]
        if holders:
            awake = [p for p in holders if not view.pods[p].shutting_down] or holders
            return view.pods[random.choice(awake)], "forwarded"
        claim = view.claims.get(key)
        if claim is not None and claim.pod not in exclude and time.time() - claim.at < self.config.claim_age:
            if claim.pod == members.id and here_ok:
                return None, "miss"
            if claim.pod != members.id and members.alive(claim.pod):
                return view.pods[claim.pod], "miss"
        if not self.store.connected:
            raise ModelNotReady(
                f"model {key!r} is not loaded on any reachable pod and the fleet store is unreachable: "
                "new models are placed again once it returns"
            )
        return await self._place(key, exclude, here_ok)

    async def _place(self, key: str, exclude: set[str] | frozenset[str], here_ok: bool) -> tuple[PodRecord | None, str]:
        """Claim the best pod in ModelMesh's order for a model held nowhere."""
        members = self.members
        failed = members.view.failures.get(key, {})
        now = time.time()
        window = self.config.load_retry_max_seconds
        candidates = [
            p
            for p in members.live_pods(exclude)
            if not (p.id == members.id and not here_ok)
            and not (p.id in failed and now - failed[p.id].get("at", 0) < window)
        ]
        need = self.cache.predict_bytes(key)
        ranked = rank_pods(candidates, need)
        if not ranked:
            reasons = "; ".join(f"{p}: {f.get('reason', '')}" for p, f in failed.items())
            raise ModelNotReady(f"no pod can load model {key!r} now" + (f" (failed: {reasons})" if reasons else ""))
        best = ranked[0]
        try:
            owner = await self.store.claim(key, best)
            if owner != best.id and (owner in exclude or not members.alive(owner)):
                await self.store.release_claim(key)  # a claim of a pod that is gone
                owner = await self.store.claim(key, best)
        except StoreUnavailable as e:
            raise ModelNotReady(f"model {key!r} is not loaded anywhere and cannot be placed now: {e}") from None
        if owner == best.id:  # placed: count it until that pod's record says so
            best.models += 1
            best.used += need
        if owner == members.id:
            return None, "miss"
        pod = members.view.pods.get(owner)
        if pod is None:
            return best if best.id != members.id else None, "miss"
        return pod, "miss"

    async def serve(self, key: str, local: Callable[[], Awaitable[T]], forward: Forward[T], timeout: float | None) -> T:
        """Serve a request for ``key``: ``local()`` here, or ``forward(pod, timeout, why)`` to
        another pod, retrying on pods that fail (up to ``MAX_ATTEMPTS``). ``forward`` raises the
        transport's typed errors; an ``OSError`` or ``TimeoutError`` from it (refused, reset,
        no first answer in time) counts as the pod being unreachable.

        A pod with no room (all its models young or busy) waits for room itself, up to
        ``capacity_wait_seconds``; that bound holds for the whole fleet, not per pod: once it
        has passed the request gets 503 with the soonest Retry-After any pod gave. When every
        pod refused sooner, the request waits for the pod whose room comes first and loads there.
        """
        config, members = self.config, self.members
        started = time.monotonic()
        deadline = started + min(timeout or config.forward_timeout_seconds, config.forward_timeout_seconds)
        give_up = min(deadline, started + config.capacity_wait_seconds)
        room: dict[str, float] = {}  # pods that refused for room -> when room is likely there (monotonic)
        exclude: set[str] = set()  # pods that failed this request
        gone: set[str] = set()  # pods whose copy went away: still fine to load it again
        last_error: Exception | None = None
        for _ in range(MAX_ATTEMPTS):
            if room and time.monotonic() >= give_up and not self._copy_or_room(key, exclude, gone):
                raise no_room_anywhere(key, room, last_error)
            try:
                pod, kind = await self.route(key, exclude, gone)
            except ModelNotReady as e:
                if room and self.store.connected:  # every pod left refused for room: wait for the first
                    first = await wait_for_room(key, room, give_up, last_error)
                    exclude.discard(first)
                    continue
                if last_error is None:
                    raise
                raise type(e)(f"{e.message}; last attempt: {message(last_error)}") from None
            ROUTE.set(kind)
            if pod is None or pod.id == members.id:
                self.counts[kind] += 1
                try:
                    return await local()
                except (ModelLoadError, CapacityExhausted, ModelNotReady) as e:
                    if isinstance(e, ModelLoadError) and not _load_failed(self.cache.get(key)):
                        raise  # an execution error, not a load
                    await self._failed_here(key, e)
                    exclude.add(members.id)
                    last_error = e
                    if isinstance(e, CapacityExhausted):
                        room[members.id] = time.monotonic() + e.retry_after
                    if (
                        isinstance(e, ModelNotReady)
                        and not isinstance(e, CapacityExhausted)
                        and not members.live_pods(exclude)
                    ):
                        raise
                    continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.counts[kind] += 1
            try:
                return await forward(pod, remaining, kind)
            except CopyGone as e:
                gone.add(pod.id)
                self.counts["retried"] += 1
                last_error = e
                continue
            except DeadlineExceeded:
                raise
            except RETRIED as e:
                err: Exception = e
                if isinstance(e, ModelLoadError):
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.record_failure(key, pod.id, e.message)
                if isinstance(e, CapacityExhausted):
                    room[pod.id] = time.monotonic() + e.retry_after
            except Unreachable as e:
                err = e
                members.suspect(pod.id)
            except (OSError, TimeoutError) as e:
                err = Unreachable(f"{type(e).__name__}: {e}")
                members.suspect(pod.id)
            except asyncio.CancelledError:
                if cancelled_here():
                    raise  # this request was cancelled
                err = Unreachable("the call was cancelled with its channel")
                members.suspect(pod.id)
            self.counts["retried"] += 1
            with contextlib.suppress(StoreUnavailable):
                claim = members.view.claims.get(key)
                if claim is not None and claim.pod == pod.id:
                    await self.store.release_claim(key)
            exclude.add(pod.id)
            last_error = err
        if room:
            raise no_room_anywhere(key, room, last_error)
        if isinstance(last_error, InferenceError):
            raise last_error
        raise ModelNotReady(f"model {key!r}: no pod could serve it ({last_error})")

    def _copy_or_room(self, key: str, exclude: set[str], gone: set[str]) -> bool:
        """Past the wait, still worth a try: a copy that appeared meanwhile (here, or on a pod
        this request has not given up on), or a pod not tried yet whose record says the model
        fits (records lag: the first choice may have filled up since its last one)."""
        entry = self.cache.get(key)
        if self.serves_here(entry) or any(p not in exclude and p not in gone for p in self.members.other_holders(key)):
            return True
        need = self.cache.predict_bytes(key) if entry is not None else 0
        return any(
            not p.shutting_down and (p.capacity <= 0 or p.used + need <= p.capacity)
            for p in self.members.live_pods(exclude)
        )

    async def _failed_here(self, key: str, e: InferenceError) -> None:
        with contextlib.suppress(StoreUnavailable):
            if isinstance(e, ModelLoadError):
                await self.store.record_failure(key, self.members.id, e.message)
            claim = self.members.view.claims.get(key)
            if claim is not None and claim.pod == self.members.id:
                await self.store.release_claim(key)


def _load_failed(entry: CacheEntry | None) -> bool:
    return entry is not None and entry.state is ModelState.FAILED
