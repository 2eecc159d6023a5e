"""Find the runtime class for a model: built-in name, entry point or import path."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from meshserve.protocol.errors import ModelLoadError
from meshserve.server.model_settings import ModelSettings
from meshserve.server.runtimes.base import Model
from meshserve.server.runtimes.files import runtimes_for_dir
from meshserve.server.runtimes.python import import_object

BUILTIN = {
    "sklearn": "meshserve.server.runtimes.sklearn:SKLearnModel",
    "torch": "meshserve.server.runtimes.torch:TorchModel",
    "onnx": "meshserve.server.runtimes.onnx:OnnxModel",
    "xgboost": "meshserve.server.runtimes.xgboost:XGBoostModel",
    "lightgbm": "meshserve.server.runtimes.lightgbm:LightGBMModel",
    "transformers": "meshserve.server.runtimes.transformers:TransformersModel",
    "llm": "meshserve.server.runtimes.llm:LLMModel",
}
ENTRY_POINT_GROUP = "meshserve.runtimes"


def infer_runtime(settings: ModelSettings, path: Path | None) -> str:
    """The runtime a model asks for, or the one its files imply."""
    if settings.runtime:
        return settings.runtime
    if settings.implementation:
        return "python"
    found = runtimes_for_dir(path) if path is not None else []
    if len(found) == 1:
        return found[0]
    why = f"its folder holds files of {', '.join(found)}" if found else "no model file it knows"
    raise ModelLoadError(
        f"model {settings.name!r}: cannot tell its runtime ({why}); set 'runtime' (or 'implementation') in its settings"
    )


def resolve_runtime(settings: ModelSettings, path: Path | None) -> type[Model]:
    runtime = infer_runtime(settings, path)
    if runtime == "python":
        if not settings.implementation:
            raise ModelLoadError(f"model {settings.name!r}: the python runtime needs 'implementation'")
        target = import_object(settings.implementation, path if path and path.is_dir() else None)
    elif runtime in BUILTIN:
        target = import_object(BUILTIN[runtime])
    else:
        eps = entry_points(group=ENTRY_POINT_GROUP, name=runtime)
        if eps:
            try:
                target = next(iter(eps)).load()
            except Exception as e:
                raise ModelLoadError(f"runtime entry point {runtime!r} failed to load: {e}") from e
        elif ":" in runtime or "." in runtime:
            target = import_object(runtime, path if path and path.is_dir() else None)
        else:
            known = ", ".join(["python", *BUILTIN])
            raise ModelLoadError(f"model {settings.name!r}: unknown runtime {runtime!r} (built in: {known})")
    if not (isinstance(target, type) and issubclass(target, Model)):
        raise ModelLoadError(f"model {settings.name!r}: {runtime!r} is not a subclass of meshserve.Model")
    return target
