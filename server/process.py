"""Run one meshserve process: REST (uvicorn) and gRPC (grpc.aio) on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from meshserve.server.compose import build_process
from meshserve.server.dataplane import DataPlane
from meshserve.server.rest.connections import bounded_http_protocol
from meshserve.server.security import grpc_server_credentials
from meshserve.server.settings import Settings

if TYPE_CHECKING:
    from meshserve.server.workers import Router

log = logging.getLogger("meshserve")


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: this process owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# uvicorn's own start/stop lines come once per uvicorn server (a worker runs two, one on a Unix
# socket, where "Press CTRL+C to quit" means nothing): meshserve logs one line per process instead.
_UVICORN_LIFECYCLE = (
    "Started server process", "Finished server process", "Uvicorn running on", "Shutting down",
    "Waiting for connections to close", "Waiting for background tasks", "Waiting for application",
)  # fmt: skip


class _UvicornLifecycleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_UVICORN_LIFECYCLE))


def _quiet_uvicorn_lifecycle() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _UvicornLifecycleFilter) for f in logger.filters):
        logger.addFilter(_UvicornLifecycleFilter())


async def run(settings: Settings, started: asyncio.Event | None = None, router: Router | None = None) -> None:
    """Serve until SIGINT/SIGTERM. With ``router`` this is one of several workers
    (server/workers.py): shared ports, plus private sockets its peers forward to."""
    _quiet_uvicorn_lifecycle()
    process = build_process(settings, router)
    dataplane, grpc_server = process.dataplane, process.grpc_server
    credentials = grpc_server_credentials(settings)
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        if credentials is not None:
            grpc_port = grpc_server.add_secure_port(address, credentials)
        else:
            grpc_port = grpc_server.add_insecure_port(address)
    except RuntimeError:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port} (address in use?)") from None
    tls = settings.tls_cert is not None and settings.tls_key is not None
    http = bounded_http_protocol(settings.max_header_bytes, settings.header_timeout_seconds)
    # proxy_headers off: uvicorn's X-Forwarded-For rewrite of the client address (a middleware
    # call per request) serves nothing here, as no part of meshserve reads the client address.
    common: dict[str, Any] = dict(
        lifespan="off", access_log=False, log_config=None, http=http, proxy_headers=False,
        timeout_keep_alive=settings.keepalive_timeout_seconds,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )  # fmt: skip
    config = uvicorn.Config(
        process.rest_app,
        host=settings.host,
        port=settings.http_port,
        ssl_certfile=str(settings.tls_cert) if tls else None,
        ssl_keyfile=str(settings.tls_key) if tls else None,
        limit_concurrency=settings.max_connections,
        **common,
    )
    http_server = _UvicornServer(config)
    private: list[tuple[uvicorn.Server, Any]] = []  # (REST, gRPC) on Unix sockets, for peers
    sockets = None
    if router is not None:
        from meshserve.server.workers import worker_sockets

        shared, uds = worker_sockets(settings, router)
        sockets = [shared]
        private_rest = _UvicornServer(uvicorn.Config(process.peer_rest_app, uds=uds, **common))
        private_grpc = process.peer_grpc_server
        assert private_grpc is not None
        private_grpc.add_insecure_port(f"unix:{router.grpc_socket(router.index)}")
        private.append((private_rest, private_grpc))

    else:  # bound here, so a taken port is one clear line, as for gRPC
        from meshserve.server.workers import reuseport_socket

        try:
            sockets = [reuseport_socket(settings.host, settings.http_port, reuse_port=False)]
        except OSError as e:
            raise OSError(f"cannot bind REST to {settings.host}:{settings.http_port} ({e.strerror or e})") from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    await grpc_server.start()
    tasks = [asyncio.ensure_future(http_server.serve(sockets=sockets))]
    for rest, grpc_private in private:
        await grpc_private.start()
        tasks.append(asyncio.ensure_future(rest.serve()))
    for server, task in zip([http_server, *(r for r, _ in private)], tasks, strict=True):
        while not server.started:
            if task.done():
                await grpc_server.stop(None)
                task.result()
                raise OSError(f"REST server on {settings.host}:{settings.http_port} did not start")
            await asyncio.sleep(0.01)
    who = f"worker {router.index}/{router.workers}: " if router is not None else ""
    log.info(
        "%sREST on %s:%d, gRPC on %s:%d (pid %d)",
        who, settings.host, settings.http_port, settings.host, grpc_port, os.getpid(),
    )  # fmt: skip

    try:
        await dataplane.start()
    except BaseException:  # e.g. etcd unreachable: close what started, then report
        http_server.should_exit = True
        await asyncio.gather(grpc_server.stop(None), *tasks, return_exceptions=True)
        raise
    # Start-up objects were frozen before any load (MemoryReclaimer.settle). Preloaded models
    # are not: frozen, an evicted one's code and cycles could never be collected.
    log.info("ready: %s", dataplane.ready())
    if started is not None:
        started.set()
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, tasks[0]], return_when=asyncio.FIRST_COMPLETED)

    await shutdown(settings, dataplane, http_server, tasks[0], grpc_server)
    for (rest, grpc_private), task in zip(private, tasks[1:], strict=True):
        # Peers may still forward requests they accepted before closing: these go last.
        await asyncio.sleep(1.0)
        rest.should_exit = True
        await asyncio.gather(grpc_private.stop(settings.shutdown_grace_seconds), task, return_exceptions=True)
    if router is not None:
        await router.close()
    await dataplane.stop()
    log.info("stopped")
    from meshserve.server.observe import flush_access_log

    flush_access_log()
    waiter.cancel()


async def shutdown(
    settings: Settings, dataplane: DataPlane, http_server: uvicorn.Server, http_task: asyncio.Future, grpc_server
) -> None:
    """Readiness false at once, the drain hooks, then close the listeners and give the
    requests already accepted the grace period to finish (the caller unloads the models)."""
    grace = settings.shutdown_grace_seconds
    log.info("shutting down: draining (not ready), finishing requests in flight (grace %gs)", grace)
    dataplane.drain()
    for hook in list(dataplane.drain_hooks):
        try:
            await asyncio.wait_for(hook(), grace or None)
        except Exception:
            log.exception("drain hook %r failed", hook)
    if settings.drain_seconds:
        await asyncio.sleep(settings.drain_seconds)
    http_server.should_exit = True
    await asyncio.gather(grpc_server.stop(grace), http_task, return_exceptions=True)


def serve(settings: Settings | None = None, router: Router | None = None) -> None:
    """Serve until SIGINT/SIGTERM (``from meshserve import serve``)."""
    settings = settings or Settings.load()
    from meshserve.server.security import check_startup

    check_startup(settings)  # ValueError: settings that need an auth token and have none
    from meshserve.server.observe import configure_logging

    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    from meshserve.server import tracing

    tracing.setup(settings.tracing, settings.server_name, settings.trace_probes)
    from meshserve.server.memory import tune_allocator

    tune_allocator()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.ExitStack() as stack:
        if settings.adapters and not settings.adapters_url and router is None:
            from meshserve.adapters.child import sidecar_child

            try:  # one sidecar for the whole process (every worker proxies to it)
                settings = stack.enter_context(sidecar_child(settings))
            except OSError as e:
                log.error("%s", e)
                raise SystemExit(1) from None
        if settings.workers > 1 and router is None:
            from meshserve.server.workers import supervise

            raise SystemExit(supervise(settings))
        try:
            asyncio.run(run(settings, router=router))
            tracing.shutdown()
        except OSError as e:
            log.error("%s", e)
            raise SystemExit(1) from None
