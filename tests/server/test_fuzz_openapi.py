"""schemathesis over the REST OpenAPI document, against a real server with default flags.

Every operation (infer, generate, repository, OpenAI, metadata, health) gets generated
bodies, path and query parameters, valid and not. Properties: no 5xx, every answer within
its deadline, 4xx answers are ``{"error": ...}``, the server's RSS stays bounded, and it
still serves a known-good request afterwards. Bounded: 25 examples per operation (~30 s).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server.llm.api_support import llm_models
from tests.support.server import RunningServer, start_server

EXAMPLES_PER_OPERATION = 25
DEADLINE_S = 20.0  # generations are bounded by the tiny model's context: far under this
RSS_GROWTH_LIMIT = 200 * 1024 * 1024
MODELS = ("echo", "tiny-llama")
SEEN: dict[str, int] = {"requests": 0, "4xx": 0}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> RunningServer:
    from tests.server.llm.tiny_llama import build

    base = tmp_path_factory.mktemp("fuzz")
    s = start_server(llm_models(base, build(base / "tiny-llama-src")), base / "server.log")
    s.rss_start = _rss(s.proc.pid)  # type: ignore[attr-defined]
    yield s
    s.stop()


def _aim(case) -> None:
    """Point most cases at a real model, so the fuzzer reaches past the 404."""
    key = hash(repr(case.body)) % (len(MODELS) + 1)
    if key < len(MODELS):
        if "name" in (case.path_parameters or {}):
            case.path_parameters["name"] = MODELS[key]
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny-llama"
    if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
        case.body["max_tokens"] = case.body["max_tokens"] % 64  # keep within the tiny model's context
    if "version" in (case.path_parameters or {}) and key % 2:
        case.path_parameters["version"] = "1"


def _operations(srv: RunningServer) -> list:
    schema = schemathesis.openapi.from_url(f"{srv.http_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_no_operation_answers_5xx_or_hangs(srv):
    """Each operation of the document, fuzzed in turn (schemathesis's strategies, driven by
    hypothesis directly: its pytest plugin does not run under pytest 9)."""
    operations = _operations(srv)
    assert len(operations) >= 20  # infer, generate, repository, OpenAI, metadata, health, ...
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)  # fmt: skip
        def fuzz(case) -> None:
            _aim(case)
            t0 = time.monotonic()
            response = case.call(timeout=DEADLINE_S)
            elapsed = time.monotonic() - t0
            SEEN["requests"] += 1
            where = f"{case.method} {case.formatted_path} body={str(case.body)[:300]}"
            assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
            assert elapsed < DEADLINE_S, where
            if 400 <= response.status_code < 500:
                SEEN["4xx"] += 1
                assert "error" in response.json(), f"{where} -> {response.text[:300]}"
            if case.formatted_path.endswith("/unload") and response.status_code == 200:
                # The fuzzer unloaded a model: load it again, so later cases do not see a 503 we asked for.
                reload = httpx.post(f"{srv.http_url}{case.formatted_path.removesuffix('/unload')}/load", timeout=60)
                assert reload.status_code == 200, reload.text

        try:
            fuzz()
        except AssertionError as e:
            failures.append(str(e)[:600])
    assert not failures, "\n".join(failures)


def test_the_server_still_serves_and_stayed_bounded(srv):
    """Runs after the fuzzer (file order)."""
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.5]}]}
    r = httpx.post(f"{srv.http_url}/v2/models/echo/infer", json=doc, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.5]
    assert httpx.get(f"{srv.http_url}/v2/health/ready").json() == {"ready": True}
    growth = _rss(srv.proc.pid) - srv.rss_start
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.0f} MiB over {SEEN['requests']} requests"
    print(f"\nschemathesis: {SEEN['requests']} requests, {SEEN['4xx']} answered 4xx, 0 5xx, "
          f"RSS growth {growth / 2**20:.1f} MiB")  # fmt: skip
