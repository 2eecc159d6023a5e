"""The dashboard's routes: the page and its two files (no data in them, so no token needed to
fetch them), and the JSON feed, which is behind the API's auth like every other route.

A browser cannot add a header to a navigation, so the page asks for the token once,
keeps it in the tab's sessionStorage and sends it as ``Authorization: Bearer`` on its
fetches. The page's headers allow scripts, styles and fetches from this origin only.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response
from meshserve.server.dashboard import Query, dashboard_state
from meshserve.server.dataplane import DataPlane

DASHBOARD_PATH = "/dashboard"
STATE_PATH = "/v2/dashboard/state"
FILES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("meshserve.server").joinpath("static", name).read_bytes()


def add_dashboard(app: FastAPI, dp: DataPlane) -> None:
    page = _read("dashboard.html")
    files = {name: (_read(name), ctype) for name, ctype in FILES.items()}

    @app.get(DASHBOARD_PATH, include_in_schema=False)
    @app.get(DASHBOARD_PATH + "/", include_in_schema=False)
    async def dashboard() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get(DASHBOARD_PATH + "/{name}", include_in_schema=False)
    async def dashboard_file(name: str) -> Response:
        if name not in files:
            return Response(b'{"error":"not found"}', status_code=404, media_type="application/json")
        body, ctype = files[name]
        return Response(body, media_type=ctype, headers=PAGE_HEADERS)

    @app.get(STATE_PATH, summary="The dashboard's feed: cache, one page of models, fleet, LLM engines")
    async def dashboard_feed(request: Request) -> Response:
        from meshserve.protocol.rest_codec import dumps

        params = request.query_params
        doc = dashboard_state(dp, Query.parse(params), own=params.get("own") == "1")
        return Response(dumps(doc), media_type="application/json", headers={"cache-control": "no-store"})
