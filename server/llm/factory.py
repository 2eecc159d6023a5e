"""Pick and build the engine for a model folder: ``parameters.engine`` is
``transformers``, ``vllm`` or ``auto`` (vLLM when it is importable and a GPU is
present, else the embedded transformers engine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from meshserve.protocol.errors import ModelLoadError
from meshserve.server.llm.types import LLMEngine

ENGINES = ("auto", "transformers", "vllm")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def gpu_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_engine(parameters: dict[str, Any] | None) -> str:
    wanted = str((parameters or {}).get("engine", "auto")).lower()
    if wanted not in ENGINES:
        raise ModelLoadError(f"unknown engine {wanted!r}; expected one of {', '.join(ENGINES)}")
    if wanted == "auto":
        return "vllm" if vllm_available() and gpu_present() else "transformers"
    if wanted == "vllm" and not vllm_available():
        raise ModelLoadError("engine 'vllm' requested but vllm is not installed (pip install 'meshserve[vllm]')")
    return wanted


def create_engine(path: str | Path, name: str, parameters: dict[str, Any] | None = None) -> LLMEngine:
    """An engine for the model folder ``path`` (not started: ``await engine.start()`` loads and runs it)."""
    kind = choose_engine(parameters)
    if kind == "vllm":
        from meshserve.server.llm.vllm_engine import VLLMEngine

        return VLLMEngine(path, name, parameters)
    from meshserve.server.llm.engine import TransformersEngine

    return TransformersEngine(path, name, parameters)
