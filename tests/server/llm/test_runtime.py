"""The llm runtime through a real server: the seed's curl body on plain OIP infer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest

from tests.support.server import RunningServer, start_server

SEED_BODY = {
    "id": "42",
    "inputs": [{"name": "input0", "shape": [-1], "datatype": "BYTES", "data": ["Where is Eiffel Tower?"]}],
}


@pytest.fixture(scope="module")
def llm_server(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    models = tmp_path_factory.mktemp("llm-models")
    shutil.copytree(tiny_llama, models / "llama2")  # no settings file: the runtime is inferred
    srv = start_server(models, tmp_path_factory.mktemp("llm-log") / "server.log")
    yield srv
    srv.stop()


def test_seed_curl_body_answers_text_output(llm_server):
    r = httpx.post(f"{llm_server.http_url}/v2/models/llama2/infer", json=SEED_BODY, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "42"
    (out,) = body["outputs"]
    assert out["name"] == "text_output" and out["datatype"] == "BYTES" and out["shape"] == [1]
    # SamplingParams' default max_tokens (16) at the default temperature: EOS may come first.
    tokens, finish = body["parameters"]["completion_tokens"], body["parameters"]["finish_reason"]
    assert (tokens == 16 and finish == "length") or (1 <= tokens < 16 and finish == "stop"), body["parameters"]
    assert isinstance(out["data"][0], str)
    if tokens > 1:  # an EOS sampled first (~1 in 100 with the random model's 512 tokens) leaves no text
        assert out["data"][0], body


def test_metadata_declares_text_input_and_output(llm_server):
    meta = httpx.get(f"{llm_server.http_url}/v2/models/llama2", timeout=10).json()
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    assert meta["platform"].startswith("llm:")


def test_greedy_parameters_and_batch_of_prompts(llm_server):
    body = {
        "inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES", "data": ["Hello", "Paris is"]}],
        "parameters": {"max_tokens": 5, "temperature": 0},
    }
    first = httpx.post(f"{llm_server.http_url}/v2/models/llama2/infer", json=body, timeout=60).json()
    again = httpx.post(f"{llm_server.http_url}/v2/models/llama2/infer", json=body, timeout=60).json()
    assert first["outputs"][0]["shape"] == [2]
    assert first["outputs"][0]["data"] == again["outputs"][0]["data"]
    assert first["parameters"]["completion_tokens"] == 10


@pytest.mark.parametrize(
    "parameters, fragment",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100000}, "context"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"nonsense": 1}, "unknown generation parameter"),
    ],
)
def test_bad_parameters_are_400(llm_server, parameters, fragment):
    body = {**SEED_BODY, "parameters": parameters}
    r = httpx.post(f"{llm_server.http_url}/v2/models/llama2/infer", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_prompt_longer_than_context_is_400(llm_server):
    long = "The quick brown fox jumps over the lazy dog. " * 100
    body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [long]}]}
    r = httpx.post(f"{llm_server.http_url}/v2/models/llama2/infer", json=body, timeout=60)
    assert r.status_code == 400 and "context" in r.json()["error"]
    ok = httpx.post(f"{llm_server.http_url}/v2/models/llama2/infer", json=SEED_BODY, timeout=60)
    assert ok.status_code == 200  # still serving


def test_metrics_report_the_engine(llm_server):
    httpx.post(f"{llm_server.http_url}/v2/models/llama2/infer", json=SEED_BODY, timeout=60)
    text = httpx.get(f"{llm_server.http_url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("meshserve_llm_") and 'model="llama2"' in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    assert values["meshserve_llm_generation_tokens_total"] >= 16
    assert values["meshserve_llm_prompt_tokens_total"] >= 6
    assert values["meshserve_llm_request_success_total"] >= 1
    assert values["meshserve_llm_time_to_first_token_seconds_count"] >= 1
    assert values["meshserve_llm_inter_token_latency_seconds_count"] >= 15
    assert values["meshserve_llm_e2e_request_latency_seconds_count"] >= 1
    assert values["meshserve_llm_num_requests_running"] == 0
    assert values["meshserve_llm_num_requests_waiting"] == 0
