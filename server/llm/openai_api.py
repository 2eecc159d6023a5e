"""OpenAI-compatible ``completions``, ``chat/completions`` and ``models``
(mounted under ``/openai/v1`` and ``/v1``, as vLLM serves them).

Response and error shapes follow OpenAI's API reference; errors are
``{"error": {"message", "type", "param", "code"}}`` with the matching status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from meshserve.protocol.errors import ModelNotFound
from meshserve.server.llm.api_params import OpenAIRequest, ParamError, openai_request
from meshserve.server.llm.logprobs import CompletionLogprobs, chat_logprobs
from meshserve.server.llm.request_stats import OPENAI, RequestStats
from meshserve.server.llm.service import (
    CLIENT_GONE,
    ClientGone,
    Completed,
    Generation,
    chat_prompt,
    collect_all_while_connected,
    is_llm,
    merged_chunks,
    request_id,
    request_object,
    start_all,
)
from meshserve.server.llm.sse import GenerationResponse, sse_event
from meshserve.server.rest.errors import error_response as rest_error
from meshserve.server.rest.errors import error_status

if TYPE_CHECKING:
    from meshserve.server.dataplane import DataPlane

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat runs up to the context


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


def error_body(e: BaseException) -> tuple[int, dict[str, Any]]:
    status, message = error_status(e)  # redacted; the unexpected logged
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "model_not_found" if isinstance(e, ModelNotFound) else None
    param = e.param if isinstance(e, ParamError) else None
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: BaseException) -> Response:
    """OpenAI's error shape, through the one REST error builder (headers a status implies)."""
    status, body = error_body(e)
    return rest_error(status, "", e=e, body=orjson.dumps(body))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def build_openai_router(dp: DataPlane) -> APIRouter:
    router = APIRouter(tags=["OpenAI-compatible"])
    started = int(time.time())

    def model_card(entry: Any) -> dict[str, Any]:
        card = {"id": entry.spec.name, "object": "model", "created": started, "owned_by": "meshserve"}
        handle = entry.handle
        engine = getattr(handle.model, "engine", None) if handle is not None else None
        if engine is not None:
            card["max_model_len"] = engine.max_model_len
        return card

    def llm_entries() -> dict[str, Any]:
        cards: dict[str, Any] = {}
        for entry in dp.cache.entries():
            if is_llm(entry) and entry.spec.name not in cards:
                cards[entry.spec.name] = entry
        return cards

    @router.get("/models", summary="The language models served")
    async def list_models() -> Response:
        return _json({"object": "list", "data": [model_card(e) for e in llm_entries().values()]})

    @router.get("/models/{model_id}", summary="One language model")
    async def get_model(model_id: str) -> Response:
        entry = llm_entries().get(model_id)
        if entry is None:
            return error_response(ModelNotFound(f"the model {model_id!r} does not exist"))
        return _json(model_card(entry))

    async def start(request: Request, chat: bool, stats: RequestStats) -> tuple[OpenAIRequest, list[Generation], str]:
        body = await request_object(request)  # decoded once: the front may have done it
        stats.model(body.get("model", ""))  # before the checks, so their 400s count under the model
        req = openai_request(body, chat)
        rid = request_id("chatcmpl" if chat else "cmpl")
        # Every choice started, prompt-major (choice p * n + j); req.echoes gets each one's echo.
        prompts: list[Any] = [None] if chat else req.prompts
        echoes = req.echoes = [""] * (len(prompts) * req.n)

        def build(index: int, prompt: Any, choice: int):
            def bound(engine, defaults):
                if chat:
                    prompt_ = chat_prompt(engine, req.messages or [])
                else:
                    prompt_ = prompt
                    if req.echo:
                        echoes[index] = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)
                default = None if chat else COMPLETION_DEFAULT_MAX_TOKENS  # chat runs up to the context
                params = req.sampling.copy().bind(engine.max_model_len, default, defaults)
                return prompt_, req.choice_params(params, choice)

            return bound

        many = len(echoes) > 1
        starts = [
            Generation.start(dp, req.model, None, build(i * req.n + j, p, j), f"{rid}-{i * req.n + j}" if many else rid)
            for i, p in enumerate(prompts)
            for j in range(req.n)
        ]
        return req, await start_all(starts), rid

    @router.post("/completions", summary="Text completion")
    async def completions(request: Request) -> Response:
        stats = RequestStats(dp, OPENAI)
        try:
            req, gens, rid = await start(request, False, stats)
            echoes = req.echoes
            head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model}
            if req.stream:
                return GenerationResponse(_completion_events(gens, head, req, echoes, stats), gens, stats)
            dones = await collect_all_while_connected(gens, request.receive)
        except BaseException as e:
            return _ended_early(stats, e)
        stats.end()
        choices = []
        for i, d in enumerate(dones):
            logprobs = None
            if req.logprobs is not None:
                entries = list(d.prompt_logprobs or []) if req.echo else []
                logprobs = CompletionLogprobs().build(entries + ([] if req.echo_only else d.logprobs or []))
            text = echoes[i] + ("" if req.echo_only else d.text)
            finish = "length" if req.echo_only else _finish(d)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
        completion = 0 if req.echo_only else sum(d.completion_tokens for d in dones)
        usage = _usage(sum(d.prompt_tokens for d in dones[:: req.n]), completion)
        return _json({**head, "choices": choices, "usage": usage})

    @router.post("/chat/completions", summary="Chat completion")
    async def chat_completions(request: Request) -> Response:
        stats = RequestStats(dp, OPENAI)
        try:
            req, gens, rid = await start(request, True, stats)
            head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model}
            if req.stream:
                events = _chat_events(gens, {**head, "object": "chat.completion.chunk"}, req, stats)
                return GenerationResponse(events, gens, stats)
            dones = await collect_all_while_connected(gens, request.receive)
        except BaseException as e:
            return _ended_early(stats, e)
        stats.end()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": d.text},
                "logprobs": None if req.logprobs is None else chat_logprobs(d.logprobs or []),
                "finish_reason": _finish(d),
            }
            for i, d in enumerate(dones)
        ]
        usage = _usage(dones[0].prompt_tokens, sum(d.completion_tokens for d in dones))
        return _json({**head, "choices": choices, "usage": usage})

    return router


def _ended_early(stats: RequestStats, e: BaseException) -> Response:
    """A request that ended before its answer: counted once, answered with its error
    (a client that left gets nothing; cancellation goes on up)."""
    if isinstance(e, ClientGone):
        stats.end(CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)
    stats.fail(e)
    stats.end()
    if not isinstance(e, Exception):
        raise e
    return error_response(e)


def _finish(c: Completed | Any) -> str | None:
    reason = c.finish_reason
    return "stop" if reason == "abort" else reason


async def _completion_events(
    gens: list[Generation], head: dict, req: OpenAIRequest, echoes: list[str], stats: RequestStats
) -> AsyncIterator[bytes]:
    usage_field = {"usage": None} if req.include_usage else {}
    last = {i: g.first for i, g in enumerate(gens)}
    echoes = list(echoes)
    offsets = [CompletionLogprobs() for _ in gens]
    try:
        async for i, chunk in merged_chunks(gens):
            last[i] = chunk
            if req.echo_only:  # the prompt and its logprobs; the token made to score it is not sent
                logprobs = None if req.logprobs is None else offsets[i].build(list(chunk.prompt_logprobs or []))
                choice = {"index": i, "text": echoes[i], "logprobs": logprobs, "finish_reason": "length"}
                yield sse_event({**head, "choices": [choice], **usage_field})
                continue
            text, echoes[i] = echoes[i] + chunk.text, ""
            logprobs = None
            if req.logprobs is not None:
                entries = list(chunk.prompt_logprobs or []) if req.echo else []
                logprobs = offsets[i].build(entries + (chunk.logprobs or []))
            if not text and chunk.finish_reason is None and logprobs is None:
                continue  # an incomplete character: nothing to show yet
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": _finish(chunk)}
            yield sse_event({**head, "choices": [choice], **usage_field})
        if req.include_usage:
            ends = [last[i] for i in range(len(gens))]
            completion = 0 if req.echo_only else sum(c.completion_tokens for c in ends)
            usage = _usage(sum(c.prompt_tokens for c in ends[:: req.n]), completion)
            yield sse_event({**head, "choices": [], "usage": usage})
    except Exception as e:
        status, body = error_body(e)
        stats.status = status
        yield sse_event(body)
    yield DONE


async def _chat_events(
    gens: list[Generation], head: dict, req: OpenAIRequest, stats: RequestStats
) -> AsyncIterator[bytes]:
    usage_field = {"usage": None} if req.include_usage else {}
    last = {i: g.first for i, g in enumerate(gens)}
    try:
        for i in range(len(gens)):
            first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}  # fmt: skip
            yield sse_event({**head, "choices": [first], **usage_field})
        async for i, chunk in merged_chunks(gens):
            last[i] = chunk
            logprobs = None if req.logprobs is None else chat_logprobs(chunk.logprobs or [])
            if not chunk.text and chunk.finish_reason is None and logprobs is None:
                continue
            delta = {"content": chunk.text} if chunk.text else {}
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": _finish(chunk)}
            yield sse_event({**head, "choices": [choice], **usage_field})
        if req.include_usage:
            ends = [last[i] for i in range(len(gens))]
            usage = _usage(ends[0].prompt_tokens, sum(c.completion_tokens for c in ends))
            yield sse_event({**head, "choices": [], "usage": usage})
    except Exception as e:
        status, body = error_body(e)
        stats.status = status
        yield sse_event(body)
    yield DONE
