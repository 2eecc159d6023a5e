"""Token streaming through gRPC ``ModelStreamInfer`` for language models.

A request to an LLM with a BYTES ``text_input`` (or ``input0``) and ``stream``
set (a ``stream`` parameter, or a BOOL ``stream`` input as Triton's vLLM
backend takes it) gets one response per chunk, each with ``text_output``.
Responses carry Triton's decoupled-model flag ``triton_final_response``; when
the request sets ``triton_enable_empty_final_response`` (tritonclient's
``start_stream(..., enable_empty_final_response=True)``), the stream for that
request ends with an empty response flagged final, as Triton sends it.
Without ``stream``, the request is a plain infer answered once (flagged final).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
from meshserve.protocol.datatypes import bytes_array
from meshserve.protocol.errors import InferenceError, InvalidInput
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc.codec import decode_infer_request, encode_infer_response
from meshserve.protocol.types import InferenceRequest, InferenceResponse, Tensor
from meshserve.server.llm.api_params import OIP_FIELDS, oip_sampling
from meshserve.server.llm.service import Generation, request_id
from meshserve.server.security import redact

if TYPE_CHECKING:
    from meshserve.server.dataplane import DataPlane

FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
TEXT_INPUTS = ("text_input", "input0")
# Request parameters the transports set that are not generation settings.
TRANSPORT_PARAMS = frozenset({EMPTY_FINAL, "binary_data_output", "priority", "timeout", "sequence_id",
                              "sequence_start", "sequence_end"})  # fmt: skip
DEFAULT_MAX_TOKENS = 16


def _scalar(t: Tensor) -> Any:
    if t.data.size != 1:
        raise InvalidInput(f"input {t.name!r} must hold one element, got shape {list(t.data.shape)}")
    v = t.data.reshape(-1)[0]
    if t.datatype == "BYTES":
        try:
            return bytes(v).decode()
        except UnicodeDecodeError:
            raise InvalidInput(f"input {t.name!r} is not valid UTF-8") from None
    return v.item() if isinstance(v, np.generic) else v


def read_request(request: InferenceRequest) -> tuple[str | None, dict[str, Any]]:
    """The prompt (None: not one text prompt) and the parameters, where scalar inputs
    named like parameters (TensorRT-LLM's ``max_tokens``, vLLM backend's ``stream``)
    count as parameters."""
    params = dict(request.parameters)
    text = None
    for t in request.inputs:
        if t.name in TEXT_INPUTS:
            if t.datatype != "BYTES":
                raise InvalidInput(f"input {t.name!r} must be BYTES, got {t.datatype}")
            if t.data.size != 1:  # several prompts: answered at once by the runtime's plain infer
                return None, params
            text = _scalar(t)
        elif t.name in OIP_FIELDS:
            if t.name in params:
                raise InvalidInput(f"{t.name!r} is given both as an input and as a parameter")
            params[t.name] = _scalar(t)
        else:
            raise InvalidInput(f"unexpected input {t.name!r}; a text request has text_input (or input0)")
    return text, params


def _response(src: Any, rid: str, text: str | None, final: bool, finish: str | None) -> pb.ModelStreamInferResponse:
    outputs = [] if text is None else [Tensor("text_output", "BYTES", bytes_array([text.encode()], [1]))]
    parameters: dict[str, Any] = {FINAL: final}
    if finish is not None:
        parameters["finish_reason"] = finish
    response = InferenceResponse(
        src.model_name, outputs, model_version=src.model_version or "", id=rid, parameters=parameters
    )
    return pb.ModelStreamInferResponse(infer_response=encode_infer_response(response, raw=True))


async def stream_llm(dp: DataPlane, msg: pb.ModelInferRequest) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """Every response of one request to an LLM; errors become ``error_message`` responses."""
    empty_final = False
    try:
        request = decode_infer_request(msg, dp.settings.max_bytes_elements)
        empty_final = bool(request.parameters.get(EMPTY_FINAL, False))
        text, params = read_request(request)
        sampling, options = oip_sampling(params, ignore=TRANSPORT_PARAMS)
        if text is None and options.stream:
            raise InvalidInput("token streaming takes one prompt: a BYTES text_input (or input0) of one element")
        if text is None or not options.stream:
            # One answer: the runtime's plain infer, marked final as a decoupled model's last.
            response = await dp.infer(request)
            response.parameters = {**response.parameters, FINAL: not empty_final}
            yield pb.ModelStreamInferResponse(infer_response=encode_infer_response(response, raw=True))
        else:
            if not text:
                raise InvalidInput("text_input must not be empty")
            rid = msg.id

            def build(engine, defaults):
                return text, sampling.bind(engine.max_model_len, DEFAULT_MAX_TOKENS, defaults)

            gen = await Generation.start(dp, msg.model_name, msg.model_version or None, build,
                                         rid or request_id("grpc"), text_input=True)  # fmt: skip
            async for chunk in gen.chunks():
                last = chunk.finish_reason is not None
                if not chunk.text and not last:
                    continue
                yield _response(gen, rid, chunk.text, last and not empty_final, chunk.finish_reason)
        if empty_final:
            yield _response(_Named(msg), msg.id, None, True, None)
    except InferenceError as e:
        yield pb.ModelStreamInferResponse(error_message=redact(e.message))  # as every other path


class _Named:
    __slots__ = ("model_name", "model_version")

    def __init__(self, msg: pb.ModelInferRequest) -> None:
        self.model_name = msg.model_name
        self.model_version = msg.model_version
