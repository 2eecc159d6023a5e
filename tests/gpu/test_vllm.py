"""meshserve's VLLMEngine on a CUDA GPU, behind a real meshserve process: plain OIP infer,
OIP generate and its SSE stream, the OpenAI routes and gRPC streaming, all greedy and
float32, each answer equal to transformers' greedy ``generate``; then an unload that gives
vLLM's GPU memory back. Skipped without CUDA, and without vllm in this Python."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
from meshserve.protocol.datatypes import decode_bytes_elements
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from meshserve.protocol.grpc.codec import encode_infer_request
from meshserve.protocol.types import InferenceRequest, Tensor

from tests.gpu.conftest import GREEDY_TOKENS, PROMPTS
from tests.support.server import start_server

MODEL = "smollm2"
GREEDY = {"max_tokens": GREEDY_TOKENS, "temperature": 0}
SETTINGS = {
    "name": MODEL,
    "runtime": "llm",
    # float32 so that greedy decoding can be compared token for token with transformers.
    "parameters": {"engine": "vllm", "dtype": "float32", "max_model_len": 2048, "gpu_memory_utilization": 0.3,
                   "enforce_eager": True, "max_num_seqs": 32},
}  # fmt: skip


def gpu_memory_used_mib() -> int:
    """The whole GPU's used memory (vLLM's engine runs in processes of its own)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    return int(out.stdout.split()[0])


@pytest.fixture(scope="module")
def baseline_mib(hf_greedy) -> int:
    """The GPU's used memory before meshserve starts (after the CPU reference ran)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed in this Python: the vLLM part of the GPU lane is skipped")
    return gpu_memory_used_mib()


@pytest.fixture(scope="module")
def server(smollm2, baseline_mib, tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed in this Python: the vLLM part of the GPU lane is skipped")
    base = tmp_path_factory.mktemp("gpu-vllm")
    folder = base / "models" / MODEL
    folder.mkdir(parents=True)
    for f in smollm2.iterdir():
        if f.name != "model-settings.json":
            (folder / f.name).symlink_to(f)
    (folder / "model-settings.json").write_text(json.dumps(SETTINGS))
    srv = start_server(base / "models", base / "server.log", env={"VLLM_LOGGING_LEVEL": "WARNING"}, timeout=420)
    yield srv
    srv.stop(timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=120) as client:
        yield client


def test_the_model_runs_on_vllm(http):
    meta = http.get(f"/v2/models/{MODEL}").json()
    assert meta["platform"] == "llm:VLLMEngine", meta
    assert meta["parameters"]["max_model_len"] == 2048


def test_oip_infer_generate_and_stream_equal_transformers(http, hf_greedy):
    prompt = PROMPTS[0]
    want = hf_greedy[prompt]["text"]
    body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [prompt]}],
            "parameters": GREEDY}  # fmt: skip
    r = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [want]
    gen = {"text_input": prompt, "parameters": GREEDY}
    r = http.post(f"/v2/models/{MODEL}/generate", json=gen)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == want
    with http.stream("POST", f"/v2/models/{MODEL}/generate_stream", json=gen) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == want


def test_openai_completions_equal_transformers_for_every_prompt_at_once(http, hf_greedy):
    def complete(prompt: str) -> dict:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **GREEDY})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: one running batch in vLLM
        answers = list(pool.map(complete, PROMPTS))
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        ref = hf_greedy[prompt]
        assert answer["choices"][0]["text"] == ref["text"], prompt
        assert answer["usage"]["prompt_tokens"] == len(ref["prompt_ids"])
        assert answer["usage"]["completion_tokens"] == len(ref["tokens"])


def test_openai_streaming_and_chat(http, hf_greedy):
    prompt = PROMPTS[1]
    body = {"model": MODEL, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}, **GREEDY}
    text, usage = "", None
    with http.stream("POST", "/v1/completions", json=body) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            doc = json.loads(line[5:])
            text += "".join(c.get("text") or "" for c in doc.get("choices") or [])
            usage = doc.get("usage") or usage
    assert text == hf_greedy[prompt]["text"]
    assert usage["completion_tokens"] == len(hf_greedy[prompt]["tokens"])
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0}  # fmt: skip
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_grpc_stream_equals_transformers(server, hf_greedy):
    prompt = PROMPTS[2]
    tensor = Tensor.from_numpy("text_input", np.array([prompt.encode()], dtype=object))
    request = InferenceRequest(MODEL, [tensor], id="g1", parameters={"stream": True, **GREEDY})
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        responses = list(stub.ModelStreamInfer(iter([encode_infer_request(request)]), timeout=120))
    assert all(not r.error_message for r in responses), [r.error_message for r in responses]
    assert len(responses) > 1
    texts = [decode_bytes_elements("text_output", r.infer_response.raw_output_contents[0])[0].decode()
             for r in responses]  # fmt: skip
    assert "".join(texts) == hf_greedy[prompt]["text"]
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in responses]
    assert finals == [False] * (len(responses) - 1) + [True]


def test_unload_gives_the_gpu_memory_back(server, http, baseline_mib):
    """Last in this file: the model is gone afterwards."""
    loaded = gpu_memory_used_mib()
    assert loaded > baseline_mib + 10 * 1024, (baseline_mib, loaded)
    assert http.post(f"/v2/repository/models/{MODEL}/unload").status_code == 200
    deadline = time.monotonic() + 60
    while (now := gpu_memory_used_mib()) > baseline_mib + 1024 and time.monotonic() < deadline:
        time.sleep(1)
    assert now <= baseline_mib + 1024, (baseline_mib, loaded, now)
    assert server.proc.poll() is None
