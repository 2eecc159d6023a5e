"""OIP generate / generate_stream (Triton's generate extension) and plain infer on a
real server with the tiny Llama: shapes, streaming, every bad input, a client that
goes away mid-stream, a full queue."""

from __future__ import annotations

import socket
import subprocess
import threading

import httpx
import orjson
import pytest

from tests.server.llm.api_support import engine_gauge, llm_server, sse_events, stream_first_event, wait_for_gauge
from tests.server.prod.conftest import scrape

# A running batch of 2 and one waiting slot: the capacity test fills it with 3 streams.
# The model's own sampling defaults apply where a request sets nothing. Transformers' forward:
# the disconnect and queue tests need a 200-token answer (the tiny model's context allows no
# more) to outlast their client's moves, and the fast forward makes it in ~50 ms.
PARAMS = {"max_num_seqs": 2, "max_waiting": 1, "generation": {"max_tokens": 5, "ignore_eos": True},
          "fast_forward": False}  # fmt: skip
SEED = (
    '{"id": "42","inputs": [{"name": "input0","shape": [-1],"datatype": "BYTES","data": ["Where is Eiffel Tower?"]}]}'
)
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with llm_server(tmp_path_factory.mktemp("api-generate"), tiny_llama, parameters=PARAMS) as srv:
        yield srv


def generate(http, body, model="tiny-llama", path="generate"):
    return http.post(f"/v2/models/{model}/{path}", content=orjson.dumps(body))


def test_generate_greedy_is_deterministic(http):
    body = {"text_input": "The capital of France is", "parameters": {"max_tokens": 8, "temperature": 0,
                                                                       "ignore_eos": True}}  # fmt: skip
    r = generate(http, body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == "tiny-llama" and doc["model_version"] == ""
    assert isinstance(doc["text_output"], str) and doc["text_output"]
    assert doc["finish_reason"] == "length" and doc["completion_tokens"] == 8 and doc["prompt_tokens"] > 0
    assert generate(http, body).json()["text_output"] == doc["text_output"]
    # Triton's TensorRT-LLM style: parameters at the top level
    flat = {"text_input": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    assert generate(http, flat).json()["text_output"] == doc["text_output"]
    # exclude_input_in_output=false puts the prompt in front, as Triton's vLLM backend does
    echo = generate(http, {**body, "parameters": {**body["parameters"], "exclude_input_in_output": False}})
    assert echo.json()["text_output"] == "The capital of France is" + doc["text_output"]


def test_generate_stream_is_sse_and_adds_up(http):
    # 96 tokens: a few fast ones can leave as one event (a reader that falls behind gets what piled up).
    body = {"text_input": "Where is the Eiffel Tower?", "parameters": {"max_tokens": 96, "temperature": 0,
                                                                         "ignore_eos": True}}  # fmt: skip
    whole = generate(http, body).json()
    with http.stream("POST", "/v2/models/tiny-llama/generate_stream", content=orjson.dumps(body)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert len(events) >= 2 and all(e["model_name"] == "tiny-llama" for e in events)
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert [e["finish_reason"] for e in events][-1] == "length"
    assert all(e["finish_reason"] is None for e in events[:-1])
    assert events[-1]["completion_tokens"] == 96


def test_model_generation_defaults_fill_what_requests_leave_out(http):
    assert generate(http, {"text_input": "hi"}).json()["completion_tokens"] == 5
    assert generate(http, {"text_input": "hi", "max_tokens": 3}).json()["completion_tokens"] == 3
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}  # chat: not "up to the context"
    assert http.post("/v1/chat/completions", json=chat).json()["usage"]["completion_tokens"] == 5


def test_seed_curl_request_on_the_llm(server):
    url = f"{server.http_url}/v2/models/tiny-llama/infer"
    out = subprocess.run(["curl", "-s", "-H", "content-type:application/json", url, "-d", SEED],
                         capture_output=True, check=True)  # fmt: skip
    doc = orjson.loads(out.stdout)
    assert doc["id"] == "42" and doc["model_name"] == "tiny-llama"
    (output,) = doc["outputs"]
    assert output["name"] == "text_output" and output["datatype"] == "BYTES" and output["shape"] == [1]
    assert isinstance(output["data"][0], str)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"text_input": "hi", "parameters": {"max_tokens": 4, "beam_width": 2}}, 400, ["'beam_width'", "supported"]),
        ({"text_input": "hi", "foo": 1}, 400, ["'foo'"]),
        ({"text_input": "hi", "parameters": {"max_tokens": 0}}, 400, ["max_tokens", ">= 1"]),
        ({"text_input": "hi", "parameters": {"max_tokens": -5}}, 400, ["max_tokens"]),
        ({"text_input": "hi", "parameters": {"max_tokens": 10**9}}, 400, ["max_tokens"]),
        ({"text_input": "hi", "parameters": {"max_tokens": 100000}}, 400, ["context"]),
        ({"text_input": "hi", "parameters": {"temperature": "hot"}}, 400, ["temperature", "number"]),
        ({"text_input": "hi", "parameters": {"top_p": 0}}, 400, ["top_p"]),
        ({"text_input": "hi", "parameters": {"stop": [1, 2]}}, 400, ["stop"]),
        ({"text_input": "hi", "parameters": "fast"}, 400, ["parameters", "object"]),
        ({"parameters": {}}, 400, ["text_input"]),
        ({"text_input": ""}, 400, ["text_input"]),
        ({"text_input": "word " * 400, "parameters": {"max_tokens": 4}}, 400, ["prompt", "context"]),
    ],
)
@pytest.mark.parametrize("path", ["generate", "generate_stream"])
def test_bad_generate_requests(http, body, status, words, path):
    r = generate(http, body, path=path)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    assert all(w in message for w in words), message


def test_bad_bodies_and_models(http):
    r = http.post("/v2/models/tiny-llama/generate", content=b'{"text_input": "caf\xe9"}')
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = http.post("/v2/models/tiny-llama/generate", content=b"not json")
    assert r.status_code == 400
    r = generate(http, {"text_input": "hi"}, model="nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]
    # A model that is not an LLM answers through Triton's field mapping (tests/server/test_generate_any.py).
    r = generate(http, {"text_input": "hi"}, model="echo")
    assert r.status_code == 200 and r.json()["text_input"] == "hi", r.text
    r = http.post("/v2/models/tiny-llama/versions/7/generate", content=orjson.dumps({"text_input": "hi"}))
    assert r.status_code == 404
    # plain infer with an invalid UTF-8 prompt in binary form
    r = http.post("/v2/models/tiny-llama/infer", json={"inputs": [{"name": "text_input", "shape": [1],
                  "datatype": "BYTES", "data": [123]}]})  # fmt: skip
    assert r.status_code == 400


def _raw_stream_first_event(server, body: dict) -> socket.socket:
    """Open generate_stream on a raw socket and read until the first event arrived."""
    s, got = stream_first_event(server.http_port, body)
    assert b" 200 " in got.split(b"\r\n", 1)[0]
    return s


def test_disconnect_mid_stream_drops_the_sequence(server, http):
    before = engine_gauge(http, "aborted")
    s = _raw_stream_first_event(server, {"text_input": "Tell me a long story", "parameters": LONG})
    assert engine_gauge(http, "running") == 1
    s.close()
    assert wait_for_gauge(http, "running", 0, timeout=5) == 0
    assert engine_gauge(http, "aborted") == before + 1
    # the engine keeps serving
    r = generate(http, {"text_input": "hi", "parameters": {"max_tokens": 3}})
    assert r.status_code == 200 and r.json()["completion_tokens"] <= 3


def test_disconnect_while_waiting_for_a_whole_answer(server, http):
    """Not only streams: a client that leaves a plain generate (or completions) call frees its slot too."""
    before = engine_gauge(http, "aborted")
    for path, body in [
        ("/v2/models/tiny-llama/generate", {"text_input": "Tell me a long story", "parameters": LONG}),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "Tell me a long story", **LONG}),
    ]:
        s = socket.create_connection(("127.0.0.1", server.http_port))
        payload = orjson.dumps(body)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert wait_for_gauge(http, "running", 1) == 1
        s.close()
        assert wait_for_gauge(http, "running", 0, timeout=5) == 0
    assert engine_gauge(http, "aborted") == before + 2


def test_client_gone_while_queued_is_dropped_once_admitted(server, http):
    """A stream whose client left while it waited for a batch slot: when its first token
    comes, nobody reads the body, and the sequence is still dropped (no lease kept)."""
    before = engine_gauge(http, "aborted")
    body = {"text_input": "Tell me a long story", "parameters": {**LONG, "max_tokens": 240}}
    running = [_raw_stream_first_event(server, body) for _ in range(PARAMS["max_num_seqs"])]
    queued = socket.create_connection(("127.0.0.1", server.http_port))
    payload = orjson.dumps(body)
    queued.sendall(
        b"POST /v2/models/tiny-llama/generate_stream HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    assert wait_for_gauge(http, "waiting", 1) == 1
    queued.close()
    for s in running:
        s.close()
    assert wait_for_gauge(http, "aborted", before + 3) == before + 3
    assert wait_for_gauge(http, "running", 0) == 0 and engine_gauge(http, "waiting") == 0


def test_full_queue_is_503_and_the_others_finish(server, http):
    # long enough that the running two cannot finish while the test fills the queue
    long = {"text_input": "Tell me a long story", "parameters": {**LONG, "max_tokens": 240}}
    body = {"text_input": "Tell me a long story", "parameters": {**LONG, "max_tokens": 20}}
    text = http.get("/metrics").text
    refused = scrape(text, "meshserve_inference_requests_total", model="tiny-llama", protocol="rest", status="503")
    rejected = scrape(text, "meshserve_llm_request_rejected_total", model="tiny-llama")
    running = [_raw_stream_first_event(server, long) for _ in range(PARAMS["max_num_seqs"])]
    assert wait_for_gauge(http, "running", 2) == 2
    waiting_result: dict = {}

    def wait_in_queue() -> None:
        with httpx.Client(base_url=server.http_url, timeout=60) as c:
            waiting_result["r"] = c.post("/v2/models/tiny-llama/generate", content=orjson.dumps(body))

    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    assert wait_for_gauge(http, "waiting", 1) == 1
    r = generate(http, body)
    assert r.status_code == 503, r.text
    assert "capacity" in r.json()["error"] and "retry" in r.json()["error"]
    r = generate(http, body, path="generate_stream")
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    text = http.get("/metrics").text  # both refusals counted, as requests and by the engine
    assert scrape(text, "meshserve_inference_requests_total", model="tiny-llama", protocol="rest",
                  status="503") == refused + 2  # fmt: skip
    assert scrape(text, "meshserve_llm_request_rejected_total", model="tiny-llama") == rejected + 2
    for s in running:  # the running ones finish their tokens; the queued one then runs
        s.settimeout(60)
        got = b""
        while b'"finish_reason":"length"' not in got:
            chunk = s.recv(65536)
            assert chunk, got[-200:]
            got += chunk
        s.close()
    waiter.join(60)
    assert waiting_result["r"].status_code == 200 and waiting_result["r"].json()["completion_tokens"] == 20
    assert wait_for_gauge(http, "running", 0) == 0
