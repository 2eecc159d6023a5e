"""The composition root in-process: data planes built side by side share no state (no
module global carries wiring), and each one's metrics see only its own requests."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
from meshserve.protocol.types import InferenceRequest, Tensor
from meshserve.server.compose import build_dataplane
from meshserve.server.settings import Settings
from prometheus_client import generate_latest

ECHO = Path(__file__).resolve().parents[2] / "examples" / "models" / "echo"


def _sample(registry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_two_data_planes_share_nothing(tmp_path):
    shutil.copytree(ECHO, tmp_path / "models" / "echo")
    settings = Settings(model_dir=tmp_path / "models", predict_threads=1, load_threads=1)

    async def go():
        a, b = build_dataplane(settings), build_dataplane(settings)
        assert a.metrics is not b.metrics and a.repository is not b.repository and a.observe is not b.observe
        await a.start()
        await b.start()
        try:
            request = InferenceRequest("echo", [Tensor.from_numpy("x", np.ones((1, 2), np.float32))])
            for _ in range(3):
                out = await a.infer(request)
            assert out.outputs[0].data.tolist() == [[1.0, 1.0]]
            await b.infer(request)
        finally:
            await a.stop()
            await b.stop()
        return a, b

    a, b = asyncio.run(go())
    for dp, n in ((a, 3), (b, 1)):
        assert _sample(dp.metrics, "meshserve_inference_queue_duration_seconds_count", model="echo") == n
        assert _sample(dp.metrics, "meshserve_model_load_seconds_count") == 1
    text = generate_latest(a.metrics).decode()
    assert "meshserve_cache_hits" in text and "meshserve_llm_time_to_first_token_seconds" in text
