"""The dashboard's feed shows LLM engines: requests running and waiting, tokens generated
(the page turns their difference between refreshes into tokens/s)."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.server.llm.api_support import llm_server

pytestmark = pytest.mark.system  # a real server with the tiny Llama


def test_the_feed_shows_the_engine_and_its_tokens(tiny_llama, tmp_path):
    with llm_server(tmp_path, tiny_llama) as srv, httpx.Client(base_url=srv.http_url, timeout=60) as http:
        body = {"text_input": "hi", "parameters": {"max_tokens": 6, "ignore_eos": True}}
        r = http.post("/v2/models/tiny-llama/generate", content=orjson.dumps(body))
        assert r.status_code == 200, r.text
        doc = http.get("/v2/dashboard/state").json()
        (engine,) = [e for e in doc["llm"] if e["model"] == "tiny-llama"]
        assert engine["generation_tokens"] >= 6 and engine["requests_finished"] >= 1
        assert engine["running"] == 0 and engine["waiting"] == 0
        (row,) = [r for r in doc["models"]["rows"] if r[0] == "tiny-llama"]
        assert row[2] == "READY"
