"""Sampling parameters from a request's ``parameters`` (OIP infer/generate, OpenAI bodies), checked.

Both engines call :func:`check_params` before accepting a sequence, so a bad value is
an ``InvalidInput`` (400 / INVALID_ARGUMENT) with the parameter's name in the message,
never a failure inside a decoding step.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from meshserve.protocol.errors import InvalidInput
from meshserve.server.llm.types import SamplingParams

# Request parameter names that mean a sampling setting (OpenAI, vLLM, Triton, HF names).
ALIASES = {
    "max_tokens": "max_tokens",
    "max_new_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "random_seed": "seed",
    "stop": "stop",
    "stop_sequences": "stop",
    "stop_words": "stop",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
}
# Parameters the protocol layers put on a request that are not sampling settings.
PROTOCOL_KEYS = frozenset(
    {"binary_data_output", "binary_data", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
     "headers", "triton_enable_empty_final_response", "stream", "request_id", "content_type"}
)  # fmt: skip
MAX_STOP = 16


def sampling_params_from(parameters: dict[str, Any] | None, defaults: SamplingParams | None = None) -> SamplingParams:
    """SamplingParams from a request's parameters; unknown names are an InvalidInput naming them."""
    sp = SamplingParams() if defaults is None else replace(defaults, stop=list(defaults.stop))
    unknown = []
    for key, value in (parameters or {}).items():
        field = ALIASES.get(key)
        if field is None:
            if key not in PROTOCOL_KEYS:
                unknown.append(key)
            continue
        if value is None:
            continue
        if field == "stop":
            value = [value] if isinstance(value, str) else value
        setattr(sp, field, value)
    if unknown:
        known = ", ".join(sorted(ALIASES))
        raise InvalidInput(f"unknown generation parameter(s) {', '.join(sorted(unknown))}; known: {known}")
    return sp


def _number(name: str, value: Any, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise InvalidInput(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be finite, got {value!r}")
    return value


def check_params(sp: SamplingParams, max_model_len: int, prompt_tokens: int | None = None) -> SamplingParams:
    """Validate (and normalise types in place); raises InvalidInput naming the bad parameter."""
    sp.max_tokens = int(_number("max_tokens", sp.max_tokens, integer=True))
    if sp.max_tokens <= 0:
        raise InvalidInput(f"max_tokens must be at least 1, got {sp.max_tokens}")
    if sp.max_tokens > max_model_len:
        raise InvalidInput(f"max_tokens {sp.max_tokens} exceeds the model's context length {max_model_len}")
    sp.temperature = float(_number("temperature", sp.temperature))
    if not 0 <= sp.temperature <= 100:
        raise InvalidInput(f"temperature must be in [0, 100], got {sp.temperature}")
    sp.top_p = float(_number("top_p", sp.top_p))
    if not 0 < sp.top_p <= 1:
        raise InvalidInput(f"top_p must be in (0, 1], got {sp.top_p}")
    sp.top_k = int(_number("top_k", sp.top_k, integer=True))
    if sp.top_k == -1:  # vLLM's "off"
        sp.top_k = 0
    if sp.top_k < 0:
        raise InvalidInput(f"top_k must be >= 0 (0 or -1: off), got {sp.top_k}")
    sp.repetition_penalty = float(_number("repetition_penalty", sp.repetition_penalty))
    if not 0 < sp.repetition_penalty <= 10:
        raise InvalidInput(f"repetition_penalty must be in (0, 10], got {sp.repetition_penalty}")
    if sp.seed is not None:
        sp.seed = int(_number("seed", sp.seed, integer=True))
        if not 0 <= sp.seed < 2**63:
            raise InvalidInput(f"seed must be in [0, 2**63), got {sp.seed}")
    if not isinstance(sp.stop, list) or not all(isinstance(s, str) and s for s in sp.stop):
        raise InvalidInput(f"stop must be a string or a list of non-empty strings, got {sp.stop!r}")
    if len(sp.stop) > MAX_STOP:
        raise InvalidInput(f"at most {MAX_STOP} stop sequences, got {len(sp.stop)}")
    if not isinstance(sp.ignore_eos, bool):
        raise InvalidInput(f"ignore_eos must be a boolean, got {sp.ignore_eos!r}")
    if prompt_tokens is not None:
        if prompt_tokens == 0:
            raise InvalidInput("the prompt is empty")
        if prompt_tokens >= max_model_len:
            raise InvalidInput(
                f"the prompt has {prompt_tokens} tokens; the model's context is {max_model_len} "
                "(prompt plus at least one generated token must fit)"
            )
    return sp
