"""OpenTelemetry spans from a real server, children of the caller's traceparent."""

from __future__ import annotations

import json
import time

import grpc
import httpx

from tests.prod.conftest import grpc_infer_request, grpc_stub, infer_doc
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
