"""``meshserve adapters``: the adapters as their own process.

It has its own port, token(s), job store and ``/metrics``, and reaches the model server
only through its public API (adapters/modelserver.py) and Kubernetes through its API
(adapters/kube.py). ``serve --adapters`` starts one as a child (adapters/child.py) and
proxies ``/v1/adapters/*`` to it (adapters/proxy.py).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from meshserve.adapters.manager import Manager
from meshserve.adapters.modelserver import ModelServer
from meshserve.adapters.rest import PREFIX, add_routes
from meshserve.adapters.settings import AdaptersSettings
from meshserve.protocol.errors import InferenceError
from meshserve.protocol.rest_codec import encode_error
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("meshserve.adapters")
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
WEBHOOK_PREFIX = f"{PREFIX}/events/"
CHALLENGE = {"www-authenticate": 'Bearer realm="meshserve"'}


def tokens(settings: AdaptersSettings) -> list[bytes]:
    out = []
    if settings.auth_token is not None and settings.auth_token.get_secret_value():
        out.append(settings.auth_token.get_secret_value().encode())
    if settings.auth_token_file is not None:
        for line in Path(settings.auth_token_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(line.strip().encode())
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_startup(settings: AdaptersSettings) -> None:
    """The sidecar runs commands for its clients: off loopback it needs a token (ValueError)."""
    if not tokens(settings) and not is_loopback(settings.host):
        raise ValueError(
            f"binding {settings.host} (not loopback) needs an auth token (MESHSERVE_ADAPTERS_AUTH_TOKEN or "
            "MESHSERVE_ADAPTERS_AUTH_TOKEN_FILE): the adapters start training, tuning and workflow commands"
        )


def _allowed(accepted: list[bytes], request: Request) -> bool:
    given = request.headers.get("x-api-key", "").encode() or None
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, rest = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            given = rest.strip().encode()
    if not given:
        return False
    ok = False
    for token in accepted:
        ok |= hmac.compare_digest(given, token)
    return ok


def _error(status: int, message: str) -> Response:
    return Response(encode_error(message), status_code=status, media_type="application/json")


def build_app(manager: Manager, accepted: list[bytes], registry: CollectorRegistry) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager.recover()
        yield
        await manager.close()

    app = FastAPI(title="meshserve adapters", lifespan=lifespan)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Response:
        path = request.url.path
        # Probes and scrapes stay open; GitHub's webhook carries its own HMAC signature.
        if accepted and path not in (HEALTH_PATH, METRICS_PATH) and not path.startswith(WEBHOOK_PREFIX):
            if not _allowed(accepted, request):
                return Response(encode_error("missing or invalid credentials"), status_code=401,
                                media_type="application/json", headers=CHALLENGE)  # fmt: skip
        return await call_next(request)

    @app.exception_handler(InferenceError)
    async def _inference_error(_: Request, e: InferenceError) -> Response:
        return _error(e.http_status, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> Response:
        return _error(400, f"invalid request: {e.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> Response:
        log.exception("unhandled error")
        return _error(500, "internal server error")

    @app.get(HEALTH_PATH, include_in_schema=False)
    async def health() -> Response:
        return Response(b'{"live":true}', media_type="application/json")

    @app.get(METRICS_PATH, include_in_schema=False)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    add_routes(app, manager)
    return app


def build(settings: AdaptersSettings) -> tuple[FastAPI, Manager]:
    server = ModelServer.from_settings(settings)

    async def registrar(name: str, path: Path, config: dict[str, Any]) -> None:
        await server.load(name, config)

    manager = Manager(settings, registrar, model_server=server)
    registry = CollectorRegistry()
    manager.register_metrics(registry)
    return build_app(manager, tokens(settings), registry), manager


def serve(settings: AdaptersSettings) -> None:
    """Serve until SIGINT/SIGTERM."""
    import uvicorn

    check_startup(settings)
    app, _ = build(settings)
    log.info("adapters on %s:%d; model server %s; state in %s", settings.host, settings.port,
             settings.model_server_url, settings.state_dir)  # fmt: skip
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=5)  # fmt: skip
