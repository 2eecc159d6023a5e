"""OIP generate extension (Triton's ``generate`` / ``generate_stream``) and the
OpenAI-compatible routes, on the engine of the model named in the request. A model
that is not a language model answers generate too: its inputs from the JSON fields by
name, its outputs as fields (Triton's mapping), ``generate_stream`` as one event.

``generate`` answers one JSON object; ``generate_stream`` answers Server-Sent
Events, one ``data: {...}`` per chunk. An error before the first token is a
JSON error with its status; one after the stream began is a ``data: {"error": ...}``
event, as Triton does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from meshserve.protocol.errors import InferenceError
from meshserve.protocol.generate_codec import decode_generate_request, encode_generate_response
from meshserve.server.llm.api_params import OIP_FIELDS, ParamError, oip_sampling
from meshserve.server.llm.request_stats import OIP, RequestStats
from meshserve.server.llm.service import CLIENT_GONE, ClientGone, Generation, is_llm_model, request_id, request_object
from meshserve.server.llm.sse import SSE_HEADERS, SSE_MEDIA_TYPE, GenerationResponse, sse_event
from meshserve.server.rest.errors import error_status

if TYPE_CHECKING:
    from meshserve.server.dataplane import DataPlane

log = logging.getLogger(__name__)

_TOP_LEVEL = {"text_input", "parameters", "id"}
DEFAULT_MAX_TOKENS = 16  # as SamplingParams and OpenAI completions


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


def _generate_request(body: dict[str, Any]) -> tuple[str, dict[str, Any], Any]:
    """text_input, the parameters, the optional id. Triton passes extra top-level
    fields on as parameters (``{"text_input": ..., "max_tokens": 20}``): so do we."""
    text = body.get("text_input")
    if not isinstance(text, str):
        raise ParamError("'text_input' is required and must be a string", "text_input")
    if not text:
        raise ParamError("'text_input' must not be empty", "text_input")
    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ParamError("'parameters' must be an object", "parameters")
    params = dict(params or {})
    for k, v in body.items():
        if k in _TOP_LEVEL:
            continue
        if k not in OIP_FIELDS:
            raise ParamError(f"unknown field {k!r} in the generate request; fields: text_input, parameters "
                             f"(or a generation parameter: {', '.join(sorted(OIP_FIELDS))})", k)  # fmt: skip
        if k in params:
            raise ParamError(f"{k!r} is given both at the top level and in 'parameters'", k)
        params[k] = v
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ParamError("'id' must be a string", "id")
    return text, params, rid


async def _start(dp: DataPlane, name: str, version: str | None, body: dict[str, Any]) -> tuple[Generation, dict, str]:
    text, params, rid = _generate_request(body)
    sampling, options = oip_sampling(params)

    def build(engine, defaults):
        return text, sampling.bind(engine.max_model_len, DEFAULT_MAX_TOKENS, defaults)

    gen = await Generation.start(dp, name, version, build, rid or request_id("gen"), text_input=True)
    head = {"model_name": gen.model_name, "model_version": gen.model_version}
    if rid is not None:
        head["id"] = rid
    prefix = "" if options.exclude_input_in_output else text
    return gen, head, prefix


def build_llm_router(dp: DataPlane) -> APIRouter:
    router = APIRouter(tags=["LLM generation"])

    @router.post("/v2/models/{name}/generate", summary="Generate text (Triton generate extension)")
    @router.post("/v2/models/{name}/versions/{version}/generate", summary="Generate text with one version")
    async def generate(name: str, request: Request, version: str | None = None) -> Response:
        stats = RequestStats(dp, OIP, name)
        try:
            body = await request_object(request)
            if not is_llm_model(dp, name, version):
                return _json(await _generate_any(dp, name, version, body))
            gen, head, prefix = await _start(dp, name, version, body)
            done = await gen.collect_while_connected(request.receive)
        except ClientGone:
            stats.end(CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        except BaseException as e:
            stats.fail(e)
            raise
        finally:
            stats.end()
        return _json(
            {
                **head,
                "text_output": prefix + done.text,
                "finish_reason": done.finish_reason,
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
            }
        )

    @router.post("/v2/models/{name}/generate_stream", summary="Generate text as Server-Sent Events")
    @router.post("/v2/models/{name}/versions/{version}/generate_stream", summary="Stream one version's text")
    async def generate_stream(name: str, request: Request, version: str | None = None) -> Response:
        stats = RequestStats(dp, OIP, name)
        try:
            body = await request_object(request)
            if not is_llm_model(dp, name, version):  # one answer, one event
                doc = await _generate_any(dp, name, version, body)
                stats.end()
                return Response(sse_event(doc), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
            gen, head, prefix = await _start(dp, name, version, body)
        except BaseException as e:
            stats.fail(e)
            stats.end()
            raise
        return GenerationResponse(_events(gen, head, prefix, stats), gen, stats)

    from meshserve.server.llm.openai_api import build_openai_router

    openai = build_openai_router(dp)
    router.include_router(openai, prefix="/openai/v1")
    router.include_router(openai, prefix="/v1")
    return router


async def _generate_any(dp: DataPlane, name: str, version: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """A model that is not a language model: the generate fields are its inputs by name
    (Triton's mapping, protocol/generate_codec.py), its outputs come back as fields."""
    meta = dp.model_metadata(name, version)
    request = decode_generate_request(body, name, version, meta.inputs, dp.settings.max_bytes_elements)
    return encode_generate_response(await dp.infer(request))


async def _events(
    gen: Generation, head: dict[str, Any], prefix: str, stats: RequestStats | None = None
) -> AsyncIterator[bytes]:
    try:
        async for chunk in gen.chunks():
            yield sse_event(
                {
                    **head,
                    "text_output": prefix + chunk.text,
                    "finish_reason": chunk.finish_reason,
                    "prompt_tokens": chunk.prompt_tokens,
                    "completion_tokens": chunk.completion_tokens,
                }
            )
            prefix = ""
    except InferenceError as e:
        if stats is not None:
            stats.fail(e)
        yield sse_event({"error": error_status(e)[1]})
