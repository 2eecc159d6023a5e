"""Two pods and a real etcd: a language model held by one pod answers generate,
generate_stream and the OpenAI routes sent to the other, which relays the holder's
answer chunk by chunk (one copy in the fleet, the request id kept, errors as the
holder gives them, a client that leaves cancels the holder's sequence)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.server.fleet.conftest import holders, pod_index, start_pods, wait_for, wait_pods
from tests.server.llm.api_support import engine_gauge, llm_models, sse_events, stream_first_event, wait_for_gauge
from tests.support.etcd import start_etcd
from tests.support.server import RunningServer

LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}
# transformers' forward: answers slow enough to come in many events (the fast one makes 200 tokens
# of the tiny model in a few tens of ms, and a relay that falls behind sends what piled up as one)


@pytest.fixture(scope="module")
def pods(tiny_llama, tmp_path_factory) -> Iterator[list[RunningServer]]:
    base = tmp_path_factory.mktemp("llm-fleet")
    etcd = start_etcd(base / "etcd")
    try:
        running = start_pods(
            etcd, llm_models(base, tiny_llama, {"max_num_seqs": 4, "fast_forward": False}), base / "logs", n=2
        )
        try:
            wait_pods(running[0], 2)
            yield running
        finally:
            for p in running:
                p.stop()
    finally:
        etcd.stop()


def _holder_and_other(pods: list[RunningServer]) -> tuple[RunningServer, RunningServer]:
    r = httpx.post(f"{pods[0].http_url}/v2/models/tiny-llama/generate", json={"text_input": "Hi"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["meshserve-route"] in ("miss", "local", "forwarded")
    (holder_id,) = wait_for(lambda: holders(pods[1], "tiny-llama"), 15, "a holder of tiny-llama")
    holder = pod_index(pods, holder_id)
    return holder, next(p for p in pods if p is not holder)


def test_llm_held_by_one_pod_answers_through_the_other(pods):
    holder, other = _holder_and_other(pods)
    body = {"text_input": "The capital of France is", "parameters": {"max_tokens": 8, "temperature": 0}}
    here = httpx.post(f"{holder.http_url}/v2/models/tiny-llama/generate", json=body, timeout=60)
    there = httpx.post(f"{other.http_url}/v2/models/tiny-llama/generate", json=body, timeout=60,
                       headers={"x-request-id": "fleet-gen-1"})  # fmt: skip
    assert there.status_code == 200, there.text
    assert there.headers["meshserve-route"] == "forwarded"
    assert there.headers["x-request-id"] == "fleet-gen-1"
    assert there.json() == here.json()
    completion = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 5, "temperature": 0}
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "temperature": 0}  # fmt: skip
    for path, doc in [("/v1/completions", completion), ("/openai/v1/chat/completions", chat)]:
        a = httpx.post(f"{holder.http_url}{path}", json=doc, timeout=60).json()
        b = httpx.post(f"{other.http_url}{path}", json=doc, timeout=60)
        assert b.status_code == 200 and b.headers["meshserve-route"] == "forwarded", b.text
        assert b.json()["choices"] == a["choices"]
    # Errors: the holder's own (its status and shape), with the request id; unknown models answered here.
    bad = httpx.post(f"{other.http_url}/v1/completions", json={**completion, "temperature": -1},
                     headers={"x-request-id": "fleet-bad"}, timeout=30)  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature", bad.text
    assert bad.headers["x-request-id"] == "fleet-bad"
    gone = httpx.post(f"{other.http_url}/v1/completions", json={**completion, "model": "nope"}, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{other.http_url}/v2/models/tiny-llama/generate", json={"text_input": 3}, timeout=30)
    assert r.status_code == 400 and "text_input" in r.json()["error"]
    # Still one copy in the fleet.
    assert holders(other, "tiny-llama") == holders(holder, "tiny-llama") == [f"pod-{pods.index(holder)}"]


def test_stream_through_the_other_pod_is_not_buffered(pods):
    holder, other = _holder_and_other(pods)
    body = orjson.dumps({"text_input": "Tell me a long story", "parameters": LONG})
    t0 = time.perf_counter()
    times, events = [], []
    with httpx.stream("POST", f"{other.http_url}/v2/models/tiny-llama/generate_stream", content=body,
                      timeout=60) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["meshserve-route"] == "forwarded"
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.perf_counter() - t0)
                events += sse_events([line])
    assert events[-1]["completion_tokens"] == 200 and len(events) > 10  # not one buffered event
    print(f"through the other pod: first event {times[0] * 1000:.0f} ms of {times[-1] * 1000:.0f} ms")
    assert times[0] < 0.7 * times[-1], (times[0], times[-1])
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    whole = httpx.post(f"{other.http_url}/v1/chat/completions", json=chat, timeout=60).json()
    with httpx.stream("POST", f"{other.http_url}/v1/chat/completions", timeout=60, json={**chat, "stream": True}) as r:
        assert r.status_code == 200
        chunks = sse_events(r.iter_lines())
    # The chat stream relayed whole: the role first, the text of the unstreamed answer, the finish, [DONE]
    # (how 20 tokens split into chunks is timing).
    assert chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]][-1] == "length"


def test_client_leaving_the_other_pod_cancels_on_the_holder(pods):
    holder, other = _holder_and_other(pods)
    with httpx.Client(base_url=holder.http_url, timeout=30) as http:
        before = engine_gauge(http, "aborted")
        body = {"text_input": "Tell me a long story", "parameters": {**LONG, "max_tokens": 240}}
        s, got = stream_first_event(other.http_port, body)
        assert b"meshserve-route: forwarded" in got
        s.close()
        assert wait_for_gauge(http, "running", 0, timeout=5) == 0
        assert engine_gauge(http, "aborted") == before + 1


def test_grpc_token_stream_through_the_other_pod(pods):
    import grpc
    from meshserve.protocol.grpc import grpc_service_pb2 as pb

    from tests.server.llm.test_llm_workers import _stream_request
    from tests.server.prod.conftest import grpc_stub

    holder, other = _holder_and_other(pods)
    texts = []
    for pod in (holder, other):
        with grpc.insecure_channel(pod.grpc_address) as channel:
            grpc_stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
            t0 = time.perf_counter()
            times, parts = [], []
            for r in grpc_stub(channel).ModelStreamInfer(iter([_stream_request("g1", 200)]), timeout=60):
                assert not r.error_message, r.error_message
                times.append(time.perf_counter() - t0)
                parts.append(r.infer_response.raw_output_contents[0][4:])
            assert len(parts) > 10 and times[0] < 0.7 * times[-1], (times[0], times[-1])
            texts.append(b"".join(parts))
    assert texts[0] == texts[1]
    assert holders(other, "tiny-llama") == [f"pod-{pods.index(holder)}"]  # no copy on the other pod
    with httpx.Client(base_url=holder.http_url, timeout=30) as http:
        before = engine_gauge(http, "aborted")
        with grpc.insecure_channel(other.grpc_address) as channel:
            call = grpc_stub(channel).ModelStreamInfer(iter([_stream_request("gone", 240)]), timeout=60)
            next(call)
            call.cancel()
        assert wait_for_gauge(http, "running", 0, timeout=5) == 0
        assert engine_gauge(http, "aborted") == before + 1
