"""An LLM through tritonclient.grpc: plain ModelInfer with a BYTES prompt, and token
streaming over ModelStreamInfer with Triton's decoupled ``triton_final_response`` flag."""

from __future__ import annotations

import json
import queue
import shutil
from collections import defaultdict

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.server.llm.api_support import engine_gauge, llm_models, wait_for_gauge
from tests.support.server import start_server

WAIT = 60
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
# A streamed answer long enough to span many engine steps: 8 tokens of the tiny model take a few
# ms, and chunks made faster than the stream sends them go out together (one response is timing).
LONG = {**GREEDY, "max_tokens": 96}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.server.llm.tiny_llama import build

    base = tmp_path_factory.mktemp("llm-grpc")
    tiny = build(base / "build" / "tiny-llama")
    models = llm_models(base, tiny)
    # For the cancel test: transformers' forward on the 1,024-position model, so a 900-token answer
    # is still running when the cancel arrives (the tiny model's fast forward makes 200 in ~50 ms).
    slow = shutil.copytree(build(base / "build" / "small-llama", variant="small"), models / "slow-llama")
    doc = {"name": "slow-llama", "runtime": "llm", "parameters": {"fast_forward": False}}
    (slow / "model-settings.json").write_text(json.dumps(doc))
    srv = start_server(models, base / "server.log")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_address)
    yield c
    c.close()


def prompt(text: str | bytes | list[str], name: str = "text_input") -> grpcclient.InferInput:
    texts = [text] if isinstance(text, (str, bytes)) else text
    t = grpcclient.InferInput(name, [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([x if isinstance(x, bytes) else x.encode() for x in texts], dtype=object))
    return t


def unary(client, text: str, params: dict = GREEDY) -> str:
    r = client.infer("tiny-llama", [prompt(text)], parameters=params)
    return r.as_numpy("text_output")[0].decode()


def final_flag(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def run_stream(client, requests: list[tuple[str, str, dict]], empty_final: bool):
    """Send every request on one stream; collect (id -> responses) until each one's final."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for rid, text, params in requests:
            client.async_stream_infer("tiny-llama", [prompt(text)], request_id=rid, parameters=params,
                                      enable_empty_final_response=empty_final)  # fmt: skip
        responses, errors, done = defaultdict(list), [], set()
        while len(done) + len(errors) < len(requests):  # an error ends its request (it carries no id)
            result, error = got.get(timeout=WAIT)
            if error is not None:
                errors.append(str(error))
                continue
            rid = result.get_response().id
            responses[rid].append(result)
            if final_flag(result):
                done.add(rid)
    finally:
        client.stop_stream()
    return responses, errors


def test_plain_grpc_infer_with_input0(client):
    r = client.infer("tiny-llama", [prompt("Where is Eiffel Tower?", "input0")], request_id="42")
    assert r.get_response().id == "42"
    assert isinstance(r.as_numpy("text_output")[0], bytes)


@pytest.mark.parametrize("empty_final", [True, False])
def test_token_stream_with_final_flag(client, empty_final):
    texts = {"a": "The capital of France is", "b": "Where is the Eiffel Tower?"}
    expected = {rid: unary(client, t, LONG) for rid, t in texts.items()}
    reqs = [(rid, t, {**LONG, "stream": True}) for rid, t in texts.items()]
    responses, errors = run_stream(client, reqs, empty_final)
    assert errors == []
    for rid, rs in responses.items():
        assert [final_flag(r) for r in rs] == [False] * (len(rs) - 1) + [True]
        with_text = [r for r in rs if r.get_response().outputs]
        assert len(with_text) >= 2  # tokens came one response at a time
        assert "".join(r.as_numpy("text_output")[0].decode() for r in with_text) == expected[rid]
        if empty_final:
            assert not rs[-1].get_response().outputs  # Triton's empty final response
        else:
            assert rs[-1].get_response().outputs
    assert set(responses) == {"a", "b"}


def test_stream_without_stream_flag_answers_once(client):
    responses, errors = run_stream(client, [("one", "The capital of France is", GREEDY)], empty_final=False)
    assert errors == []
    (r,) = responses["one"]
    assert final_flag(r) and r.as_numpy("text_output")[0].decode() == unary(client, "The capital of France is")


def test_stream_errors_then_keeps_going(client):
    reqs = [
        ("bad", "hi", {"stream": True, "mirostat": 2}),
        ("long", "word " * 400, {"stream": True, "max_tokens": 4}),
        ("two", ["one", "two"], {"stream": True}),
        ("utf8", b"caf\xe9", {"stream": True}),
        ("good", "hi", {**GREEDY, "stream": True}),
        ("both", ["one", "two"], GREEDY),  # several prompts, not streamed: one answer with both
    ]
    responses, errors = run_stream(client, reqs, empty_final=True)
    assert len(errors) == 4
    assert any("'mirostat'" in e for e in errors) and any("context" in e for e in errors)
    assert any("one prompt" in e for e in errors) and any("UTF-8" in e for e in errors)
    assert final_flag(responses["good"][-1])
    assert len(responses["both"][0].as_numpy("text_output")) == 2


def test_cancelled_stream_drops_the_sequence(server, client):
    got: queue.Queue = queue.Queue()
    long = {"stream": True, "max_tokens": 900, "ignore_eos": True}
    client.infer("slow-llama", [prompt("hi")], parameters=GREEDY)  # loaded (its gauges exist)
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        before = engine_gauge(http, "aborted", "slow-llama")
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("slow-llama", [prompt("Tell me a long story")], request_id="long", parameters=long)
        result, error = got.get(timeout=WAIT)
        assert error is None and not final_flag(result)
        client.stop_stream(cancel_requests=True)
        assert wait_for_gauge(http, "running", 0, timeout=5, model="slow-llama") == 0
        assert engine_gauge(http, "aborted", "slow-llama") == before + 1
    assert unary(client, "hi")  # still serving
