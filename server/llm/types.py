"""The contract between LLM engines and the endpoints that drive them.

An engine owns a model and a tokenizer and schedules sequences; endpoints (OIP
``generate``/``generate_stream``/``infer``, OpenAI-compatible routes, gRPC
streaming, offline batch generation) only call :class:`LLMEngine`. Both the
transformers engine and the vLLM engine implement it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class SamplingParams:
    """Per-request generation settings (OpenAI / vLLM names). ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0  # OpenAI semantics: on the generated tokens only
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top logprobs per generated token (None: none; 0: the chosen token's only)
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)


@dataclass(slots=True)
class TokenLogprob:
    """One token's log probability (of the model's raw distribution) and the ``top`` most likely
    tokens, as (id, text, logprob). The first prompt token has no context: its ``logprob`` is None."""

    token_id: int
    text: str
    logprob: float | None
    top: list[tuple[int, str, float]]


@dataclass(slots=True)
class GenerationChunk:
    """One step's output for one sequence: the new text and tokens since the previous chunk.

    The last chunk of a sequence has ``finish_reason`` set ("stop": EOS, a stop
    token or a stop sequence; "length": max_tokens or the context was reached; "abort").
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first chunk only, when asked for


class LLMEngine(Protocol):
    """What every engine offers. ``generate`` yields chunks as tokens are decoded.

    Closing the iterator (``await stream.aclose()``, even before iterating it) or
    cancelling the task that iterates it (e.g. when a client disconnects) drops the
    sequence from the waiting queue at once and from the running batch at the next step.
    A full queue raises ``meshserve.protocol.errors.CapacityExhausted`` (503 / UNAVAILABLE);
    bad parameters or a prompt longer than the context raise ``InvalidInput``.
    """

    model_name: str
    max_model_len: int
    tokenizer: Any  # a transformers tokenizer (echo of token-id prompts decodes with it)
    # Metrics hooks (meshserve.server.llm.metrics.Observer) or None: on_first_token(seconds),
    # on_step(seconds), on_finish(prompt_tokens, completion_tokens, seconds).
    observer: Any

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids as ``generate`` will see them (no second BOS after a chat template)."""
        ...

    def size_bytes(self) -> int | None:
        """Bytes of the model's parameters and buffers (None: the engine cannot tell)."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters and gauges for metrics: prompt_tokens, generation_tokens, running, waiting, ..."""
        ...
