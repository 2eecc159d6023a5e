"""OpenAI-compatible ``completions``, ``chat/completions`` and ``models``
(mounted under ``/openai/v1`` and ``/v1``, as vLLM serves them).

Response and error shapes follow OpenAI's API reference; errors are
``{"error": {"message", "type", "param", "code"}}`` with the matching status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from meshserve.protocol.errors import ModelNotFound
from meshserve.protocol.rest_codec import loads_object
from meshserve.server.llm.api_params import OpenAIRequest, ParamError, openai_request
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
        body = loads_object(await request.body())
        stats.model(body.get("model", ""))  # before the checks, so their 400s count under the model
        req = openai_request(body, chat)
        if req.echo and not all(isinstance(p, str) for p in req.prompts):
            raise ParamError("'echo' needs text prompts", "echo")
        rid = request_id("chatcmpl" if chat else "cmpl")
        if chat:

            def build_chat(engine, defaults):
                return chat_prompt(engine, req.messages or []), req.sampling.bind(engine.max_model_len, None, defaults)

            return req, [await Generation.start(dp, req.model, None, build_chat, rid)], rid

        def build(prompt):
            def bound(engine, defaults):
                sampling = replace(req.sampling, given=set(req.sampling.given))  # bind() fills in defaults
                return prompt, sampling.bind(engine.max_model_len, COMPLETION_DEFAULT_MAX_TOKENS, defaults)

            return bound

        many = len(req.prompts) > 1
        starts = [
            Generation.start(dp, req.model, None, build(p), f"{rid}-{i}" if many else rid)
            for i, p in enumerate(req.prompts)
        ]
        return req, await start_all(starts), rid

    @router.post("/completions", summary="Text completion")
    async def completions(request: Request) -> Response:
        stats = RequestStats(dp, OPENAI)
        try:
            req, gens, rid = await start(request, False, stats)
            head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model}
            echoes = [p if req.echo else "" for p in req.prompts]
            if req.stream:
                return GenerationResponse(_completion_events(gens, head, req, echoes, stats), gens, stats)
            dones = await collect_all_while_connected(gens, request.receive)
        except BaseException as e:
            return _ended_early(stats, e)
        stats.end()
        choices = [
            {"index": i, "text": echoes[i] + d.text, "logprobs": None, "finish_reason": _finish(d)}
            for i, d in enumerate(dones)
        ]
        usage = _usage(sum(d.prompt_tokens for d in dones), sum(d.completion_tokens for d in dones))
        return _json({**head, "choices": choices, "usage": usage})

    @router.post("/chat/completions", summary="Chat completion")
    async def chat_completions(request: Request) -> Response:
        stats = RequestStats(dp, OPENAI)
        try:
            req, (gen,), rid = await start(request, True, stats)
            head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model}
            if req.stream:
                events = _chat_events(gen, {**head, "object": "chat.completion.chunk"}, req, stats)
                return GenerationResponse(events, gen, stats)
            done = await gen.collect_while_connected(request.receive)
        except BaseException as e:
            return _ended_early(stats, e)
        stats.end()
        message = {"role": "assistant", "content": done.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(done)}
        return _json({**head, "choices": [choice], "usage": _usage(done.prompt_tokens, done.completion_tokens)})

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
    try:
        async for i, chunk in merged_chunks(gens):
            last[i] = chunk
            text, echoes[i] = echoes[i] + chunk.text, ""
            if not text and chunk.finish_reason is None:
                continue  # an incomplete character: nothing to show yet
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": _finish(chunk)}
            yield sse_event({**head, "choices": [choice], **usage_field})
        if req.include_usage:
            usage = _usage(sum(c.prompt_tokens for c in last.values()), sum(c.completion_tokens for c in last.values()))
            yield sse_event({**head, "choices": [], "usage": usage})
    except Exception as e:
        status, body = error_body(e)
        stats.status = status
        yield sse_event(body)
    yield DONE


async def _chat_events(gen: Generation, head: dict, req: OpenAIRequest, stats: RequestStats) -> AsyncIterator[bytes]:
    usage_field = {"usage": None} if req.include_usage else {}
    last = gen.first
    try:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield sse_event({**head, "choices": [first], **usage_field})
        async for chunk in gen.chunks():
            last = chunk
            if not chunk.text and chunk.finish_reason is None:
                continue
            delta = {"content": chunk.text} if chunk.text else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish(chunk)}
            yield sse_event({**head, "choices": [choice], **usage_field})
        if req.include_usage:
            yield sse_event({**head, "choices": [], "usage": _usage(last.prompt_tokens, last.completion_tokens)})
    except Exception as e:
        status, body = error_body(e)
        stats.status = status
        yield sse_event(body)
    yield DONE
