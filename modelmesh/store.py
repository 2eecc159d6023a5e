"""The coordination store a fleet of pods shares (ModelMesh keeps the same records in etcd).

Records, under one prefix:

- ``pods/<id>``: one per pod, bound to the pod's lease (address, capacity, bytes used,
  model count, oldest LRU time, loads in flight, request rate, shutting-down flag),
  refreshed periodically; a pod whose lease lapses disappears, and with it every
  record bound to the lease.
- ``holders/<model>/<pod>``: a copy of a model on a pod, bound to that pod's lease.
- ``claims/<model>``: "this pod is loading the model", created in a transaction only if
  absent (two pods racing to place a model: one wins), bound to the loading pod's lease,
  deleted when its holder record appears.
- ``models/<model>``: registrations (the model-settings document: URI, runtime, settings).
- ``failures/<model>/<pod>``: the last load failure of a model on a pod.
- ``lastused/<model>``: when the model was last used on a copy that has since gone.
- ``settings/<name>``: dynamic settings (second-copy age, copy rate threshold).

Every pod mirrors the records in a :class:`FleetView` kept current by a watch, so the
request path reads memory only. :class:`InProcessStore` is the embedded default (one
pod, no network); :class:`EtcdStore` is the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The coordination store cannot be reached."""


@dataclass
class PodRecord:
    id: str
    http: str = ""  # host:port
    grpc: str = ""  # host:port
    capacity: int = 0
    used: int = 0
    models: int = 0
    oldest_lru: float = 0.0  # wall time of the least recently used resident model, 0: none
    loading: int = 0
    load_slots: int = 4
    rate: float = 0.0  # requests per minute served
    shutting_down: bool = False
    lease: int = 0
    started: float = field(default_factory=time.time)

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes) -> PodRecord:
        doc = orjson.loads(raw)
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass
class Claim:
    pod: str
    at: float


class FleetView:
    """This pod's mirror of the store: read on the request path, written by the watch."""

    def __init__(self) -> None:
        self.pods: dict[str, PodRecord] = {}
        self.holders: dict[str, dict[str, int]] = {}  # model -> {pod: revision the copy appeared}
        self.claims: dict[str, Claim] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, dict[str, dict[str, Any]]] = {}
        self.settings: dict[str, Any] = {}
        self.last_used: dict[str, float] = {}
        self.listeners: list[Callable[[str, str, bool], None]] = []  # (kind, key, present)

    def clear(self) -> None:
        self.pods.clear()
        self.holders.clear()
        self.claims.clear()
        self.failures.clear()
        self.settings.clear()
        self.last_used.clear()

    def holders_of(self, model: str) -> dict[str, int]:
        return self.holders.get(model) or {}

    def apply(self, rel: str, value: bytes | None, revision: int) -> None:
        """One record changed (``value`` None: deleted); ``rel`` is the key below the prefix."""
        kind, _, rest = rel.partition("/")
        try:
            if kind == "pods":
                if value is None:
                    self.pods.pop(rest, None)
                else:
                    self.pods[rest] = PodRecord.loads(value)
            elif kind == "holders":
                model, _, pod = rest.rpartition("/")
                if value is None:
                    copies = self.holders.get(model)
                    if copies is not None:
                        copies.pop(pod, None)
                        if not copies:
                            del self.holders[model]
                else:
                    self.holders.setdefault(model, {}).setdefault(pod, revision)
            elif kind == "claims":
                if value is None:
                    self.claims.pop(rest, None)
                else:
                    doc = orjson.loads(value)
                    self.claims[rest] = Claim(doc["pod"], doc["at"])
            elif kind == "models":
                if value is None:
                    self.models.pop(rest, None)
                else:
                    self.models[rest] = orjson.loads(value)
            elif kind == "failures":
                model, _, pod = rest.rpartition("/")
                if value is None:
                    self.failures.get(model, {}).pop(pod, None)
                else:
                    self.failures.setdefault(model, {})[pod] = orjson.loads(value)
            elif kind == "lastused":
                if value is None:
                    self.last_used.pop(rest, None)
                else:
                    self.last_used[rest] = float(orjson.loads(value))
            elif kind == "settings":
                if value is None:
                    self.settings.pop(rest, None)
                else:
                    self.settings[rest] = orjson.loads(value)
            else:
                return
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed fleet record %s", rel)
            return
        for listener in self.listeners:
            listener(kind, rest, value is not None)


class CoordinationStore:
    """What a pod needs from the store. Writes raise :class:`StoreUnavailable`."""

    url = "inprocess"

    def __init__(self) -> None:
        self.view = FleetView()
        self.connected = True
        self.pod: PodRecord | None = None

    async def start(self, pod: PodRecord) -> None:
        self.pod = pod

    async def close(self) -> None:
        pass

    async def publish_pod(self, pod: PodRecord) -> None:
        raise NotImplementedError

    async def set_holdings(self, changes: list[tuple[str, bool]], last_used: dict[str, float] | None = None) -> None:
        """This pod holds (True) or no longer holds (False) a copy of each model; a new
        copy ends the model's claim; a copy that goes leaves its last use (``last_used``)."""
        raise NotImplementedError

    async def claim(self, model: str, pod: PodRecord) -> str:
        """Claim ``model`` for loading on ``pod``; returns the pod that holds the claim."""
        raise NotImplementedError

    async def release_claim(self, model: str) -> None:
        raise NotImplementedError

    async def register(self, docs: dict[str, dict[str, Any]]) -> int:
        """Add registrations not yet in the store; returns how many were added."""
        raise NotImplementedError

    async def record_failure(self, model: str, pod: str, reason: str) -> None:
        raise NotImplementedError

    async def set_setting(self, name: str, value: Any) -> None:
        raise NotImplementedError


class InProcessStore(CoordinationStore):
    """The embedded default: the records live in this process (one pod)."""

    def _set(self, rel: str, value: Any | None) -> None:
        raw = None if value is None else (value if isinstance(value, bytes) else orjson.dumps(value))
        self.view.apply(rel, raw, 0)

    async def start(self, pod: PodRecord) -> None:
        self.pod = pod
        self._set(f"pods/{pod.id}", pod.dumps())

    async def publish_pod(self, pod: PodRecord) -> None:
        self._set(f"pods/{pod.id}", pod.dumps())

    async def set_holdings(self, changes: list[tuple[str, bool]], last_used: dict[str, float] | None = None) -> None:
        for model, held in changes:
            self._set(f"holders/{model}/{self.pod.id}", b"{}" if held else None)
            if not held and last_used and last_used.get(model):
                self._set(f"lastused/{model}", last_used[model])
            if held:
                self._set(f"claims/{model}", None)
                self._set(f"failures/{model}/{self.pod.id}", None)

    async def claim(self, model: str, pod: PodRecord) -> str:
        held = self.view.claims.get(model)
        if held is None:
            self._set(f"claims/{model}", {"pod": pod.id, "at": time.time()})
            return pod.id
        return held.pod

    async def release_claim(self, model: str) -> None:
        self._set(f"claims/{model}", None)

    async def register(self, docs: dict[str, dict[str, Any]]) -> int:
        new = {k: v for k, v in docs.items() if k not in self.view.models}
        for k, v in new.items():
            self._set(f"models/{k}", v)
        return len(new)

    async def record_failure(self, model: str, pod: str, reason: str) -> None:
        self._set(f"failures/{model}/{pod}", {"reason": reason, "at": time.time()})

    async def set_setting(self, name: str, value: Any) -> None:
        self._set(f"settings/{name}", value)


def parse_store_url(url: str) -> tuple[str, int, str]:
    """``etcd://host:port/prefix`` -> (host, port, prefix)."""
    parts = urlsplit(url)
    if parts.scheme != "etcd":
        raise ValueError(f"store {url!r}: only etcd://host:port/prefix is supported")
    if not parts.hostname:
        raise ValueError(f"store {url!r} names no host")
    try:
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"store {url!r} has an invalid port") from None
    prefix = parts.path.strip("/") or "meshserve"
    return parts.hostname, port, prefix


TXN_OPS = 128  # etcd's default --max-txn-ops


class EtcdStore(CoordinationStore):
    """The records in etcd (through aetcd), mirrored by one prefix watch."""

    def __init__(self, url: str, lease_seconds: float = 10.0, timeout: float = 3.0) -> None:
        super().__init__()
        self.url = url
        self.host, self.port, prefix = parse_store_url(url)
        self.prefix = prefix + "/"
        self._p = self.prefix.encode()
        self.lease_ttl = max(1, round(lease_seconds))
        self.timeout = timeout
        self.connected = False
        self.on_reconnect: Callable[[], Any] | None = None  # re-publish what this pod holds
        self._client: Any = None
        self._lease: Any = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._synced = asyncio.Event()

    def _key(self, rel: str) -> bytes:
        return self._p + rel.encode()

    # -- connection ------------------------------------------------------------
    async def start(self, pod: PodRecord) -> None:
        """Connect, take a lease, publish the pod and mirror the store; fails if etcd is unreachable."""
        import aetcd

        self.pod = pod
        self._client = aetcd.Client(host=self.host, port=self.port, timeout=self.timeout)
        try:
            await self._join()
        except Exception as e:
            await self._close_client()
            raise StoreUnavailable(f"cannot reach etcd at {self.host}:{self.port}: {_why(e)}") from None
        self._tasks = [asyncio.ensure_future(self._keepalive()), asyncio.ensure_future(self._watch_loop())]
        await asyncio.wait_for(self._synced.wait(), self.timeout * 3)

    async def _join(self) -> None:
        self._lease = await self._client.lease(self.lease_ttl)
        self.pod.lease = self._lease.id
        await self._client.put(self._key(f"pods/{self.pod.id}"), self.pod.dumps(), lease=self._lease)
        self.connected = True

    async def _sync(self) -> int:
        """Read every record (the view starts over) and return the revision to watch from."""
        result = await self._client.get_prefix(self._p)
        models = dict(self.view.models)
        self.view.clear()
        self.view.models.clear()
        plen = len(self._p)
        for kv in result:
            self.view.apply(kv.key[plen:].decode(), kv.value, kv.create_revision)
        for gone in models.keys() - self.view.models.keys():
            for listener in self.view.listeners:
                listener("models", gone, False)
        return result.header.revision + 1

    async def _watch_loop(self) -> None:
        """Keep the view current; after any break, read everything again and watch on."""
        plen = len(self._p)
        while not self._closing:
            try:
                start = await self._sync()
                self._synced.set()
                watch = await self._client.watch_prefix(self._p, start_revision=start)
                async for ev in watch:
                    rel = ev.kv.key[plen:].decode()
                    deleted = ev.kind == "DELETE" or getattr(ev.kind, "value", None) == "DELETE"
                    self.view.apply(rel, None if deleted else ev.kv.value, ev.kv.create_revision)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not self._closing:
                    log.debug("fleet watch broke: %s", _why(e))
            if not self._closing:
                await asyncio.sleep(0.2)

    async def _keepalive(self) -> None:
        """Refresh the lease every third of its TTL; when etcd is lost, say so; when it
        returns, take a new lease if the old one lapsed and publish everything again."""
        interval = self.lease_ttl / 3
        while not self._closing:
            await asyncio.sleep(interval)
            try:
                if self._lease is None:
                    await self._rejoin()
                    continue
                reply = await self._client.refresh_lease(self._lease.id)
                if reply is None or reply.TTL <= 0:
                    log.warning("fleet lease lapsed; joining again")
                    self._lease = None
                    await self._rejoin()
                elif not self.connected:
                    log.warning("etcd reachable again at %s:%d", self.host, self.port)
                    self.connected = True
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.connected:
                    log.warning(
                        "etcd unreachable at %s:%d (%s): serving what this pod holds", self.host, self.port, _why(e)
                    )
                self.connected = False

    async def _rejoin(self) -> None:
        await self._join()
        log.warning("rejoined the fleet through etcd at %s:%d", self.host, self.port)
        if self.on_reconnect is not None:
            await self.on_reconnect()

    async def close(self) -> None:
        """Deregister: revoke the lease (its records go at once) and stop watching."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._lease is not None and self.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.revoke_lease(self._lease.id), self.timeout)
        await self._close_client()

    async def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()

    # -- writes ----------------------------------------------------------------
    async def _do(self, coro: Any) -> Any:
        if self._lease is None:
            coro.close()
            raise StoreUnavailable("not joined to etcd")
        from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

        try:
            return await coro
        except StoreUnavailable:
            raise
        except Exception as e:
            if isinstance(e, (ConnectionFailedError, ConnectionTimeoutError, asyncio.TimeoutError)):
                self.connected = False  # the keepalive loop says when it is back
            raise StoreUnavailable(f"etcd at {self.host}:{self.port}: {_why(e)}") from None

    async def publish_pod(self, pod: PodRecord) -> None:
        pod.lease = self._lease.id if self._lease is not None else 0
        await self._do(self._client.put(self._key(f"pods/{pod.id}"), pod.dumps(), lease=self._lease))

    async def set_holdings(self, changes: list[tuple[str, bool]], last_used: dict[str, float] | None = None) -> None:
        if self._lease is None:
            raise StoreUnavailable("not joined to etcd")
        t = self._client.transactions
        lease = self._lease.id
        ops = []
        for model, held in changes:
            key = self._key(f"holders/{model}/{self.pod.id}")
            if held:
                ops += [
                    t.put(key, b"{}", lease=lease),
                    t.delete(self._key(f"claims/{model}")),
                    t.delete(self._key(f"failures/{model}/{self.pod.id}")),  # it loads here now
                ]
            else:
                ops.append(t.delete(key))
                when = (last_used or {}).get(model)
                if when:
                    ops.append(t.put(self._key(f"lastused/{model}"), orjson.dumps(when)))
        for chunk in _chunks(ops, TXN_OPS):
            await self._do(self._client.transaction(compare=[], success=chunk, failure=[]))

    async def claim(self, model: str, pod: PodRecord) -> str:
        """A claim bound to the chosen pod's lease: it lapses with that pod."""
        t = self._client.transactions
        key = self._key(f"claims/{model}")
        value = orjson.dumps({"pod": pod.id, "at": time.time()})
        try:
            ok, responses = await self._do(
                self._client.transaction(
                    compare=[t.create(key) == 0],
                    success=[t.put(key, value, lease=pod.lease or None)],
                    failure=[t.get(key)],
                )
            )
        except StoreUnavailable:
            if not self.connected or not pod.lease:
                raise
            # The chosen pod's lease is gone (it rejoined, or died): a claim that only ages out.
            ok, responses = await self._do(
                self._client.transaction(
                    compare=[t.create(key) == 0], success=[t.put(key, value)], failure=[t.get(key)]
                )
            )
        if ok:
            return pod.id
        for raw, _ in responses[0] if responses else ():
            return orjson.loads(raw)["pod"]
        return pod.id  # deleted in between: take it as ours

    async def release_claim(self, model: str) -> None:
        await self._do(self._client.delete(self._key(f"claims/{model}")))

    async def register(self, docs: dict[str, dict[str, Any]]) -> int:
        new = [(k, v) for k, v in docs.items() if k not in self.view.models]
        t = self._client.transactions
        for chunk in _chunks(new, TXN_OPS):
            ops = [t.put(self._key(f"models/{k}"), orjson.dumps(v)) for k, v in chunk]
            await self._do(self._client.transaction(compare=[], success=ops, failure=[]))
        return len(new)

    async def record_failure(self, model: str, pod: str, reason: str) -> None:
        value = orjson.dumps({"reason": reason, "at": time.time()})
        await self._do(self._client.put(self._key(f"failures/{model}/{pod}"), value))

    async def set_setting(self, name: str, value: Any) -> None:
        await self._do(self._client.put(self._key(f"settings/{name}"), orjson.dumps(value)))


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


def open_store(url: str | None, lease_seconds: float = 10.0) -> CoordinationStore:
    """The store a ``--store`` URL names; None or ``inprocess``: the embedded default."""
    if not url or url == "inprocess":
        return InProcessStore()
    return EtcdStore(url, lease_seconds)
