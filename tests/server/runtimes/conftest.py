"""Load a model folder the way the server does (settings file, runtime lookup, load,
LoadedModel) and call it in-process, for runtime tests that need no socket."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from meshserve.protocol.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from meshserve.server.loaded_model import LoadedModel
from meshserve.server.model_settings import parse_model_settings, read_settings_file
from meshserve.server.runtimes.registry import resolve_runtime

_executor = ThreadPoolExecutor(4)


def load(folder: Path, **settings: Any) -> LoadedModel:
    doc = {**(read_settings_file(folder) or {}), **settings}
    ms = parse_model_settings(doc, name=settings.get("name", folder.name))
    model = resolve_runtime(ms, folder)(ms, folder)
    model.load()
    return LoadedModel(model, model.size_bytes() or 0)


def request(model: str, outputs: list[str] | None = None, **inputs: np.ndarray) -> InferenceRequest:
    tensors = [Tensor.from_numpy(name, value) for name, value in inputs.items()]
    wanted = [RequestedOutput(o) for o in outputs] if outputs else None
    return InferenceRequest(model, tensors, outputs=wanted)


def infer(lm: LoadedModel, req: InferenceRequest) -> InferenceResponse:
    return asyncio.run(lm.infer(req, _executor))


def outputs(resp: InferenceResponse) -> dict[str, np.ndarray]:
    return {t.name: t.data for t in resp.outputs}
