"""OpenTelemetry spans from a real server, children of the caller's traceparent."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest

from tests.server.prod.conftest import grpc_infer_request, grpc_stub, infer_doc
from tests.support.server import start_server

REST_TRACE, REST_PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
GRPC_TRACE, GRPC_PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


def _spans(path, trace_id: str, want: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists():
            spans = [json.loads(line) for line in path.read_text().splitlines()]
            spans = [s for s in spans if s["trace_id"] == trace_id]
            if len(spans) >= want:
                return spans
        time.sleep(0.1)
    raise AssertionError(f"no spans for {trace_id} in {path}")


def test_spans_follow_the_incoming_traceparent(prod_models, tmp_path):
    traces = tmp_path / "spans.jsonl"
    srv = start_server(prod_models, tmp_path / "server.log", "--tracing", env={"MESHSERVE_TRACE_FILE": str(traces)})
    try:
        r = httpx.post(
            f"{srv.http_url}/v2/models/hooks/infer", json=infer_doc([1]),
            headers={"traceparent": f"00-{REST_TRACE}-{REST_PARENT}-01"},
        )  # fmt: skip
        assert r.status_code == 200
        with grpc.insecure_channel(srv.grpc_address) as channel:
            md = [("traceparent", f"00-{GRPC_TRACE}-{GRPC_PARENT}-01")]
            assert grpc_stub(channel).ModelInfer(grpc_infer_request("hooks", [1]), metadata=md).outputs
        assert httpx.post(f"{srv.http_url}/v2/models/hooks/infer", json=infer_doc([1])).status_code == 200
        for trace, parent in ((REST_TRACE, REST_PARENT), (GRPC_TRACE, GRPC_PARENT)):
            spans = {s["name"]: s for s in _spans(traces, trace, 5)}
            root = spans["infer hooks"]
            assert root["parent_id"] == parent  # a child of the caller's span
            for child in ("decode", "queue", "predict", "encode"):
                assert spans[child]["parent_id"] == root["span_id"], child
            assert spans["predict"]["end"] - spans["predict"]["start"] > 0
        # Without a traceparent: a new trace of its own.
        deadline = time.monotonic() + 10
        while True:
            roots = [json.loads(line) for line in traces.read_text().splitlines()]
            trace_ids = {s["trace_id"] for s in roots if s["name"] == "infer hooks"}
            if len(trace_ids) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(trace_ids) == 3
    finally:
        assert srv.stop() == 0


# What `opentelemetry-instrument` does at interpreter start: instrument FastAPI (REST routes
# other than infer, health probes included) before meshserve builds its app.
SITECUSTOMIZE = (
    "from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor\nFastAPIInstrumentor().instrument()\n"
)


def _instrumented_spans(prod_models, tmp_path, *flags: str) -> list[dict]:
    pytest.importorskip("opentelemetry.instrumentation.fastapi")
    from tests.support.server import REPO

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    traces = tmp_path / "spans.jsonl"
    env = {"MESHSERVE_TRACE_FILE": str(traces), "PYTHONPATH": f"{site}:{REPO}"}
    srv = start_server(prod_models, tmp_path / "server.log", "--tracing", *flags, env=env)
    try:
        for _ in range(5):
            assert httpx.get(f"{srv.http_url}/v2/health/ready").status_code == 200
            assert httpx.get(f"{srv.http_url}/v2/health/live").status_code == 200
            assert httpx.get(f"{srv.http_url}/metrics").status_code == 200
        with grpc.insecure_channel(srv.grpc_address) as channel:
            from meshserve.protocol.grpc import grpc_service_pb2 as pb

            assert grpc_stub(channel).ServerReady(pb.ServerReadyRequest()).ready
        assert httpx.get(f"{srv.http_url}/v2/models/hooks").status_code == 200  # a FastAPI route: traced
        assert httpx.post(f"{srv.http_url}/v2/models/hooks/infer", json=infer_doc([1])).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            spans = [json.loads(line) for line in traces.read_text().splitlines()] if traces.exists() else []
            names = {s["name"] for s in spans}
            if "infer hooks" in names and any("/v2/models/" in n and "infer" not in n for n in names):
                return spans
            time.sleep(0.1)
        raise AssertionError(f"spans missing: {sorted(names)}")
    finally:
        assert srv.stop() == 0


def _path(span: dict) -> str:
    return span["attributes"].get("url.path") or span["attributes"].get("http.target") or ""


def test_probes_and_asgi_internals_are_not_traced(prod_models, tmp_path):
    spans = _instrumented_spans(prod_models, tmp_path)
    paths = {_path(s) for s in spans}
    assert "/v2/models/hooks" in paths  # the instrumentation works: a metadata request is a span
    assert not paths & {"/v2/health/ready", "/v2/health/live", "/metrics"}, paths
    assert not [s["name"] for s in spans if "asgi.event.type" in s["attributes"]]
    assert "infer hooks" in {s["name"] for s in spans}


def test_trace_probes_asks_for_them(prod_models, tmp_path):
    spans = _instrumented_spans(prod_models, tmp_path, "--trace-probes")
    paths = {_path(s) for s in spans}
    assert {"/v2/health/ready", "/v2/health/live", "/metrics"} <= paths, paths
    assert any("asgi.event.type" in s["attributes"] for s in spans)


def test_noise_rules():
    from meshserve.server.tracing import is_noise

    assert is_noise("GET /v2/health/ready", {"url.path": "/v2/health/ready"})
    assert is_noise("GET", {"http.target": "/metrics?x=1"})
    assert is_noise("/inference.GRPCInferenceService/ServerReady", {"rpc.method": "ServerReady"})
    assert is_noise("/grpc.health.v1.Health/Check", {})
    assert is_noise("POST /v2/models/{name}/infer http receive", {})
    assert not is_noise("GET /v2/models/{name}", {"url.path": "/v2/models/hooks"})
    assert not is_noise("/inference.GRPCInferenceService/ModelInfer", {"rpc.method": "ModelInfer"})
    assert not is_noise("infer hooks", {"meshserve.model": "hooks"})
