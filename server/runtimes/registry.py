"""Find the runtime class for a model: built-in name, entry point or import path."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from protocol.errors import ModelLoadError
from server.model_settings import ModelSettings
from server.runtimes.base import Model
from server.runtimes.python import import_object
from server.runtimes.sklearn import MODEL_SUFFIXES

BUILTIN = {
    "sklearn": "server.runtimes.sklearn:SKLearnModel",
}
ENTRY_POINT_GROUP = "meshserve.runtimes"


def infer_runtime(settings: ModelSettings, path: Path | None) -> str:
    """The runtime a model asks for, or the one its files imply."""
    if settings.runtime:
        return settings.runtime
    if settings.implementation:
        return "python"
    if path is not None and path.is_dir() and any(p.suffix in MODEL_SUFFIXES for p in path.iterdir()):
        return "sklearn"
    raise ModelLoadError(
        f"model {settings.name!r}: cannot tell its runtime; set 'runtime' (or 'implementation') in its settings"
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
