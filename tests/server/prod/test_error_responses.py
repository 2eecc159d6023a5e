"""Every REST error carries the request id (the client's, or a new one) and the one
``{"error": ...}`` shape, whichever path answers it: FastAPI's 404, the infer front, auth,
the size check, and the worker that forwards to the owner of a model (--workers 2)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from meshserve.protocol.grpc import grpc_service_pb2 as pb

from tests.server.prod.conftest import grpc_stub, infer_doc
from tests.support.server import start_server

TOKEN = "errors-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
LIMIT = 4096


@pytest.fixture(scope="module")
def srv(prod_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    s = start_server(prod_models, d / "server.log", "--workers", "2", "--max-request-bytes", str(LIMIT),
                     env={"MESHSERVE_AUTH_TOKEN": TOKEN})  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.http_url, timeout=10) as c:
        yield c


# (method, path, headers, body, status); model paths go through the owner of the model.
CASES = {
    "unknown route": ("GET", "/v2/no/such/route", AUTH, None, 404),
    "unknown model": ("GET", "/v2/models/nope", AUTH, None, 404),
    "unknown model infer": ("POST", "/v2/models/nope/infer", AUTH, b"{}", 404),
    "bad infer body": ("POST", "/v2/models/slow/infer", AUTH, b'{"inputs": 3}', 400),
    "bad metadata method": ("DELETE", "/v2/models/slow", AUTH, None, 405),
    "no token on infer": ("POST", "/v2/models/slow/infer", {}, b"{}", 401),
    "no token on metadata": ("GET", "/v2", {}, None, 401),
    "no token on index": ("POST", "/v2/repository/index", {}, b"{}", 401),
    "body too large": ("POST", "/v2/models/slow/infer", AUTH, b" " * (LIMIT + 1), 413),
    "body too large elsewhere": ("POST", "/v2/repository/models/slow/load", AUTH, b" " * (LIMIT + 1), 413),
}


@pytest.mark.parametrize("case", CASES)
def test_error_carries_the_request_id_sent(http, case):
    method, path, headers, body, status = CASES[case]
    rid = f"rid-{case.replace(' ', '-')}"
    r = http.request(method, path, headers={**headers, "x-request-id": rid}, content=body)
    assert r.status_code == status, r.text
    assert r.headers["x-request-id"] == rid
    assert r.headers["content-type"] == "application/json"
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("case", CASES)
def test_error_gets_a_new_request_id(http, case):
    method, path, headers, body, status = CASES[case]
    a = http.request(method, path, headers=headers, content=body)
    b = http.request(method, path, headers=headers, content=body)
    assert a.status_code == b.status_code == status
    assert len(a.headers["x-request-id"]) >= 8 and a.headers["x-request-id"] != b.headers["x-request-id"]


def test_forwarded_request_keeps_one_id(http):
    """Whichever worker accepted it, the owner answers with the id the client sent."""
    for name in ("slow", "rows", "hooks"):
        r = http.post(f"/v2/models/{name}/infer", json=infer_doc([1.0]), headers={**AUTH, "x-request-id": name})
        assert r.status_code == 200 and r.headers["x-request-id"] == name


def test_not_ready_is_400_with_an_error(srv, http):
    """Triton answers a model that is not ready with 400 (Kubernetes counts any 4xx as failure);
    gRPC's ModelReady answers ready=false."""
    assert http.post("/v2/repository/models/hooks/unload", headers=AUTH).status_code == 200
    try:
        r = http.get("/v2/models/hooks/ready", headers={**AUTH, "x-request-id": "probe"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "probe"
        assert r.json()["ready"] is False and "not ready" in r.json()["error"]
        with grpc.insecure_channel(srv.grpc_address) as channel:
            md = tuple(AUTH.items())
            assert not grpc_stub(channel).ModelReady(pb.ModelReadyRequest(name="hooks"), metadata=md, timeout=5).ready
    finally:
        assert http.post("/v2/repository/models/hooks/load", headers=AUTH).status_code == 200
    r = http.get("/v2/models/hooks/ready", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"name": "hooks", "ready": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_pod_wide_views_pass_the_credentials_on(http):
    """/metrics and the repository index gather every worker's, with the caller's token."""
    r = http.get("/metrics", headers={**AUTH, "x-request-id": "scrape"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "scrape"
    assert "meshserve_models_registered" in r.text
    index = http.post("/v2/repository/index", headers=AUTH, json={}).json()
    assert {"slow", "rows", "hooks"} <= {row["name"] for row in index}
