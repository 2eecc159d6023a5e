"""Metrics per model and protocol, request ids and JSON access logs, on a real server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import orjson
import pytest

from tests.server.prod.conftest import grpc_infer_request, grpc_stub, infer_doc, scrape
from tests.support.server import start_server


@pytest.fixture(scope="module")
def srv(prod_models, tmp_path_factory):
    s = start_server(
        prod_models, tmp_path_factory.mktemp("obs") / "server.log", "--log-format", "json", "--access-log", "all"
    )
    yield s
    s.stop()


def access_lines(srv) -> list[dict]:
    lines = []
    for line in srv.log().splitlines():
        if line.startswith("{"):
            doc = orjson.loads(line)
            if doc["logger"] == "meshserve.access":
                lines.append(doc)
    return lines


def test_rest_and_grpc_counts_phases_and_in_flight(srv):
    with httpx.Client(base_url=srv.http_url, timeout=10) as http:
        for _ in range(3):
            assert http.post("/v2/models/hooks/infer", json=infer_doc([1, 2])).status_code == 200
        assert http.post("/v2/models/hooks/infer", json={"inputs": "bad"}).status_code == 400
        assert http.post("/v2/models/no-such-model/infer", json=infer_doc([1])).status_code == 404
        with grpc.insecure_channel(srv.grpc_address) as channel:
            stub = grpc_stub(channel)
            for _ in range(2):
                out = stub.ModelInfer(grpc_infer_request("hooks", [1, 2]))
                assert list(out.outputs[0].contents.fp64_contents) == [2, 3]
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(grpc_infer_request("missing", [1]))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        count = "meshserve_inference_requests_total"
        deadline = time.monotonic() + 5  # a gRPC error reaches the client before its handler returns
        while True:
            text = http.get("/metrics").text
            if scrape(text, count, protocol="grpc") == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert scrape(text, count, model="hooks", protocol="rest", status="200") == 3
    assert scrape(text, count, model="hooks", protocol="rest", status="400") == 1
    assert scrape(text, count, model="hooks", protocol="grpc", status="OK") == 2
    # Unknown names never become labels.
    assert scrape(text, count, model="", protocol="rest", status="404") == 1
    assert scrape(text, count, model="", protocol="grpc", status="NOT_FOUND") == 1
    assert "no-such-model" not in text and 'model="missing"' not in text
    dur = "meshserve_inference_request_duration_seconds_count"
    assert scrape(text, dur, model="hooks", protocol="rest") == 4
    for phase in ("queue", "preprocess", "predict", "postprocess"):
        assert scrape(text, f"meshserve_inference_{phase}_duration_seconds_count", model="hooks") == 5, phase
    assert scrape(text, "meshserve_inference_requests_in_flight", model="hooks") == 0
    assert scrape(text, "meshserve_model_load_seconds_count") >= 3
    assert scrape(text, "meshserve_cache_capacity_bytes") > 0


def test_batch_sizes_and_in_flight_during_requests(srv):
    doc = infer_doc([1.0], sleep=0.3)
    with httpx.Client(base_url=srv.http_url, timeout=10) as http:
        before = scrape(http.get("/metrics").text, "meshserve_inference_batch_size_sum", model="rows")
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(http.post, "/v2/models/rows/infer", json=doc) for _ in range(8)]
            time.sleep(0.15)
            during = http.get("/metrics").text
            assert all(f.result().status_code == 200 for f in futures)
        after = http.get("/metrics").text
    assert scrape(during, "meshserve_inference_requests_in_flight", model="rows", protocol="rest") >= 1
    assert scrape(after, "meshserve_inference_batch_size_sum", model="rows") - before == 8
    # Merged: fewer executions than requests.
    assert scrape(after, "meshserve_inference_batch_size_count", model="rows") < 8
    assert scrape(after, "meshserve_inference_queue_duration_seconds_count", model="rows") >= 8


def test_request_ids_returned_and_logged_as_json(srv):
    with httpx.Client(base_url=srv.http_url, timeout=10) as http:
        r = http.post("/v2/models/hooks/infer", json=infer_doc([1]), headers={"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        generated = http.post("/v2/models/hooks/infer", json=infer_doc([1])).headers["x-request-id"]
        assert generated and generated != "abc-123"
        other = http.post("/v2/models/hooks/infer", json=infer_doc([1])).headers["x-request-id"]
        assert other != generated
        assert http.get("/v2/models/hooks", headers={"x-request-id": "meta-1"}).headers["x-request-id"] == "meta-1"
        bad = http.post("/v2/models/nope/infer", json=infer_doc([1]), headers={"x-request-id": "err-1"})
        assert bad.status_code == 404 and bad.headers["x-request-id"] == "err-1"
    with grpc.insecure_channel(srv.grpc_address) as channel:
        stub = grpc_stub(channel)
        req = grpc_infer_request("hooks", [1])
        _, call = stub.ModelInfer.with_call(req, metadata=[("x-request-id", "grpc-7")])
        assert ("x-request-id", "grpc-7") in tuple(call.trailing_metadata())
        _, call = stub.ModelInfer.with_call(req)
        assert dict(call.trailing_metadata())["x-request-id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        by_id = {line["request_id"]: line for line in access_lines(srv)}
        if {"abc-123", "meta-1", "err-1", "grpc-7", generated} <= set(by_id):
            break
        time.sleep(0.1)
    line = by_id["abc-123"]
    assert line["model"] == "hooks" and line["protocol"] == "rest" and line["status"] == 200
    assert line["latency_ms"] > 0 and line["level"] == "info" and line["ts"].endswith("Z")
    assert by_id["err-1"]["status"] == 404
    assert by_id["grpc-7"]["protocol"] == "grpc" and by_id["grpc-7"]["status"] == "OK"
    assert by_id[generated]["model"] == "hooks"
    # Every line of the log is JSON (no stray text lines).
    assert all(line.startswith("{") for line in srv.log().splitlines() if line.strip())


def test_stream_requests_are_counted(srv):
    with httpx.Client(base_url=srv.http_url, timeout=10) as http, grpc.insecure_channel(srv.grpc_address) as channel:
        count = "meshserve_inference_requests_total"
        before = scrape(http.get("/metrics").text, count, model="hooks", protocol="grpc", status="OK")
        requests = [grpc_infer_request("hooks", [i]) for i in range(3)] + [grpc_infer_request("typo", [1])]
        replies = list(grpc_stub(channel).ModelStreamInfer(iter(requests), timeout=10))
        assert [bool(r.error_message) for r in replies] == [False, False, False, True]
        text = http.get("/metrics").text
        assert scrape(text, count, model="hooks", protocol="grpc", status="OK") - before == 3
        assert scrape(text, count, model="", protocol="grpc", status="NOT_FOUND") >= 1


def test_by_default_only_failed_requests_get_an_access_line(prod_models, tmp_path):
    """Triton writes no line per request; meshserve's default writes one per failure only."""
    s = start_server(prod_models, tmp_path / "server.log", "--log-format", "json")
    try:
        with httpx.Client(base_url=s.http_url, timeout=10) as http:
            ok = http.post("/v2/models/hooks/infer", json=infer_doc([1]), headers={"x-request-id": "fine-1"})
            bad = http.post("/v2/models/nope/infer", json=infer_doc([1]), headers={"x-request-id": "bad-1"})
            assert ok.status_code == 200 and bad.status_code == 404
        with grpc.insecure_channel(s.grpc_address) as channel:
            stub = grpc_stub(channel)
            stub.ModelInfer(grpc_infer_request("hooks", [1]), metadata=[("x-request-id", "fine-2")])
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(grpc_infer_request("nope", [1]), metadata=[("x-request-id", "bad-2")])
        deadline = time.monotonic() + 5
        ids: set[str] = set()
        while time.monotonic() < deadline and not {"bad-1", "bad-2"} <= ids:
            ids = {line["request_id"] for line in access_lines(s)}
            time.sleep(0.1)
        assert {"bad-1", "bad-2"} <= ids and not ids & {"fine-1", "fine-2"}
    finally:
        s.stop()
