"""Dynamic batching in the data plane: merged calls, exact splits, the latency bound."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from meshserve.protocol.errors import ModelExecutionError, QueueFull
from meshserve.protocol.types import InferenceRequest, Tensor
from meshserve.server.batching import batch_key
from meshserve.server.loaded_model import LoadedModel
from meshserve.server.model_settings import ModelSettings
from meshserve.server.runtimes.base import Model

EXECUTOR = ThreadPoolExecutor(4)


class RowModel(Model):
    """Row-wise integer arithmetic (exact), recording the rows of every call."""

    supports_batching = True

    def load(self) -> None:
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def predict(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        x = request.inputs[0].data
        with self.lock:
            self.calls.append(x.shape[0])
        time.sleep(self.parameters.get("sleep", 0))
        if self.parameters.get("broken"):
            return {"y": x.sum(keepdims=True)}
        if self.parameters.get("raises"):
            raise RuntimeError("boom")
        return {"y": x * 2 + x.sum(axis=tuple(range(1, x.ndim)), keepdims=True), "rows": np.arange(len(x))}


def loaded(
    max_batch_size: int = 8, latency_ms: float = 50, concurrency: int = 1, queue: int = 1024, **parameters
) -> LoadedModel:
    ms = ModelSettings(
        name="rows", max_batch_size=max_batch_size, max_batch_latency=latency_ms, max_concurrency=concurrency,
        max_queue_size=queue, parameters=parameters,
    )  # fmt: skip
    model = RowModel(ms)
    model.load()
    return LoadedModel(model, 0)


def req(x: np.ndarray, id: str | None = None) -> InferenceRequest:
    return InferenceRequest("rows", [Tensor.from_numpy("x", x)], id=id)


async def timed(lm: LoadedModel, r: InferenceRequest):
    start = time.monotonic()
    resp = await lm.infer(r, EXECUTOR)
    return resp, time.monotonic() - start


def test_concurrent_requests_merge_and_split_back_exactly():
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 100, size=(int(rng.integers(1, 4)), 3)) for _ in range(16)]
    lm = loaded(max_batch_size=8, latency_ms=200, sleep=0.02)

    async def go():
        return await asyncio.gather(*(lm.infer(req(x, id=f"r{i}"), EXECUTOR) for i, x in enumerate(xs)))

    responses = asyncio.run(go())
    calls = lm.model.calls
    assert sum(calls) == sum(len(x) for x in xs) and max(calls) <= 8 and len(calls) < len(xs) / 2
    for i, (x, resp) in enumerate(zip(xs, responses, strict=True)):
        out = {t.name: t.data for t in resp.outputs}
        assert resp.id == f"r{i}"
        np.testing.assert_array_equal(out["y"], x * 2 + x.sum(axis=1, keepdims=True))  # as if alone
    unbatched = loaded(max_batch_size=0)
    for x, resp in zip(xs, responses, strict=True):
        alone = asyncio.run(unbatched.infer(req(x), EXECUTOR))
        np.testing.assert_array_equal(resp.outputs[0].data, alone.outputs[0].data)


def test_latency_bound_alone_and_when_full():
    lm = loaded(max_batch_size=8, latency_ms=100)
    _, alone = asyncio.run(timed(lm, req(np.ones((1, 2), np.int64))))
    assert 0.09 <= alone < 1.0, alone  # waited for company up to the bound (not forever)

    full = loaded(max_batch_size=8, latency_ms=5000)

    async def eight():
        return await asyncio.gather(*(timed(full, req(np.full((1, 2), i))) for i in range(8)))

    waits = [w for _, w in asyncio.run(eight())]
    assert max(waits) < 1.0 and full.model.calls == [8]  # a full batch leaves at once


def test_no_request_waits_past_the_bound_under_a_stream():
    latency, work = 0.05, 0.01
    lm = loaded(max_batch_size=128, latency_ms=latency * 1000, concurrency=2, sleep=work)

    async def stream():
        tasks = []
        for i in range(200):  # 1 s of arrivals: waiting for 128 rows or the end would be >= 0.64 s
            tasks.append(asyncio.create_task(timed(lm, req(np.full((1, 2), i)))))
            await asyncio.sleep(0.005)
        return await asyncio.gather(*tasks)

    results = asyncio.run(stream())
    waits = [w for _, w in results]
    assert max(waits) < latency + 2 * work + 0.2, max(waits)  # the bound and the work, plus a loaded machine's slack
    assert len(lm.model.calls) < 200 and all(r.outputs[0].data[0, 0] == 4 * i for i, (r, _) in enumerate(results))


def test_only_compatible_requests_share_a_batch():
    lm = loaded(max_batch_size=16, latency_ms=100)
    a, b = np.ones((2, 3), np.int64), np.ones((1, 4), np.int64)
    assert batch_key(req(a)) != batch_key(req(b)) and batch_key(req(np.int64(3))) is None

    async def go():
        return await asyncio.gather(lm.infer(req(a), EXECUTOR), lm.infer(req(b), EXECUTOR), lm.infer(req(a), EXECUTOR))

    ra, rb, ra2 = asyncio.run(go())
    assert sorted(lm.model.calls) == [1, 4]
    assert ra.outputs[0].shape == [2, 3] and rb.outputs[0].shape == [1, 4] and ra2.outputs[0].shape == [2, 3]
    np.testing.assert_array_equal(rb.outputs[0].data, np.full((1, 4), 6))


@pytest.mark.parametrize("param, message", [("broken", "cannot be split back"), ("raises", "RuntimeError: boom")])
def test_batch_failures_reach_every_caller(param, message):
    lm = loaded(max_batch_size=4, latency_ms=100, **{param: True})

    async def go():
        return await asyncio.gather(
            *(lm.infer(req(np.ones((1, 2))), EXECUTOR) for _ in range(3)), return_exceptions=True
        )

    results = asyncio.run(go())
    assert all(isinstance(r, ModelExecutionError) and message in r.message for r in results), results


def test_torch_and_onnx_batched_equal_unbatched(torch_dirs):
    from tests.server.runtimes.conftest import load

    rng = np.random.default_rng(3)
    xs = [rng.random((int(rng.integers(1, 4)), 4), dtype=np.float32) for _ in range(12)]
    for form in ("export", "onnx"):
        batched = load(torch_dirs[form], max_batch_size=16, max_batch_latency=100)
        alone = load(torch_dirs[form])

        async def go(lm: LoadedModel, name: str = form):
            return await asyncio.gather(*(lm.infer(InferenceRequest(name, [Tensor.from_numpy("x", x)]), EXECUTOR)
                                          for x in xs))  # fmt: skip

        together, separately = asyncio.run(go(batched)), asyncio.run(go(alone))
        assert batched.batcher is not None and batched.batcher.batches < len(xs)
        for a, b in zip(together, separately, strict=True):
            assert a.outputs[0].shape == b.outputs[0].shape
            np.testing.assert_allclose(a.outputs[0].data, b.outputs[0].data, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [0, 2])
def test_the_line_of_waiting_requests_is_bounded(batch):
    """One slot busy, a line of 4 (or of the batch size when larger): the rest are turned away
    at once with QueueFull, the admitted all answered."""

    async def main():
        lm = loaded(max_batch_size=batch, latency_ms=5, queue=4, sleep=0.2)
        results = await asyncio.gather(*(lm.infer(req(np.ones((1, 2), np.int64)), EXECUTOR) for _ in range(12)),
                                       return_exceptions=True)  # fmt: skip
        return lm, results

    lm, results = asyncio.run(main())
    full = [r for r in results if isinstance(r, QueueFull)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(full) + len(served) == 12 and full and len(served) >= 4
    assert lm.slots.rejected == len(full) and lm.slots.waiting == 0
