"""FastAPI routes for everything but infer: health, metadata, the model repository."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from meshserve.protocol.errors import InferenceError, InvalidInput
from meshserve.protocol.rest_codec import dumps, loads_object
from meshserve.server.dataplane import DataPlane
from meshserve.server.rest.errors import error_response, exception_response
from meshserve.server.version import __version__
from meshserve.server.workers import SYNC_HEADER
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(dumps(doc), status_code=status, media_type="application/json")


def _readiness(ok: bool, name: str | None = None) -> Response:
    from meshserve.server.rest.front import readiness

    status, body = readiness(ok, name)
    return Response(body, status_code=status, media_type="application/json")


async def _optional_json(request: Request) -> dict[str, Any]:
    """A JSON object body, where an empty body (as tritonclient sends) means {}."""
    body = await request.body()
    return loads_object(body) if body.strip() else {}


def build_api(dp: DataPlane) -> FastAPI:
    app = FastAPI(
        title="meshserve",
        version=__version__,
        description="Open Inference Protocol v2 (KServe V2 / Triton) over REST.",
    )

    # The front adds the request id to every FastAPI response; errors/headers come from one builder.
    @app.exception_handler(InferenceError)
    async def _inference_error(_: Request, e: InferenceError) -> Response:
        return exception_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> Response:
        return error_response(400, f"invalid request: {e.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> Response:
        return exception_response(e)

    if dp.settings.adapters_url:  # training, tuning, workflows, events: proxied to the adapters sidecar
        from meshserve.adapters.proxy import mount_proxy

        mount_proxy(app, dp.settings.adapters_url, dp.metrics)

    @app.get("/v2", summary="Server metadata")
    async def server_metadata() -> Response:
        return json_response(dp.server_metadata())

    @app.get("/v2/health/live", summary="Server liveness")
    async def live() -> Response:
        ok = dp.live()  # 400 when not, as Triton
        return json_response({"live": True}) if ok else error_response(400, "server is not live")

    @app.get("/v2/health/ready", summary="Server readiness")
    async def ready() -> Response:
        return _readiness(dp.ready())

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        from meshserve.server.metrics import scrape
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await scrape(dp.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2/models/{name}", summary="Model metadata")
    @app.get("/v2/models/{name}/versions/{version}", summary="Model version metadata")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return json_response(dp.model_metadata(name, version).to_dict())

    @app.get("/v2/models/{name}/ready", summary="Model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness")
    async def model_ready(name: str, version: str | None = None) -> Response:
        return _readiness(dp.model_ready(name, version), name)

    @app.post("/v2/models/{name}/infer", summary="Inference (served by the raw ASGI front)")
    @app.post("/v2/models/{name}/versions/{version}/infer", summary="Inference of one version")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        # The front answers infer itself; this route documents it and serves the
        # app when it is mounted elsewhere, through the same code path.
        from meshserve.server.rest.front import HEADER_LENGTH, run_infer

        raw = request.headers.get(HEADER_LENGTH)
        header_length = int(raw) if raw is not None and raw.isdigit() else None
        parts, json_length = await run_infer(dp, await request.body(), name, version, header_length)
        if json_length is None:
            return Response(b"".join(parts), media_type="application/json")
        return Response(
            b"".join(parts),
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(json_length)},
        )

    @app.post("/v2/repository/index", summary="Model repository index")
    async def repository_index(request: Request) -> Response:
        body = await _optional_json(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("'ready' must be a boolean")
        return json_response(dp.repository_index(ready_only=ready))

    @app.get("/v2/fleet/pods", summary="The pods of the fleet (with --store)")
    async def fleet_pods() -> Response:
        if dp.fleet is None:
            return error_response(404, "this server is not part of a fleet (no --store)")
        return json_response(dp.fleet.pods_summary())

    @app.post("/v2/repository/models/{name}/load", summary="Load or reload a model")
    async def load(name: str, request: Request) -> Response:
        body = await _optional_json(request)
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        config = params.get("config")
        if config is not None:
            config = loads_object(config.encode(), "parameters.config") if isinstance(config, str) else config
            if not isinstance(config, dict):
                raise InvalidInput("parameters.config must be a JSON object (or a string holding one)")
        if dp.copies is not None and request.headers.get(SYNC_HEADER.decode()) is not None:
            await dp.copies.sync(name, "load", config)  # another worker's load, replayed here
        else:
            await dp.load_model(name, config)
        return json_response({})

    @app.post("/v2/repository/models/{name}/unload", summary="Unload a model")
    async def unload(name: str, request: Request) -> Response:
        await _optional_json(request)
        if dp.copies is not None and request.headers.get(SYNC_HEADER.decode()) is not None:
            await dp.copies.sync(name, "unload", None)
        else:
            await dp.unload_model(name)
        return json_response({})

    from meshserve.server.rest.dashboard import add_dashboard

    add_dashboard(app, dp)
    from meshserve.server.llm.routes import build_llm_router

    app.include_router(build_llm_router(dp))
    _document_bodies(app)
    return app


def _document_bodies(app: FastAPI) -> None:
    """The OpenAPI document with the hand-decoded request bodies described (server/rest/openapi.py)."""
    from meshserve.server.rest.openapi import describe_bodies

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe_bodies(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
