"""The server's request metrics (``meshserve_inference_requests_total``, the duration
histogram, the in-flight gauge) count every generate, generate_stream and OpenAI
request once, with its model, API and final status; refusals included."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.server.llm.api_support import llm_server, sse_events
from tests.server.prod.conftest import scrape

TOTAL = "meshserve_inference_requests_total"
DURATION = "meshserve_inference_request_duration_seconds"
IN_FLIGHT = "meshserve_inference_requests_in_flight"
PARAMS = {"generation": {"max_tokens": 4, "ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with llm_server(tmp_path_factory.mktemp("api-metrics"), tiny_llama, parameters=PARAMS) as srv:
        yield srv


LATENCIES = [  # the front's duration of a REST request, the engine's time to first and to last token
    (DURATION + "_sum", {"protocol": "rest"}),
    ("meshserve_llm_time_to_first_token_seconds_sum", {}),
    ("meshserve_llm_e2e_request_latency_seconds_sum", {}),
]


def _figures(http: httpx.Client, protocol: str, model: str = "tiny-llama") -> dict[str, float]:
    text = http.get("/metrics").text
    out = {
        status: scrape(text, TOTAL, model=model, protocol=protocol, status=status)
        for status in ("200", "400", "404", "503")
    }
    out["count"] = scrape(text, DURATION + "_count", model=model, protocol=protocol)
    out["sum"] = scrape(text, DURATION + "_sum", model=model, protocol=protocol)
    out["in_flight"] = scrape(text, IN_FLIGHT, model=model, protocol=protocol)
    return out


def test_oip_generate_and_stream_are_counted_with_status_and_time(http):
    before, unknown = _figures(http, "rest"), _figures(http, "rest", model="")
    r = http.post("/v2/models/tiny-llama/generate", content=orjson.dumps({"text_input": "hi"}))
    assert r.status_code == 200, r.text
    body = {"text_input": "Tell me a story", "parameters": {"max_tokens": 120, "temperature": 0}}
    text = http.get("/metrics").text
    front0, ttft0, e2e0 = (scrape(text, n, model="tiny-llama", **kw) for n, kw in LATENCIES)
    with http.stream("POST", "/v2/models/tiny-llama/generate_stream", content=orjson.dumps(body)) as s:
        assert s.status_code == 200
        events = sse_events(s.iter_lines())
    assert events[-1]["finish_reason"] == "length"
    text = http.get("/metrics").text
    front1, ttft1, e2e1 = (scrape(text, n, model="tiny-llama", **kw) for n, kw in LATENCIES)
    # refused before the engine: bad parameters, a prompt past the context
    for path in ("generate", "generate_stream"):
        r = http.post(f"/v2/models/tiny-llama/{path}", content=orjson.dumps({"text_input": "hi", "top_p": 0}))
        assert r.status_code == 400, r.text
    long = {"text_input": "word " * 400, "parameters": {"max_tokens": 4}}
    assert http.post("/v2/models/tiny-llama/generate", content=orjson.dumps(long)).status_code == 400
    assert http.post("/v2/models/nope/generate", content=orjson.dumps({"text_input": "hi"})).status_code == 404
    after, unknown_after = _figures(http, "rest"), _figures(http, "rest", model="")
    assert after["200"] - before["200"] == 2
    assert after["400"] - before["400"] == 3
    assert after["count"] - before["count"] == 5  # each request once in the histogram
    assert after["in_flight"] == 0
    # The stream's time runs to its last event, not to its first: at least the engine's time to
    # its last token (the server's own clocks: a client that reads late changes neither).
    assert front1 - front0 >= e2e1 - e2e0 > ttft1 - ttft0 > 0, (front1 - front0, e2e1 - e2e0, ttft1 - ttft0)
    assert unknown_after["404"] - unknown["404"] == 1  # an unknown name is counted under model=""


def test_openai_requests_are_counted_under_openai(http):
    before, unknown = _figures(http, "openai"), _figures(http, "openai", model="")
    rest_before = _figures(http, "rest")
    for prefix in ("/v1", "/openai/v1"):
        r = http.post(f"{prefix}/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=chat) as s:
        assert s.status_code == 200
        assert sse_events(s.iter_lines())[-1] == "[DONE]"
    r = http.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": -1})
    assert r.status_code == 400, r.text
    r = http.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": "hi"})
    assert r.status_code == 400, r.text
    r = http.post("/v1/completions", content=b"not json")
    assert r.status_code == 400, r.text
    r = http.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert r.status_code == 404, r.text
    after, unknown_after = _figures(http, "openai"), _figures(http, "openai", model="")
    assert after["200"] - before["200"] == 3
    assert after["400"] - before["400"] == 2
    assert after["count"] - before["count"] == 5 and after["in_flight"] == 0
    assert unknown_after["400"] - unknown["400"] == 1  # no model could be read from the body
    assert unknown_after["404"] - unknown["404"] == 1
    assert _figures(http, "rest") == rest_before  # each request counted once, under its own API
