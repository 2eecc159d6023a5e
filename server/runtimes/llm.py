"""Generative LLMs behind the plain OIP ``infer``: a BYTES prompt in, ``text_output`` out.

The model folder is a ``save_pretrained`` causal LM (config.json, weights, tokenizer).
``load`` builds the engine (:func:`meshserve.server.llm.factory.create_engine`: the embedded
continuous-batching transformers engine, or vLLM) and starts it; the OIP generate,
OpenAI and gRPC streaming endpoints reach the same engine through ``self.engine``.

Input: ``text_input`` BYTES ``[-1]`` (``input0`` is accepted too, as in the seed's curl
example), one prompt per element, each generated to completion concurrently in the
engine's running batch. Sampling settings come from the request's ``parameters``
(the sampling parameters every LLM endpoint takes, parsed by
:mod:`meshserve.server.llm.api_params`), on top of the model's ``parameters.generation``
defaults. Output: ``text_output`` BYTES, one per prompt.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from meshserve.protocol.datatypes import bytes_array
from meshserve.protocol.errors import InvalidInput, ModelLoadError
from meshserve.protocol.types import InferenceRequest, InferenceResponse, ModelMetadata, Tensor, TensorMetadata
from meshserve.server.llm.api_params import PROTOCOL_KEYS, Sampling, check_model_defaults, oip_sampling
from meshserve.server.llm.types import GenerationChunk, LLMEngine, SamplingParams
from meshserve.server.runtimes.base import Model

INPUT = "text_input"
OUTPUT = "text_output"
INPUT_ALIASES = {"input0": INPUT, "text": INPUT, "prompt": INPUT}
DEFAULT_MAX_TOKENS = 16  # as OIP generate and OpenAI completions


class LLMModel(Model):
    input_aliases = INPUT_ALIASES

    def __init__(self, settings: Any, path: Any = None) -> None:
        super().__init__(settings, path)
        self.engine: LLMEngine | None = None
        if "max_concurrency" not in settings.model_fields_set:
            # The engine queues and batches; the data plane's per-model limit must not throttle it.
            p = settings.parameters
            try:
                settings.max_concurrency = max(1, int(p.get("max_num_seqs", 32)) + int(p.get("max_waiting", 256)))
            except (TypeError, ValueError):
                raise ModelLoadError("max_num_seqs and max_waiting must be integers") from None
        # "chat": true - plain infer sends each text_input as a user message through the
        # tokenizer's chat template (an instruct model answering a question, as in the seed).
        self.chat = settings.parameters.get("chat", False)
        if not isinstance(self.chat, bool):
            raise ModelLoadError("parameters.chat must be true or false")
        try:
            self.defaults = check_model_defaults(settings.parameters.get("generation"))
        except InvalidInput as e:
            raise ModelLoadError(f"parameters.generation: {e.message}") from None

    async def load(self) -> None:
        from meshserve.server.llm.factory import create_engine

        if self.path is None:
            raise ModelLoadError(f"model {self.name!r}: the llm runtime needs a model folder (uri)")
        engine = create_engine(self.path, self.name, self.parameters)
        await engine.start()
        self.engine = engine
        try:
            Sampling().bind(engine.max_model_len, DEFAULT_MAX_TOKENS, self.defaults)
        except InvalidInput as e:
            await engine.stop()
            raise ModelLoadError(f"parameters.generation: {e.message}") from None

    async def unload(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.stop()

    def size_bytes(self) -> int | None:
        size = getattr(self.engine, "size_bytes", None)
        return int(size()) if callable(size) else None

    def metadata(self) -> ModelMetadata:
        meta = self.settings.metadata()
        engine = type(self.engine).__name__ if self.engine is not None else "engine"
        meta.platform = self.settings.platform or f"llm:{engine}"
        if not meta.inputs:
            meta.inputs = [TensorMetadata(INPUT, "BYTES", [-1])]
        if not meta.outputs:
            meta.outputs = [TensorMetadata(OUTPUT, "BYTES", [-1])]
        if self.engine is not None:
            meta.parameters = {"max_model_len": self.engine.max_model_len}
        return meta

    def sampling_params(self, engine: LLMEngine, parameters: dict[str, Any] | None) -> SamplingParams:
        """A plain infer request's parameters, as every LLM endpoint reads them."""
        sampling, _ = oip_sampling(parameters, ignore=PROTOCOL_KEYS)
        return sampling.bind(engine.max_model_len, DEFAULT_MAX_TOKENS, self.defaults)

    def text_prompt(self, engine: LLMEngine, text: str) -> str:
        """A text_input (plain infer, OIP generate, gRPC streaming) as the engine gets it:
        through the chat template as a user message when the model's settings say "chat"."""
        return self._chat(engine, text) if self.chat else text

    def _chat(self, engine: LLMEngine, text: str) -> str:
        try:
            return engine.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        except Exception as e:
            raise InvalidInput(f"model {self.name!r} cannot format chat messages: {e}") from None

    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        engine = self.engine
        if engine is None:
            raise InvalidInput(f"model {self.name!r} is not loaded")
        prompts = _prompts(request, self.name)
        prompts = [self.text_prompt(engine, p) for p in prompts]
        base = request.id or uuid.uuid4().hex
        params = [self.sampling_params(engine, request.parameters) for _ in prompts]
        # Queue every prompt first: bad input or a full queue fails the whole request before any work.
        streams: list[Any] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
                streams.append(engine.generate(p, sp, f"{base}-{i}"))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        tasks = [asyncio.ensure_future(_collect(s)) for s in streams]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in streams:  # never iterated ones still hold a queue slot
                await s.aclose()
            raise
        texts = [d[0] for d in done]
        out = Tensor(OUTPUT, "BYTES", bytes_array([t.encode() for t in texts], (len(texts),)))
        return InferenceResponse(
            self.name,
            [out],
            id=request.id,
            parameters={
                "finish_reason": ",".join(d[1] or "" for d in done),
                "prompt_tokens": sum(d[2] for d in done),
                "completion_tokens": sum(d[3] for d in done),
            },
        )


async def _collect(stream: Any) -> tuple[str, str | None, int, int]:
    parts: list[str] = []
    last: GenerationChunk | None = None
    async for chunk in stream:
        parts.append(chunk.text)
        last = chunk
    if last is None:
        return "", None, 0, 0
    return "".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens


def _prompts(request: InferenceRequest, model: str) -> list[str]:
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {model!r} takes one input, {INPUT!r} (BYTES prompts)")
    t = request.inputs[0]
    if t.datatype != "BYTES":
        raise InvalidInput(f"model {model!r}: input {t.name!r} must be BYTES (UTF-8 text), got {t.datatype}")
    try:
        prompts = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in t.data.reshape(-1)]
    except UnicodeDecodeError as e:
        raise InvalidInput(f"model {model!r}: input {t.name!r} is not valid UTF-8: {e}") from None
    if not prompts:
        raise InvalidInput(f"model {model!r}: input {t.name!r} holds no prompt")
    return prompts
