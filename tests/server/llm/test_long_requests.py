"""Generations and streams that last longer than --body-timeout are not cut (issue #13):
the body timeout covers receiving the request body, not the disconnect watch after it."""

from __future__ import annotations

import time

import orjson
import pytest

from tests.server.llm.api_support import llm_server, sse_events

BODY_TIMEOUT = 0.1  # the fast forward makes 900 tokens in well under a second
TOKENS = 900  # the small Llama (1024 positions): over half a second on a CPU
LONG = {"max_tokens": TOKENS, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(small_llama, tmp_path_factory):
    with llm_server(tmp_path_factory.mktemp("long"), small_llama, "--body-timeout", str(BODY_TIMEOUT),
                    parameters={"torch_threads": 1}) as srv:  # fmt: skip
        yield srv


def test_generate_longer_than_the_body_timeout_completes(http):
    t = time.monotonic()
    r = http.post("/v2/models/tiny-llama/generate", content=orjson.dumps({"text_input": "Hi", "parameters": LONG}))
    took = time.monotonic() - t
    assert r.status_code == 200, r.text  # before the fix: 499 once the body timeout passed
    assert took > BODY_TIMEOUT * 3  # long enough to have been cut
    assert r.json()["finish_reason"] == "length" and r.json()["completion_tokens"] == TOKENS


def test_streams_longer_than_the_body_timeout_end_with_a_finish_reason(http):
    body = orjson.dumps({"text_input": "Hi", "parameters": LONG})
    t = time.monotonic()
    with http.stream("POST", "/v2/models/tiny-llama/generate_stream", content=body) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert time.monotonic() - t > BODY_TIMEOUT * 3
    assert not any("error" in e for e in events) and events[-1]["finish_reason"] == "length"
    assert sum(1 for e in events if e["text_output"]) > 1
    # The OpenAI stream too: a finish_reason, then [DONE].
    doc = {"model": "tiny-llama", "prompt": "Hi", "stream": True, "max_tokens": TOKENS, "ignore_eos": True,
           "temperature": 0}  # fmt: skip
    with http.stream("POST", "/v1/completions", content=orjson.dumps(doc)) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
