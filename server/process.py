"""Run one meshserve process: REST (uvicorn) and gRPC (grpc.aio) on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator

import uvicorn

from server.dataplane import DataPlane
from server.grpc.servicer import build_grpc_server
from server.rest import build_rest_app
from server.settings import Settings

log = logging.getLogger("meshserve")


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: this process owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run(settings: Settings, started: asyncio.Event | None = None) -> None:
    dataplane = DataPlane(settings)
    grpc_server = build_grpc_server(dataplane, settings.max_request_bytes)
    try:
        grpc_port = grpc_server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    except RuntimeError:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port} (address in use?)") from None
    config = uvicorn.Config(
        build_rest_app(dataplane, settings.max_request_bytes),
        host=settings.host,
        port=settings.http_port,
        lifespan="off",
        access_log=False,
        log_config=None,
        http="httptools",
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    http_server = _UvicornServer(config)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    await grpc_server.start()
    http_task = asyncio.ensure_future(http_server.serve())
    while not http_server.started:
        if http_task.done():
            await grpc_server.stop(None)
            http_task.result()
            raise OSError(f"REST server on {settings.host}:{settings.http_port} did not start")
        await asyncio.sleep(0.01)
    log.info("REST on %s:%d, gRPC on %s:%d", settings.host, settings.http_port, settings.host, grpc_port)

    await dataplane.start()
    # Everything imported and loaded so far lives as long as the process: keep it out of the
    # cyclic GC's scans, which otherwise grow with every library a model pulls in and are
    # paid by requests.
    gc.collect()
    gc.freeze()
    log.info("ready: %s", dataplane.ready())
    if started is not None:
        started.set()
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, http_task], return_when=asyncio.FIRST_COMPLETED)

    log.info("shutting down")
    await dataplane.leave()
    dataplane.drain()
    http_server.should_exit = True
    await asyncio.gather(grpc_server.stop(settings.shutdown_grace_seconds), http_task, return_exceptions=True)
    await dataplane.stop()
    waiter.cancel()


def serve(settings: Settings | None = None) -> None:
    """Serve until SIGINT/SIGTERM (``from meshserve import serve``)."""
    settings = settings or Settings.load()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.memory import tune_allocator

    tune_allocator()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(run(settings))
    except OSError as e:
        log.error("%s", e)
        raise SystemExit(1) from None
