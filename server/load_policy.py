"""What a repository load over the API may name: the one gate between a client's
``POST /v2/repository/models/{m}/load`` (or gRPC ``RepositoryModelLoad``) and anything
that resolves a path or imports code.

The threat model (docs/operations/security.md): the operator trusts what they put in
``--model-dir``; a client trusts nothing and is trusted with nothing. So by default
(``--repository-uris model-dir``) a load may only point at folders inside the model
directory, every path-like field is checked on its resolved real path, and fields that
name code (an importable module, a file outside the model's folder, remote code flags)
are refused. ``--repository-uris any`` and ``--repository-code`` widen this for an
authenticated operator; the server refuses to start with either and no auth token.

Refusals are ``Forbidden`` (403 / PERMISSION_DENIED) and never say whether a path
exists: the check runs on the path's text and its resolved location, before any read.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from meshserve.protocol.errors import Forbidden, InvalidInput
from meshserve.server.runtimes.registry import BUILTIN, ENTRY_POINT_GROUP
from meshserve.server.settings import Settings

# Parameters some runtime reads as a file inside the model's folder.
FILE_PARAMETERS = ("file",)
# Parameters that make a runtime run code shipped beside the weights (vLLM/transformers).
CODE_PARAMETERS = ("trust_remote_code", "vllm_args")
_ALLOW_CODE = "start the server with --repository-code (which needs an auth token) to allow it"


def check_load_config(config: dict[str, Any] | None, settings: Settings, current_uri: str | None = None) -> None:
    """Refuse a load config that reaches outside what this server allows.

    ``current_uri`` is the registered model's uri, used when the config keeps it."""
    if not config:
        return
    uri = config.get("uri")
    if uri is not None and not isinstance(uri, str):
        raise InvalidInput("'uri' must be a string")
    folder = check_uri(uri, settings) if uri is not None else _local_folder(current_uri)
    if not settings.repository_code:
        _check_code(config, folder)
    _check_file_parameters(config.get("parameters"), folder)


def check_uri(uri: str, settings: Settings) -> Path | None:
    """The model's local folder (resolved) when the uri is local, None for a remote one."""
    mode = settings.repository_uris
    if mode == "none":
        raise Forbidden("loading a model from a uri through the repository API is disabled on this server "
                        "(--repository-uris none); only models already registered can be (re)loaded")  # fmt: skip
    parsed = urlparse(uri)
    local = parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/"))
    if not local:
        if mode == "any":
            return None
        raise Forbidden("this server loads models through the repository API only from inside its model "
                        "directory (--repository-uris model-dir); --repository-uris any, with an auth token, "
                        "allows remote uris")  # fmt: skip
    text = unquote(parsed.path) if parsed.scheme == "file" else uri
    if "\x00" in text:
        raise InvalidInput("'uri' must not contain NUL bytes")
    base = settings.model_dir
    path = Path(text)
    if not path.is_absolute():
        if base is None:
            raise Forbidden("a relative uri needs a model directory (--model-dir)")
        path = Path(base) / path
    resolved = path.resolve()
    if mode == "model-dir" and (base is None or not resolved.is_relative_to(Path(base).resolve())):
        raise Forbidden("the model uri must name a folder inside the model directory (--model-dir); "
                        "--repository-uris any, with an auth token, allows other paths")  # fmt: skip
    return resolved


def _local_folder(uri: str | None) -> Path | None:
    """The registered model's folder: trusted (it came from the operator), only resolved."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    return Path(uri).resolve() if parsed.scheme == "" else None


def _check_code(config: dict[str, Any], folder: Path | None) -> None:
    implementation = config.get("implementation")
    if implementation is not None:
        if not isinstance(implementation, str):
            raise InvalidInput("'implementation' must be a string")
        module, sep, _ = implementation.partition(":")
        if not sep:
            module = implementation.rpartition(".")[0]
        if not module.endswith(".py"):
            raise Forbidden(
                "'implementation' names an importable module; over the "
                f"repository API only a .py file inside the model's folder may be named: {_ALLOW_CODE}"
            )
        _inside(module, folder, "implementation", _ALLOW_CODE)
    runtime = config.get("runtime")
    if runtime is not None:
        if not isinstance(runtime, str):
            raise InvalidInput("'runtime' must be a string")
        if runtime not in BUILTIN and runtime != "python" and not entry_points(group=ENTRY_POINT_GROUP, name=runtime):
            if ":" in runtime or "." in runtime or "/" in runtime or "\\" in runtime:
                raise Forbidden(
                    "'runtime' names code by import path or file; over the "
                    f"repository API only built-in and installed runtimes may be named: {_ALLOW_CODE}"
                )
    params = config.get("parameters")
    if isinstance(params, dict):
        for key in CODE_PARAMETERS:
            if params.get(key):
                raise Forbidden(f"parameters.{key} runs code shipped with the model; {_ALLOW_CODE}")


def _check_file_parameters(params: Any, folder: Path | None) -> None:
    if not isinstance(params, dict):
        return
    for key in FILE_PARAMETERS:
        value = params.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"parameters.{key} must be a string")
        _inside(value, folder, f"parameters.{key}", "copy the file into the model's folder")


def _inside(name: str, folder: Path | None, field: str, allow: str) -> None:
    """A relative path with no '..' that, resolved, stays inside the model's folder."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name or "\x00" in name or pure.is_absolute() or ".." in pure.parts or Path(name).is_absolute():
        raise Forbidden(f"{field} must be a path inside the model's folder (relative, without '..'); {allow}")
    if folder is None:  # remote (checked again in the fetched folder), or no uri yet (the load says so)
        return
    if not (folder / name).resolve().is_relative_to(folder):
        raise Forbidden(f"{field} must be a path inside the model's folder (it resolves outside it); {allow}")
