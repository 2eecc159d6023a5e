"""Several serving processes without a copy of every model in each (``--workers N``).

MLServer's parallel inference loads every model in every worker: memory grows as
models x workers. Here each model has one owner worker, chosen by rendezvous hashing
of its name (stable across processes and restarts; adding a worker moves 1/N of the
models). All workers accept connections on the same REST and gRPC ports
(SO_REUSEPORT: the kernel spreads connections); a worker that receives a request for
a model it does not own passes it to the owner over that owner's private Unix
sockets, bytes through (REST: the raw request and response; gRPC: the message
re-sent as is), so only the owner decodes, queues, batches and predicts. Each worker
preloads only its own models and gets 1/N of the pod's model capacity.

``/metrics`` on any worker gathers every worker's figures (over the private sockets)
and sums samples with the same name and labels; the repository index takes each
model's row from its owner. The supervisor (the first process) starts the workers,
restarts one that dies, and on SIGTERM passes the signal on and exits 0 once they
have drained.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshserve.server.upstream import SYNC_HEADER, HttpPool, unix_connect

if TYPE_CHECKING:
    from meshserve.server.settings import Settings
    from meshserve.server.worker_copies import WorkerCopies

log = logging.getLogger(__name__)

MODEL_PATH = re.compile(r"^/v2/(?:repository/)?models/(?P<name>[^/]+)")
REPOSITORY_CHANGE = re.compile(r"^/v2/repository/models/(?P<name>[^/]+)/(?P<action>load|unload)$")


def owner_of(name: str, workers: int) -> int:
    """Rendezvous (highest random weight) hashing: the worker with the top score owns it."""
    best, owner = b"", 0
    for i in range(workers):
        score = hashlib.blake2b(f"{i}\0{name}".encode(), digest_size=8).digest()
        if score > best:
            best, owner = score, i
    return owner


class LocalHttp(HttpPool):
    """A worker's private Unix socket, with kept-alive connections."""

    def __init__(self, path: str) -> None:
        super().__init__(unix_connect(path))
        self.path = path


class Router:
    """This worker's place among its peers: who owns what, and how to reach them."""

    def __init__(self, index: int, workers: int, rundir: str) -> None:
        self.index = index
        self.workers = workers
        self.rundir = rundir
        self._owners: dict[str, int] = {}
        self._http = {i: LocalHttp(self.http_socket(i)) for i in range(workers) if i != index}
        self._own_http = LocalHttp(self.http_socket(index))  # this worker's private socket
        self._channels: dict[int, Any] = {}
        self.copies: WorkerCopies | None = None  # set once the data plane exists

    def http_socket(self, i: int) -> str:
        return os.path.join(self.rundir, f"w{i}.http")

    def grpc_socket(self, i: int) -> str:
        return os.path.join(self.rundir, f"w{i}.grpc")

    def owner(self, name: str) -> int:
        o = self._owners.get(name)
        if o is None:
            if len(self._owners) > 65536:
                self._owners.clear()
            o = self._owners[name] = owner_of(name, self.workers)
        return o

    def mine(self, name: str) -> bool:
        return self.owner(name) == self.index

    def serve_here(self, name: str, version: str | None = None) -> bool:
        """An infer request for ``name`` is served by this worker: it owns the model or holds a copy."""
        return self.copies.serve_here(name, version) if self.copies is not None else self.mine(name)

    def peers(self) -> Iterator[tuple[int, LocalHttp]]:
        return iter(self._http.items())

    def http(self, i: int) -> LocalHttp:
        return self._http[i] if i != self.index else self._own_http

    async def sync(self, name: str, action: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """After the owner loaded or unloaded ``name``, every other worker drops its copy (and,
        after a load with a config, registers it): replayed over their private sockets."""
        owner = self.owner(name)
        target = f"/v2/repository/models/{name}/{action}".encode()
        for i in range(self.workers):
            if i == owner:
                continue
            try:
                status, _, data = await self.http(i).request(b"POST", target, headers, body, [(SYNC_HEADER, b"1")])
            except OSError:
                continue  # restarting: it comes back with no copies
            if status != 200:
                log.warning("worker %d did not take the %s of %s: %s", i, action, name, data[:200])

    def channel(self, i: int) -> Any:
        ch = self._channels.get(i)
        if ch is None:
            import grpc

            ch = self._channels[i] = grpc.aio.insecure_channel(f"unix:{self.grpc_socket(i)}")
        return ch

    async def close(self) -> None:
        if self.copies is not None:
            await self.copies.close()
        self._own_http.close()
        for h in self._http.values():
            h.close()
        for ch in self._channels.values():
            await ch.close()

    # -- gathered views -------------------------------------------------------
    async def metrics(self, own: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        texts = [own]
        for _, peer in self.peers():
            try:
                status, _, body = await peer.request(b"GET", b"/metrics", headers, b"")
            except OSError:
                continue  # a worker restarting: its figures are back at the next scrape
            if status == 200:
                texts.append(body)
        return merge_metrics(texts)

    async def all_ready(self, headers: list[tuple[bytes, bytes]]) -> bool:
        for _, peer in self.peers():
            try:
                status, _, _ = await peer.request(b"GET", b"/v2/health/ready", headers, b"")
            except OSError:
                return False
            if status != 200:
                return False
        return True

    async def repository_index(
        self, own: list[dict[str, Any]], body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> list[dict[str, Any]]:
        import orjson

        rows = [r for r in own if self.mine(r["name"])]
        for i, peer in self.peers():
            status, _, data = await peer.request(b"POST", b"/v2/repository/index", headers, body)
            if status == 200:
                rows += [r for r in orjson.loads(data) if self.owner(r["name"]) == i]
        rows.sort(key=lambda r: (r["name"], r.get("version") or ""))
        return rows

    async def dashboard_states(self, query: str, headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
        """Each peer's dashboard feed for its own models (a restarting worker is left out)."""
        import orjson

        async def one(peer: LocalHttp) -> dict[str, Any] | None:
            try:
                status, _, data = await peer.request(b"GET", b"/v2/dashboard/state?" + query.encode(), headers, b"")
            except OSError:
                return None
            return orjson.loads(data) if status == 200 else None

        states = await asyncio.gather(*(one(peer) for _, peer in self.peers()))
        return [s for s in states if s is not None]


# Gauges every worker reports whole (each registers every model): the pod's value is
# any one worker's, so the merge takes the largest instead of the sum.
SAME_IN_EVERY_WORKER = frozenset({"meshserve_models_registered"})


def merge_metrics(texts: list[bytes]) -> bytes:
    """Sum samples with the same name and labels across workers (counters, histogram
    buckets, sums and counts, gauges), except the gauges in ``SAME_IN_EVERY_WORKER``
    (their largest); ``_created`` timestamps are left out."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text.decode()):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                sums[fam.name] = {}
            acc = sums[fam.name]
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                if fam.name in SAME_IN_EVERY_WORKER:
                    acc[key] = max(acc.get(key, s.value), s.value)
                else:
                    acc[key] = acc.get(key, 0.0) + s.value
    for name, fam in families.items():
        for (sample, labels), value in sums[name].items():
            fam.add_sample(sample, dict(labels), value)

    class _Merged:
        def collect(self):
            return [f for f in families.values() if f.samples]

    registry = CollectorRegistry()
    registry.register(_Merged())
    return generate_latest(registry)


# -- processes ---------------------------------------------------------------------
def reuseport_socket(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """A listening TCP socket; ``reuse_port``: shared by the workers (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker_main(settings: Settings, index: int, rundir: str) -> None:
    from meshserve.server.process import serve

    serve(settings, Router(index, settings.workers, rundir))


def supervise(settings: Settings) -> int:
    """Start the workers, restart one that dies, pass SIGTERM/SIGINT on; 0 when all drained."""
    n = settings.workers
    # A port held by another program: fail now, as one process would (workers share
    # ports with SO_REUSEPORT, which would not notice a stranger that set it too).
    for attr in ("http_port", "grpc_port"):
        port = getattr(settings, attr)
        if port:
            family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((settings.host, port))
                except OSError:
                    log.error("cannot bind %s:%d (address in use?)", settings.host, port)
                    return 1
    rundir = tempfile.mkdtemp(prefix="meshserve-workers-")
    # Every worker must bind the same ports: resolve port 0 once, here.
    probe = []
    for attr in ("http_port", "grpc_port"):
        if getattr(settings, attr) == 0:
            s = reuseport_socket(settings.host, 0)
            probe.append(s)
            settings = settings.model_copy(update={attr: s.getsockname()[1]})
    if settings.capacity_bytes is None:
        from meshserve.server.capacity import default_capacity

        settings = settings.model_copy(update={"capacity_bytes": max(1, default_capacity(settings.capacity_fraction))})
    # Each worker holds its own models: a 1/N share of the pod's model memory.
    settings = settings.model_copy(update={"capacity_bytes": max(1, settings.capacity_bytes // n)})
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    started: dict[int, float] = {}

    def start(i: int) -> None:
        p = ctx.Process(target=_worker_main, args=(settings, i, rundir), name=f"meshserve-worker-{i}")
        p.start()
        procs[i] = p
        started[i] = time.monotonic()

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(n):
        start(i)
    for s in probe:
        s.close()
    log.info("started %d workers (%s)", n, ", ".join(str(p.pid) for p in procs.values()))
    quick_failures = 0
    rc = 0
    try:
        while True:
            time.sleep(0.2)
            if stopping:
                deadline = time.monotonic() + settings.shutdown_grace_seconds + settings.drain_seconds + 15
                for p in procs.values():
                    p.join(max(0.1, deadline - time.monotonic()))
                    if p.is_alive():
                        p.kill()
                        rc = 1
                    elif p.exitcode not in (0, -signal.SIGTERM):
                        rc = 1
                break
            for i, p in list(procs.items()):
                if not p.is_alive() and not stopping:
                    # A worker that dies soon after starting, again and again, will not get
                    # better: give up (exit 1) and let the orchestrator back off.
                    quick = time.monotonic() - started[i] < 30
                    quick_failures = quick_failures + 1 if quick else 0
                    if quick_failures >= 5:
                        log.error("workers keep exiting at start; stopping")
                        on_signal(signal.SIGTERM, None)
                        rc = 1
                        break
                    wait = 5.0 if quick_failures > 1 else 1.0
                    log.error("worker %d (pid %s) exited with %s; restarting in %gs", i, p.pid, p.exitcode, wait)
                    time.sleep(wait)
                    if not stopping:
                        start(i)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return rc


def worker_sockets(settings: Settings, router: Router) -> tuple[socket.socket, str]:
    """The shared REST socket and this worker's private one (a stale file is removed)."""
    private = router.http_socket(router.index)
    Path(private).unlink(missing_ok=True)
    Path(router.grpc_socket(router.index)).unlink(missing_ok=True)
    return reuseport_socket(settings.host, settings.http_port), private
