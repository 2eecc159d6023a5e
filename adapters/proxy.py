"""The serving process's side of the sidecar: ``/v1/adapters/*`` passed through to it.

The request goes as it came (method, path, query, body, the client's credentials and
GitHub's signature headers): the sidecar checks them itself. Nothing of the adapters runs
in the serving process, so every server worker proxies alike. ``/metrics`` answers the
server's metrics followed by the sidecar's.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from meshserve.protocol.rest_codec import encode_error

log = logging.getLogger("meshserve.adapters")
PREFIX = "/v1/adapters"
FORWARDED = ("content-type", "accept", "authorization", "x-api-key", "x-github-event", "x-hub-signature-256",
             "x-github-delivery", "x-request-id")  # fmt: skip
METHODS = ["GET", "POST", "PUT", "DELETE"]
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


def mount_proxy(app: FastAPI, url: str, registry: Any) -> None:
    """Add the pass-through routes to ``app`` (before its own /metrics route, which this one shadows)."""
    base = url.rstrip("/")
    client = httpx.AsyncClient(base_url=base, timeout=TIMEOUT)

    @app.api_route(PREFIX + "/{path:path}", methods=METHODS, include_in_schema=False)
    async def adapters(path: str, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        try:
            r = await client.request(request.method, f"{PREFIX}/{path}", params=request.query_params,
                                     content=await request.body(), headers=headers)  # fmt: skip
        except httpx.HTTPError as e:
            log.warning("adapters sidecar %s: %s: %s", base, type(e).__name__, e)
            return Response(encode_error(f"the adapters sidecar is not reachable ({type(e).__name__})"),
                            status_code=503, media_type="application/json")  # fmt: skip
        keep = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "www-authenticate")}
        return Response(r.content, status_code=r.status_code, headers=keep)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        own = generate_latest(registry)
        try:
            r = await client.get("/metrics", timeout=2.0)
            theirs = r.content if r.status_code == 200 else b""
        except httpx.HTTPError:
            theirs = b""  # the server's own metrics still answer
        return Response(own + theirs, media_type=CONTENT_TYPE_LATEST)
