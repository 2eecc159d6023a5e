"""Dynamic batching: concurrent requests to one model are merged along dim 0 into a
single predict call and the result is split back, row for row, to each caller.

As in Triton and MLServer, a model opts in with ``max_batch_size`` (rows per call)
and ``max_batch_latency`` (ms the first request of a batch may wait for company).
A batch leaves when it is full or its first request has waited that long; while
every execution slot (``max_concurrency``) is busy, requests keep queueing and the
next batch takes them all, so batches grow with load without a longer wait. Only
requests that agree on input names, datatypes, trailing dims, requested outputs
and parameters are merged; the rest wait for a batch of their own kind. The line is
bounded (``max_queue_size``, server/slots.py): past it a request is turned away at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from meshserve.protocol.errors import ModelExecutionError
from meshserve.protocol.types import InferenceRequest, InferenceResponse, Tensor
from meshserve.server.slots import Slots

Run = Callable[[InferenceRequest], Awaitable[InferenceResponse]]


def batch_key(request: InferenceRequest) -> tuple | None:
    """What requests must share to be merged; None when the request has no common dim 0."""
    rows = {t.data.shape[0] if t.data.ndim else -1 for t in request.inputs}
    if len(rows) != 1 or -1 in rows:
        return None
    inputs = tuple((t.name, t.datatype, t.data.shape[1:]) for t in request.inputs)
    outputs = tuple(o.name for o in request.outputs or ())
    return inputs, outputs, repr(sorted(request.parameters.items())) if request.parameters else ""


def merge(requests: list[InferenceRequest]) -> InferenceRequest:
    first = requests[0]
    inputs = [
        Tensor(t.name, t.datatype, np.concatenate([r.inputs[i].data for r in requests], axis=0), t.parameters)
        for i, t in enumerate(first.inputs)
    ]
    return InferenceRequest(
        first.model_name, inputs, model_version=first.model_version, outputs=first.outputs, parameters=first.parameters
    )


def split(model: str, response: InferenceResponse, requests: list[InferenceRequest], rows: list[int]):
    """One response per request: each output's rows for that request, in order."""
    total = sum(rows)
    for t in response.outputs:
        if t.data.ndim == 0 or t.data.shape[0] != total:
            got = list(t.data.shape)
            raise ModelExecutionError(
                f"model {model!r} returned output {t.name!r} of shape {got} for a batch of {total} rows; "
                "it cannot be split back per request (set supports_batching = False or drop max_batch_size)"
            )
    start = 0
    for request, n in zip(requests, rows, strict=True):
        outputs = [Tensor(t.name, t.datatype, t.data[start : start + n], t.parameters) for t in response.outputs]
        start += n
        yield InferenceResponse(
            response.model_name, outputs, model_version=response.model_version, id=request.id,
            parameters=response.parameters,
        )  # fmt: skip


class _Pending:
    __slots__ = ("request", "key", "rows", "future", "arrived")

    def __init__(self, request: InferenceRequest, key: tuple, rows: int, future: asyncio.Future, arrived: float):
        self.request, self.key, self.rows, self.future, self.arrived = request, key, rows, future, arrived


class DynamicBatcher:
    """Queues requests for one loaded model and runs them in merged batches."""

    def __init__(self, model: str, run: Run, slots: Slots, max_batch_size: int, max_batch_latency_ms: float) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.latency = max(0.0, max_batch_latency_ms) / 1000.0
        self._run = run
        self._slots = slots
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._collector: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self.batches = 0  # calls made, for metrics and tests
        self.rows = 0
        # Called per batch with its rows and its requests' arrival times (loop.time()).
        self.on_batch: Callable[[int, list[float]], None] | None = None

    async def submit(self, request: InferenceRequest) -> InferenceResponse:
        key = batch_key(request)
        rows = request.inputs[0].data.shape[0] if key is not None else 0
        if key is None or rows > self.max_batch_size or rows == 0:
            async with self._slots:  # nothing to merge it with: run it as it is
                return await self._run(request)
        if len(self._queue) >= max(self._slots.max_queue, self.max_batch_size):
            raise self._slots.reject()
        loop = asyncio.get_running_loop()
        pending = _Pending(request, key, rows, loop.create_future(), loop.time())
        self._queue.append(pending)
        self._arrived.set()
        if self._collector is None or self._collector.done():
            self._collector = loop.create_task(self._collect())
        return await pending.future

    def _ready_rows(self, key: tuple) -> int:
        return sum(p.rows for p in self._queue if p.key == key and not p.future.done())

    def _take(self, key: tuple) -> list[_Pending]:
        """The oldest requests of one kind that fit in a batch; the rest keep their place."""
        batch, rest, rows = [], deque(), 0
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():  # the caller went away
                continue
            if p.key == key and rows + p.rows <= self.max_batch_size:
                batch.append(p)
                rows += p.rows
            else:
                rest.append(p)
        self._queue = rest
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            first = self._queue[0]
            if first.future.done():
                self._queue.popleft()
                continue
            deadline = first.arrived + self.latency
            while self._ready_rows(first.key) < self.max_batch_size:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            await self._slots.acquire()
            batch = self._take(first.key)
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._dispatch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _dispatch(self, batch: list[_Pending]) -> None:
        try:
            requests = [p.request for p in batch]
            rows = [p.rows for p in batch]
            self.batches += 1
            self.rows += sum(rows)
            if self.on_batch is not None:
                self.on_batch(sum(rows), [p.arrived for p in batch])
            if len(batch) == 1:
                responses: Any = [await self._run(requests[0])]
            else:
                responses = list(split(self.model, await self._run(merge(requests)), requests, rows))
            for p, response in zip(batch, responses, strict=True):
                if not p.future.done():
                    p.future.set_result(response)
        except Exception as e:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        except BaseException:  # cancelled: so are its callers
            for p in batch:
                p.future.cancel()
            raise
        finally:
            self._slots.release()
