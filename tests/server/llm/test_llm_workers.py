"""--workers 2 with a language model: every LLM request (generate, generate_stream, the
OpenAI routes, gRPC token streams) reaches the one worker that owns the model, streams
come through the other worker chunk by chunk, and a client that leaves cancels the
owner's sequence. The model is loaded once in the pod."""

from __future__ import annotations

import time

import grpc
import httpx
import orjson
import pytest

from tests.server.llm.api_support import engine_gauge, llm_server, sse_events, stream_first_event, wait_for_gauge
from tests.server.prod.conftest import grpc_stub, scrape

PARAMS = {"max_num_seqs": 4, "fast_forward": False}  # answers slow enough to stream in several events
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}
ATTEMPTS = 40  # fresh connections until both workers took one (the kernel spreads them)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with llm_server(tmp_path_factory.mktemp("llm-workers"), tiny_llama, "--workers", "2", parameters=PARAMS) as srv:
        yield srv


def _both_workers(server, request) -> dict[bool, object]:
    """``request(client)`` on fresh connections until one was passed on by the other
    worker (``meshserve-worker`` set) and one was served by the owner directly."""
    seen: dict[bool, object] = {}
    for _ in range(ATTEMPTS):
        with httpx.Client(base_url=server.http_url, timeout=60) as c:
            forwarded, result = request(c)
        seen.setdefault(forwarded, result)
        if len(seen) == 2:
            return seen
    raise AssertionError(f"{ATTEMPTS} connections did not reach both workers: {list(seen)}")


def _loads(server) -> float:
    return scrape(httpx.get(f"{server.http_url}/metrics").text, "meshserve_model_loads_total")


def test_stream_chunks_arrive_as_made_through_either_worker(server):
    loads = _loads(server)
    body = orjson.dumps({"text_input": "Tell me a long story", "parameters": LONG})

    def stream(c: httpx.Client):
        t0 = time.perf_counter()
        times, events = [], []
        with c.stream("POST", "/v2/models/tiny-llama/generate_stream", content=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    times.append(time.perf_counter() - t0)
                    events += sse_events([line])
            forwarded = "meshserve-worker" in r.headers
        return forwarded, (times, events)

    seen = _both_workers(server, stream)
    for forwarded, (times, events) in seen.items():
        assert sum(e["completion_tokens"] > 0 for e in events[-1:]) == 1
        assert events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == 200
        assert len(events) > 10  # streamed as made, not one buffered event (how many: timing)
        first, total = times[0], times[-1]
        print(f"{'forwarded' if forwarded else 'owner'}: first event {first * 1000:.0f} ms of {total * 1000:.0f} ms")
        # Buffered, the first event would come with the last (a generous bound: a busy CI box slows prefill).
        assert first < 0.7 * total, (forwarded, first, total)
    # Greedy: the same text, however the request came (how it splits into events is timing: a
    # reader that falls behind gets the chunks that piled up as one).
    same = "".join(e["text_output"] for e in seen[True][1]) == "".join(e["text_output"] for e in seen[False][1])
    assert same
    assert _loads(server) == loads  # no second copy of the model in the other worker


def test_openai_and_generate_reach_the_owner(server):
    loads = _loads(server)
    completion = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 5, "temperature": 0}
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "temperature": 0}  # fmt: skip

    def calls(c: httpx.Client):
        r1 = c.post("/v1/completions", json=completion)
        r2 = c.post("/openai/v1/chat/completions", json=chat)
        r3 = c.post("/v2/models/tiny-llama/generate", json={"text_input": "Hello", "parameters": {"max_tokens": 5}})
        for r in (r1, r2, r3):
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"]
        forwarded = {"meshserve-worker" in r.headers for r in (r1, r2)}
        assert len(forwarded) == 1  # one connection: one worker took both
        return forwarded.pop(), (r1.json()["choices"][0]["text"], r2.json()["choices"][0]["message"]["content"])

    seen = _both_workers(server, calls)
    assert seen[True] == seen[False]
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        # OpenAI stream through either worker; errors keep their shapes and the request id.
        with c.stream("POST", "/v1/completions", json={**completion, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        # How 5 tokens split into events is timing (a reader that falls behind gets what piled
        # up as one chunk): the streamed text is the answer, and the last chunk says why it ended.
        assert events[-1] == "[DONE]" and len(events) >= 2
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == seen[True][0]
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        r = c.post("/v1/completions", json={**completion, "model": "nope"}, headers={"x-request-id": "rid-1"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert r.headers["x-request-id"] == "rid-1"
        r = c.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "error" in r.json()
        r = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": "hi"})
        assert r.status_code == 400 and "messages" in r.text
    assert _loads(server) == loads


def test_disconnect_through_the_other_worker_cancels_on_the_owner(server):
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        before = engine_gauge(http, "aborted")
        body = {"text_input": "Tell me a long story", "parameters": {**LONG, "max_tokens": 240}}
        for _ in range(ATTEMPTS):
            s, got = stream_first_event(server.http_port, body)
            s.close()  # the first event is in: leave
            forwarded = b"meshserve-worker" in got.split(b"\r\n\r\n", 1)[0]
            assert wait_for_gauge(http, "running", 0, timeout=5) == 0
            before += 1
            assert engine_gauge(http, "aborted") == before
            if forwarded:
                break
        else:
            raise AssertionError("no connection reached the worker that does not own the model")


def _stream_request(rid: str, max_tokens: int):
    from meshserve.protocol.grpc import grpc_service_pb2 as pb

    param = pb.InferParameter
    return pb.ModelInferRequest(
        model_name="tiny-llama",
        id=rid,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text_input", datatype="BYTES", shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[b"Tell me a story"]),
            )
        ],
        parameters={"stream": param(bool_param=True), "max_tokens": param(int64_param=max_tokens),
                    "ignore_eos": param(bool_param=True), "temperature": param(double_param=0.0)},
    )  # fmt: skip


def test_grpc_token_streams_through_either_worker(server):
    loads = _loads(server)
    texts = set()
    for i in range(8):  # fresh channels: the kernel picks the worker
        with grpc.insecure_channel(server.grpc_address) as channel:
            from meshserve.protocol.grpc import grpc_service_pb2 as pb

            grpc_stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)  # connected before the clock starts
            t0 = time.perf_counter()
            times, parts = [], []
            for r in grpc_stub(channel).ModelStreamInfer(iter([_stream_request(f"s{i}", 200)]), timeout=60):
                assert not r.error_message, r.error_message
                times.append(time.perf_counter() - t0)
                out = r.infer_response
                assert out.id == f"s{i}" and out.model_name == "tiny-llama"
                parts.append(out.raw_output_contents[0][4:].decode())
            assert len(parts) > 10 and times[0] < 0.7 * times[-1], (times[0], times[-1])
            texts.add("".join(parts))
    assert len(texts) == 1
    assert _loads(server) == loads
    # The client leaves mid-stream: the owner drops the sequence.
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        before = engine_gauge(http, "aborted")
        for _ in range(4):
            with grpc.insecure_channel(server.grpc_address) as channel:
                call = grpc_stub(channel).ModelStreamInfer(iter([_stream_request("gone", 240)]), timeout=60)
                next(call)
                call.cancel()
            assert wait_for_gauge(http, "running", 0, timeout=5) == 0
        assert engine_gauge(http, "aborted") == before + 4
