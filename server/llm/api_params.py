"""Endpoint request fields -> :class:`SamplingParams`, strictly.

Every endpoint (OIP ``generate``/``infer``/gRPC, OpenAI completions and chat,
offline generation) reads its sampling settings here, so a misspelt parameter
is a 400 that names it everywhere instead of a silently ignored setting.
Two steps: ``parse`` checks names, types and ranges without the model;
``bind`` checks what needs the engine (its context length).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshserve.protocol.errors import InvalidInput
from meshserve.server.llm.types import SamplingParams

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class ParamError(InvalidInput):
    """A bad request field; ``param`` names it (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# -- single fields ----------------------------------------------------------------


def _int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ParamError(f"'{name}' must be an integer, got {_show(v)}", name)
    if lo is not None and v < lo:
        raise ParamError(f"'{name}' must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise ParamError(f"'{name}' must be <= {hi}, got {v}", name)
    return v


def _float(name: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ParamError(f"'{name}' must be a finite number, got {_show(v)}", name)
    v = float(v)
    if v < lo or (lo_open and v == lo) or v > hi:
        low = f"> {lo}" if lo_open else f">= {lo}"
        rng = low if hi == math.inf else f"{low} and <= {hi}"
        raise ParamError(f"'{name}' must be {rng}, got {v}", name)
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ParamError(f"'{name}' must be a boolean, got {_show(v)}", name)
    return v


def _stop(name: str, v: Any) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ParamError(f"'{name}' must be a string or a list of strings", name)
    if len(items) > MAX_STOP_SEQUENCES:
        raise ParamError(f"'{name}' has {len(items)} sequences; at most {MAX_STOP_SEQUENCES} are allowed", name)
    for s in items:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise ParamError(f"each '{name}' sequence must be 1 to {MAX_STOP_LENGTH} characters long", name)
    return list(items)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown(names: list[str], supported: list[str], where: str) -> ParamError:
    listed = ", ".join(repr(n) for n in sorted(names))
    word = "parameter" if len(names) == 1 else "parameters"
    return ParamError(f"unknown {where} {word} {listed}; supported: {', '.join(sorted(supported))}", sorted(names)[0])


# -- the sampling part shared by every endpoint -------------------------------------

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOP_TOKEN_IDS = 64


@dataclass(slots=True)
class Sampling:
    """Checked sampling fields; ``max_tokens=None`` means the endpoint's default."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens_field: str = "max_tokens"
    given: set[str] = field(default_factory=set)  # the fields the request set

    def copy(self) -> Sampling:
        """An independent copy (``bind`` fills the fields it is missing in place)."""
        return replace(self, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids), given=set(self.given))

    def bind(self, max_model_len: int, default_max_tokens: int | None, model: Sampling | None = None) -> SamplingParams:
        """The engine's parameters. Fields the request left out come from the model's
        ``parameters.generation`` (``model``), then the endpoint's default;
        ``default_max_tokens=None`` means "up to the context"."""
        if model is not None:
            for name in model.given - self.given:
                setattr(self, name, getattr(model, name))
            if "max_tokens" in model.given - self.given:
                self.max_tokens_field = "parameters.generation.max_tokens"
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = max_model_len if default_max_tokens is None else min(default_max_tokens, max_model_len)
        elif max_tokens > max_model_len:
            raise ParamError(
                f"'{self.max_tokens_field}' is {max_tokens}, more than the model's context of {max_model_len} tokens",
                self.max_tokens_field,
            )
        if self.min_tokens > max_tokens:
            raise ParamError(f"'min_tokens' ({self.min_tokens}) must be <= max_tokens ({max_tokens})", "min_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


# Names every endpoint accepts (OpenAI / vLLM spelling), with the aliases other
# servers use (Hugging Face's max_new_tokens, TensorRT-LLM's random_seed/stop_words).
ABSURD_MAX_TOKENS = 1 << 20
_ALIASES = {"max_new_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "random_seed": "seed",
            "stop_words": "stop", "stop_sequences": "stop"}  # fmt: skip
SAMPLING_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "ignore_eos",
                   "min_tokens", "stop_token_ids", "presence_penalty", "frequency_penalty"]  # fmt: skip


def _token_ids(name: str, v: Any) -> list[int]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(_is_token(t) for t in v):
        raise ParamError(f"'{name}' must be a list of non-negative integer token ids", name)
    if len(v) > MAX_STOP_TOKEN_IDS:
        raise ParamError(f"'{name}' has {len(v)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed", name)
    return list(v)


def _set(s: Sampling, name: str, v: Any, min_max_tokens: int = 1) -> None:
    target = _ALIASES.get(name, name)
    if v is not None:
        s.given.add(target)
    if target == "max_tokens":
        if v is None:
            return
        if s.max_tokens is not None and s.max_tokens_field != name:
            raise ParamError(f"give either '{s.max_tokens_field}' or '{name}', not both", name)
        s.max_tokens, s.max_tokens_field = _int(name, v, min_max_tokens, ABSURD_MAX_TOKENS), name
    elif target == "stop":
        s.stop = _stop(name, v)
    elif target == "stop_token_ids":
        s.stop_token_ids = _token_ids(name, v)
    elif v is None:
        return
    elif target == "temperature":
        s.temperature = _float(name, v, 0.0, 100.0)
    elif target == "top_p":
        s.top_p = _float(name, v, 0.0, 1.0, lo_open=True)
    elif target == "top_k":
        k = _int(name, v, -1)
        s.top_k = 0 if k == -1 else k  # vLLM's -1 and 0 both mean "off"
    elif target == "seed":
        s.seed = _int(name, v, 0, 2**63 - 1)
    elif target == "repetition_penalty":
        s.repetition_penalty = _float(name, v, 0.0, 10.0, lo_open=True)
    elif target == "ignore_eos":
        s.ignore_eos = _bool(name, v)
    elif target == "min_tokens":
        s.min_tokens = _int(name, v, 0, ABSURD_MAX_TOKENS)
    elif target in ("presence_penalty", "frequency_penalty"):
        setattr(s, target, _float(name, v, -2.0, 2.0))
    else:  # pragma: no cover - callers only pass known names
        raise AssertionError(name)


def model_defaults(doc: Any) -> Sampling | None:
    """A model's ``parameters.generation`` (the llm runtime checked it at load); None if unset."""
    if not isinstance(doc, Mapping) or not doc:
        return None
    s = Sampling()
    for name, v in doc.items():
        if name in SAMPLING_FIELDS or name in _ALIASES:
            _set(s, name, v)
    return s


def check_model_defaults(doc: Any) -> Sampling | None:
    """``parameters.generation`` checked strictly at load: an unknown name or a bad value is an error."""
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise ParamError("parameters.generation must be an object of sampling defaults", "generation")
    unknown = [k for k in doc if k not in SAMPLING_FIELDS and k not in _ALIASES]
    if unknown:
        raise _unknown(unknown, SAMPLING_FIELDS, "generation")
    return model_defaults(doc)


def check_params(sp: SamplingParams, max_model_len: int, prompt_tokens: int | None = None) -> SamplingParams:
    """The engines' own guard on what they are handed (endpoints parse with the functions
    above; tests and embedders may build ``SamplingParams`` directly): the same checks and
    words, plus the context (normalised in place)."""
    s = Sampling()
    for name in SAMPLING_FIELDS:
        _set(s, name, getattr(sp, name))
    bound = s.bind(max_model_len, None)
    for name in SAMPLING_FIELDS:
        setattr(sp, name, getattr(bound, name))
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(sp, name) is not None:
            setattr(sp, name, _int(name, getattr(sp, name), 0, MAX_LOGPROBS))
    if prompt_tokens is not None:
        if prompt_tokens == 0:
            raise InvalidInput("the prompt is empty")
        if prompt_tokens >= max_model_len:
            raise InvalidInput(
                f"the prompt has {prompt_tokens} tokens; the model's context is {max_model_len} "
                "(prompt plus at least one generated token must fit)"
            )
    return sp


# -- OIP: generate / infer / gRPC parameters -----------------------------------------

OIP_EXTRA = ["stream", "exclude_input_in_output"]
# Parameters the OIP fronts put on an infer request that are not sampling settings.
PROTOCOL_KEYS = frozenset(
    {"binary_data_output", "binary_data", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
     "headers", "triton_enable_empty_final_response", "request_id", "content_type"}
)  # fmt: skip
OIP_FIELDS = SAMPLING_FIELDS + ["max_new_tokens", "random_seed", "stop_words", "stop_sequences"] + OIP_EXTRA


@dataclass(slots=True)
class OIPOptions:
    stream: bool = False
    exclude_input_in_output: bool = True


def oip_sampling(
    parameters: Mapping[str, Any] | None, ignore: frozenset[str] = frozenset()
) -> tuple[Sampling, OIPOptions]:
    """``parameters`` of a generate/infer request -> (sampling, stream and echo flags).

    ``ignore``: names the transport itself uses (e.g. tritonclient's
    ``triton_enable_empty_final_response``), accepted and not sampling settings."""
    if parameters is None:
        return Sampling(), OIPOptions()
    if not isinstance(parameters, Mapping):
        raise ParamError("'parameters' must be an object", "parameters")
    unknown = [k for k in parameters if k not in OIP_FIELDS and k not in ignore]
    if unknown:
        raise _unknown(unknown, OIP_FIELDS, "generation")
    s = Sampling()
    options = OIPOptions()
    for name, v in parameters.items():
        if name in ignore:
            continue
        if name in OIP_EXTRA:
            if v is not None:
                setattr(options, name, _bool(name, v))
        else:
            _set(s, name, v)
    return s, options


# -- OpenAI completions and chat ------------------------------------------------------

MAX_CHOICES = 64  # prompts x n in one request


@dataclass(slots=True)
class OpenAIRequest:
    model: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: n choices each
    echo: bool = False
    messages: list[dict[str, Any]] | None = None  # chat
    n: int = 1
    logprobs: int | None = None  # top logprobs per token (completions' logprobs, chat's top_logprobs)
    echo_only: bool = False  # completions with echo and max_tokens 0: the prompt (and its logprobs) only
    echoes: list[str] = field(default_factory=list)  # per choice, filled as the choices start

    def choice_params(self, params: SamplingParams, choice: int) -> SamplingParams:
        """One choice's engine parameters: its own seed (``seed + choice``, as vLLM's
        parallel sampling), the logprobs asked for."""
        params.logprobs = self.logprobs
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        if params.seed is not None and choice:
            params.seed = (params.seed + choice) % 2**63
        return params


# Fields accepted and ignored: they change nothing a client could observe here.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Fields accepted only at the value that means "off" (the feature is not offered).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
_WHY_OFF = {
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix is not supported",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "response_format": "only response_format {'type': 'text'} is supported",
}
_COMMON = ["model", "stream", "stream_options", "n", *SAMPLING_FIELDS, *_IGNORED]
COMPLETION_FIELDS = [*_COMMON, "prompt", "echo", "logprobs", "best_of"]
CHAT_FIELDS = [*_COMMON, "messages", "max_completion_tokens", "logprobs", "top_logprobs"]


def openai_request(body: Mapping[str, Any], chat: bool) -> OpenAIRequest:
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = [k for k in body if k not in fields and k not in _OFF_VALUES]
    if unknown:
        raise _unknown(unknown, fields, "request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ParamError("'model' is required: the name of a served model", "model")
    echo = False if chat or body.get("echo") is None else _bool("echo", body["echo"])
    s = Sampling()
    for name in (*SAMPLING_FIELDS, "max_completion_tokens"):
        if name in body:
            _set(s, name, body[name], min_max_tokens=0 if echo else 1)
    for name, off in _OFF_VALUES.items():
        v = body.get(name)
        if v is not None and not any(v == o and type(v) is type(o) for o in off):
            raise ParamError(_WHY_OFF[name], name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ParamError("'user' must be a string", "user")
    stream = body.get("stream")
    stream = False if stream is None else _bool("stream", stream)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ParamError("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise ParamError("'stream_options' must be an object", "stream_options")
        extra = [k for k in options if k not in ("include_usage", "continuous_usage_stats")]
        if extra:
            raise _unknown(extra, ["include_usage", "continuous_usage_stats"], "stream_options")
        if options.get("include_usage") is not None:
            include_usage = _bool("stream_options.include_usage", options["include_usage"])
    n = 1 if body.get("n") is None else _int("n", body["n"], 1, MAX_CHOICES)
    req = OpenAIRequest(model=model, sampling=s, stream=stream, include_usage=include_usage, n=n, echo=echo)
    if chat:
        req.messages = chat_messages(body.get("messages"))
        if body.get("logprobs") is not None and _bool("logprobs", body["logprobs"]):
            top = body.get("top_logprobs")
            req.logprobs = 0 if top is None else _int("top_logprobs", top, 0, MAX_LOGPROBS)
        elif body.get("top_logprobs") is not None:
            raise ParamError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        req.prompts = completion_prompts(body.get("prompt"))
        if body.get("logprobs") is not None:
            req.logprobs = _int("logprobs", body["logprobs"], 0, MAX_LOGPROBS)
        best_of = body.get("best_of")
        if best_of is not None and _int("best_of", best_of, 1) != n:
            raise ParamError("best_of is not supported (only best_of equal to n)", "best_of")
        if s.max_tokens == 0:  # echo (checked above): score the prompt, generate nothing
            req.echo_only = True
            s.max_tokens, s.min_tokens = 1, 0
    if len(req.prompts or [None]) * n > MAX_CHOICES:
        raise ParamError(f"at most {MAX_CHOICES} choices per request (prompts x n), got {len(req.prompts) * n}", "n")
    return req


MAX_PROMPTS = 64


def completion_prompts(v: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, token ids, or a list of either (one choice each)."""
    if isinstance(v, str) or (isinstance(v, list) and v and all(_is_token(t) for t in v)):
        items: list[Any] = [v]
    elif isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
        items = v
    else:
        raise ParamError("'prompt' must be a string, a list of token ids, or a list of either", "prompt")
    if len(items) > MAX_PROMPTS:
        raise ParamError(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", "prompt")
    for p in items:
        if isinstance(p, str) and not p:
            raise ParamError("a prompt must not be empty", "prompt")
        if isinstance(p, list) and not (p and all(_is_token(t) for t in p)):
            raise ParamError("a token-id prompt must be a non-empty list of non-negative integers", "prompt")
    return [p if isinstance(p, str) else list(p) for p in items]


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def chat_messages(v: Any) -> list[dict[str, Any]]:
    """Messages with string contents (text parts joined), ready for a chat template."""
    if not isinstance(v, list) or not v:
        raise ParamError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ParamError(f"{where} must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise ParamError(f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {_show(role)}", "messages")
        extra = [k for k in m if k not in ("role", "content", "name")]
        if extra:
            raise ParamError(f"{where} has unsupported field(s) {', '.join(map(repr, sorted(extra)))}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ParamError(f"{where}.content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ParamError(f"{where}.content must be a string or a list of text parts", "messages")
        msg = {"role": role, "content": content}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise ParamError(f"{where}.name must be a string", "messages")
            msg["name"] = m["name"]
        out.append(msg)
    return out
