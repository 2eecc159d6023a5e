"""An unloaded model's memory comes back under churn: each load imports the model's code
afresh (a module and a class, always in a reference cycle), so unless the server collects
after evictions, the code of every evicted model piles up until CPython's rare full
collection, and resident memory climbs past the cache's capacity (issue #16)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.support.server import start_server

PROBE = """import gc
import numpy as np
from meshserve import Model


class Probe(Model):
    def load(self):
        self.w = np.ones(16 * 1024, dtype=np.float32)  # 64 KiB of its own

    async def predict(self, request):
        if request.inputs[0].data[0] >= 0:
            return {"y": request.inputs[0].data * self.w[0]}
        # Asked to: how many Probe classes (one per load) the process still holds, and its RSS.
        alive = sum(1 for o in gc.get_objects() if isinstance(o, type) and o.__name__ == "Probe")
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * 4096
        return {"y": np.array([alive, rss], dtype=np.int64)}
"""
MODELS = 400
RESIDENT = 8
SIZE = 96 * 1024  # what the server accounts for one (64 KiB array, objects, measured overhead)


@pytest.fixture(scope="module")
def churning(tmp_path_factory):
    """Many registered models (each used once gives the process per-model state to hold),
    room for a few, no churn guard: every request for another model evicts one."""
    root = tmp_path_factory.mktemp("reclaim")
    code = root / "model.py"
    code.write_text(PROBE)
    settings = json.dumps({"implementation": "model.py:Probe"})
    for i in range(MODELS):
        d = root / "models" / f"p{i:03d}"
        d.mkdir(parents=True)
        (d / "model.py").hardlink_to(code)
        (d / "model-settings.json").write_text(settings)
    srv = start_server(
        root / "models", root / "log", "--capacity-bytes", str(RESIDENT * SIZE), "--min-churn-age", "0",
        "--no-preload",
        env={"MESHSERVE_DEFAULT_MODEL_BYTES": "0", "MESHSERVE_MODEL_OVERHEAD_BYTES": "0"},
    )  # fmt: skip
    with httpx.Client(base_url=srv.http_url, timeout=30) as client:
        yield client
    srv.stop()


def infer(client: httpx.Client, model: str, x: float) -> list[int]:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [x]}]}
    r = client.post(f"/v2/models/{model}/infer", json=doc)
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"]


def test_evicted_models_code_and_memory_come_back(churning):
    started = time.monotonic()
    for i in range(MODELS):  # every model once: the per-model state the server keeps is base
        infer(churning, f"p{i:03d}", 1.0)
    _, rss_first = infer(churning, f"p{MODELS - 1:03d}", -1.0)
    samples = []
    for i in range(MODELS):  # once more: as many loads and evictions again, sampled
        infer(churning, f"p{i:03d}", 1.0)
        if i % 20 == 19:
            samples.append(infer(churning, f"p{i:03d}", -1.0))
    alive, rss = max(a for a, _ in samples), max(r for _, r in samples)
    print(f"Probe classes alive at most {alive}, RSS {rss_first >> 10} KiB -> at most {rss >> 10} KiB")
    # The resident models' classes, plus those evicted since the last collection (rate-limited
    # to 1/20 of the time: a few dozen at most); without collections: hundreds.
    assert alive <= RESIDENT + 32, f"{alive} Probe classes alive (resident: {RESIDENT})"
    # The second pass holds no more than the first left: no garbage piles up.
    assert rss - rss_first < 2 * 1024 * 1024, (rss_first, rss)
    assert time.monotonic() - started < 60  # bounds a hang (a few seconds here)


def test_collections_come_in_batches_rate_limited_big_models_at_once():
    from concurrent.futures import ThreadPoolExecutor

    from meshserve.server.reclaim import MemoryReclaimer

    mib = 1024 * 1024

    async def scenario() -> list[int]:
        reclaimer = MemoryReclaimer(ThreadPoolExecutor(1), 16 * mib, min_interval=60)  # a batch: 1 MiB
        seen = []
        for size in (512 * 1024, 600 * 1024, 2 * mib, 64 * mib):
            await reclaimer.unloaded(size)
            seen.append(reclaimer.collections)
        return seen

    # Under a batch: none; a batch: one; another right after: not yet (rate limit); a big model: at once.
    assert asyncio.run(scenario()) == [0, 1, 1, 2]
