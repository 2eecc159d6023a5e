"""Model files in a model folder: find the one a runtime needs, and tell a runtime
from the files a folder holds, so a folder without settings still serves."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from meshserve.protocol.errors import ModelLoadError

SKLEARN_SUFFIXES = (".joblib", ".pkl", ".pickle")
TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".torchscript")
ONNX_SUFFIXES = (".onnx",)
XGBOOST_SUFFIXES = (".ubj", ".json", ".bst", ".model", ".xgb")
LIGHTGBM_SUFFIXES = (".txt", ".lgb", ".lgbm", ".bst", ".model")
TRANSFORMERS_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def find_model_file(
    path: Path, suffixes: Iterable[str], name: str | None = None, accept: Callable[[Path], bool] | None = None
) -> Path:
    """The one model file in ``path`` (or ``parameters.file``), with a message that says what to do."""
    suffixes = tuple(suffixes)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    if name:
        # parameters.file names a file of this folder: never an absolute path or one that leaves it.
        if (
            Path(name).is_absolute()
            or ".." in Path(name).parts
            or not (path / name).resolve().is_relative_to(path.resolve())
        ):
            raise ModelLoadError(f"parameters.file must name a file inside the model folder {path.name}")
        file = path / name
        if not file.is_file():
            raise ModelLoadError(f"model file {name!r} not found in {path.name}")
        return file
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes and (accept is None or accept(p)))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ModelLoadError(
            f"expected one model file ({', '.join(suffixes)}) in {path.name}, found {listed}; "
            "set parameters.file in the model settings"
        )
    return found[0]


def is_lightgbm_text(path: Path) -> bool:
    """LightGBM's text format opens with a ``tree`` line; nothing else we serve does."""
    try:
        with open(path, "rb") as f:
            return f.read(5) == b"tree\n"
    except OSError:
        return False


def is_xgboost_file(path: Path) -> bool:
    if path.suffix == ".ubj":
        return True
    if path.suffix == ".json":
        try:
            with open(path, "rb") as f:
                head = f.read(64)
            return head.lstrip().startswith(b"{") and b'"learner"' in head
        except OSError:
            return False
    return path.suffix in (".bst", ".model", ".xgb") and not is_lightgbm_text(path)


def _is_transformers_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file() or not any((path / m).is_file() for m in TRANSFORMERS_MARKERS):
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _is_causal_lm_dir(path: Path) -> bool:
    """A transformers folder whose architecture generates text (``...ForCausalLM``): the llm runtime's."""
    try:
        arch = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in arch)


def runtimes_for_dir(path: Path) -> list[str]:
    """Every built-in runtime whose files ``path`` holds (one means the choice is clear)."""
    if not path.is_dir():
        return []
    if _is_transformers_dir(path):
        return ["llm"] if _is_causal_lm_dir(path) else ["transformers"]
    found: set[str] = set()
    for p in path.iterdir():
        if not p.is_file():
            continue
        if p.suffix in SKLEARN_SUFFIXES:
            found.add("sklearn")
        elif p.suffix in TORCH_SUFFIXES:
            found.add("torch")
        elif p.suffix in ONNX_SUFFIXES:
            found.add("onnx")
        elif is_lightgbm_text(p):
            found.add("lightgbm")
        elif is_xgboost_file(p):
            found.add("xgboost")
    return sorted(found)
