"""A loaded model as the data plane uses it: declared metadata checks, the call
into the runtime (threaded or not), and normalising what it returns."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np
from meshserve.protocol.datatypes import DTYPES, as_bytes, bytes_array
from meshserve.protocol.errors import InferenceError, InvalidInput, ModelExecutionError
from meshserve.protocol.types import InferenceRequest, InferenceResponse, ModelMetadata, Tensor, TensorMetadata
from meshserve.server import tracing
from meshserve.server.batching import DynamicBatcher
from meshserve.server.observe import PhaseTimers
from meshserve.server.runtimes.base import Model
from meshserve.server.slots import Slots

log = logging.getLogger(__name__)


def _hook(model: Model, name: str) -> Callable[[Any], Any] | None:
    fn = getattr(model, name, None)
    return fn if callable(fn) else None


class LoadedModel:
    """One model instance ready to serve; built once per load, used per request."""

    def __init__(self, model: Model, size_bytes: int, timers: PhaseTimers | None = None) -> None:
        self.model = model
        self.name = model.name
        self.version = model.version or ""
        self.size_bytes = size_bytes
        self.metadata: ModelMetadata = model.metadata()
        self.slots = Slots(self.name, model.settings.max_concurrency, model.settings.max_queue_size)
        self._inputs = {t.name: t for t in self.metadata.inputs}
        # Other names a runtime accepts for its inputs (e.g. an LLM's ``input0`` for ``text_input``).
        self._aliases: dict[str, str] = getattr(model, "input_aliases", None) or {}
        self._outputs = {t.name: t for t in self.metadata.outputs}
        self._checks = bool(self._inputs or self._outputs)  # anything for validate to check
        self._pre = _hook(model, "preprocess")
        self._post = _hook(model, "postprocess")
        self._predict_async = inspect.iscoroutinefunction(model.predict)
        # An async predict with no hooks: served in one coroutine (infer's fast path).
        self._plain = self._predict_async and self._pre is None and self._post is None
        settings = model.settings
        self.batcher: DynamicBatcher | None = None
        self._batching = settings.max_batch_size > 1 and model.supports_batching
        self.timers = timers  # queue/predict histograms of this model (server/observe.py), if measured

    def validate(self, request: InferenceRequest) -> None:
        """Check the request against the declared inputs/outputs, if any are declared."""
        if self._inputs:
            for t in request.inputs:
                if self._aliases and t.name not in self._inputs and self._aliases.get(t.name) in self._inputs:
                    t.name = self._aliases[t.name]
                spec = self._inputs.get(t.name)
                if spec is None:
                    raise InvalidInput(
                        f"model {self.name!r} has no input {t.name!r}; its inputs are {', '.join(self._inputs)}"
                    )
                _check_tensor(self.name, t, spec)
            if len(request.inputs) != len(self._inputs):
                missing = set(self._inputs) - {t.name for t in request.inputs}
                raise InvalidInput(f"model {self.name!r} needs input(s) {', '.join(sorted(missing))}")
        if self._outputs and request.outputs:
            for o in request.outputs:
                if o.name not in self._outputs:
                    raise InvalidInput(
                        f"model {self.name!r} has no output {o.name!r}; its outputs are {', '.join(self._outputs)}"
                    )

    async def infer(self, request: InferenceRequest, executor: Executor) -> InferenceResponse:
        if self._checks:
            self.validate(request)
        if self._batching:
            if self.batcher is None:
                settings = self.model.settings
                self.batcher = DynamicBatcher(
                    self.name, lambda r: self._call(r, executor), self.slots,
                    settings.max_batch_size, settings.max_batch_latency,
                )  # fmt: skip
                if self.timers is not None:
                    self.batcher.on_batch = self._on_batch
            return await self.batcher.submit(request)
        if tracing.TRACER is not None:
            return await self._traced(request, executor, tracing.TRACER)
        slots = self.slots
        timers = self.timers
        if slots.try_take():  # the usual case: a free slot, no wait and nothing to time
            if timers is not None:
                timers.queue_counts[0] += 1  # observe(0.0), without the call: no wait, first bucket
        else:
            t = time.perf_counter_ns()
            await slots.take()
            if timers is not None:
                timers.queue((time.perf_counter_ns() - t) / 1e9)
        try:
            if self._plain and timers is not None:  # one coroutine, not three, per request
                try:
                    t = time.perf_counter_ns()
                    result = await self.model.predict(request)
                    timers.predict((time.perf_counter_ns() - t) / 1e9)
                except InferenceError:
                    raise
                except Exception as e:
                    raise self._failure(e) from None
                return self._response(result, request)
            return await self._call(request, executor)
        finally:
            slots.release()

    async def _traced(self, request: InferenceRequest, executor: Executor, tracer: Any) -> InferenceResponse:
        t = time.perf_counter_ns()
        with tracer.start_as_current_span("queue"):
            await self.slots.take()
        try:
            if self.timers is not None:
                self.timers.queue((time.perf_counter_ns() - t) / 1e9)
            with tracer.start_as_current_span("predict", attributes={"meshserve.model": self.name}):
                return await self._call(request, executor)
        finally:
            self.slots.release()

    def _on_batch(self, rows: int, arrivals: list[float]) -> None:
        now = asyncio.get_running_loop().time()
        queue = self.timers.queue
        for arrived in arrivals:
            queue(now - arrived)
        self.timers.batch(rows)

    async def _call(self, request: InferenceRequest, executor: Executor) -> InferenceResponse:
        """One call into the model (a request, or a merged batch of them) and its response."""
        try:
            result = await self._run(request, executor)
        except InferenceError:
            raise
        except Exception as e:
            raise self._failure(e) from None
        return self._response(result, request)

    def _failure(self, e: Exception) -> ModelExecutionError:
        log.exception("model %s raised", self.name)
        return ModelExecutionError(f"model {self.name!r} failed: {type(e).__name__}: {e}")

    async def _run(self, request: InferenceRequest, executor: Executor) -> Any:
        if self.timers is not None:
            return await self._run_timed(request, executor, self.timers)
        if self._pre is not None:
            request = await _maybe_await(self._pre(request))
        if self._predict_async:
            result = await self.model.predict(request)
        else:
            result = await asyncio.get_running_loop().run_in_executor(executor, self.model.predict, request)
        if self._post is not None:
            result = await _maybe_await(self._post(result))
        return result

    async def _run_timed(self, request: InferenceRequest, executor: Executor, timers: Any) -> Any:
        clock = time.perf_counter_ns
        if self._pre is not None:
            t = clock()
            request = await _maybe_await(self._pre(request))
            timers.preprocess((clock() - t) / 1e9)
        t = clock()
        if self._predict_async:
            result = await self.model.predict(request)
        else:
            result = await asyncio.get_running_loop().run_in_executor(executor, self.model.predict, request)
        timers.predict((clock() - t) / 1e9)
        if self._post is not None:
            t = clock()
            result = await _maybe_await(self._post(result))
            timers.postprocess((clock() - t) / 1e9)
        return result

    def _response(self, result: Any, request: InferenceRequest) -> InferenceResponse:
        parameters = None
        if isinstance(result, (list, tuple)):  # the usual return: checked and normalised in one pass
            outputs = []
            for t in result:
                if not isinstance(t, Tensor):
                    raise self._wrong_return(result)
                data = t.data
                if type(data) is not np.ndarray or data.dtype is not DTYPES.get(t.datatype):
                    t = _normalise(self.name, t)
                outputs.append(t)
        else:
            if isinstance(result, InferenceResponse):
                outputs, parameters = result.outputs, result.parameters
            elif isinstance(result, dict):
                outputs = [v if isinstance(v, Tensor) else Tensor.from_numpy(k, v) for k, v in result.items()]
            elif isinstance(result, np.ndarray):
                name = self.metadata.outputs[0].name if self.metadata.outputs else "output0"
                outputs = [Tensor.from_numpy(name, result)]
            else:
                raise self._wrong_return(result)
            outputs = [_normalise(self.name, t) for t in outputs]
        if request.outputs:
            by_name = {t.name: t for t in outputs}
            picked = []
            for o in request.outputs:
                t = by_name.get(o.name)
                if t is None:
                    raise InvalidInput(
                        f"model {self.name!r} has no output {o.name!r}; it produced {', '.join(by_name)}"
                    )
                picked.append(t)
            outputs = picked
        return InferenceResponse(self.name, outputs, model_version=self.version, id=request.id, parameters=parameters)

    def _wrong_return(self, result: Any) -> ModelExecutionError:
        return ModelExecutionError(
            f"model {self.name!r} returned {type(result).__name__}; expected an InferenceResponse, "
            "a list of Tensor, a dict of arrays or an array"
        )


def _check_tensor(model: str, t: Tensor, spec: TensorMetadata) -> None:
    if t.datatype != spec.datatype:
        raise InvalidInput(f"model {model!r}: input {t.name!r} must be {spec.datatype}, got {t.datatype}")
    shape = t.data.shape
    if len(shape) != len(spec.shape) or any(d != -1 and d != s for d, s in zip(spec.shape, shape, strict=True)):
        raise InvalidInput(f"model {model!r}: input {t.name!r} must have shape {spec.shape}, got {list(shape)}")


def _normalise(model: str, t: Tensor) -> Tensor:
    """Make the output's array agree with its datatype, once, so codecs can trust it."""
    dtype = DTYPES.get(t.datatype)
    if dtype is None:
        raise ModelExecutionError(f"model {model!r}: output {t.name!r} has unknown datatype {t.datatype!r}")
    data = t.data
    if type(data) is np.ndarray and data.dtype is dtype:
        return t  # already what its datatype says (the common case: nothing to do)
    data = data if isinstance(data, np.ndarray) else np.asarray(data)
    if t.datatype == "BYTES":
        if data.dtype != object:
            data = bytes_array([as_bytes(x) for x in data.reshape(-1)], data.shape)
    elif data.dtype != dtype:
        try:
            data = data.astype(dtype)
        except (TypeError, ValueError) as e:
            raise ModelExecutionError(f"model {model!r}: output {t.name!r} is not {t.datatype}: {e}") from None
    if data is not t.data:
        t = Tensor(t.name, t.datatype, data, t.parameters)
    return t


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
