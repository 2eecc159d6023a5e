"""The runtime a folder's files imply, and the message when they do not decide it."""

from __future__ import annotations

import pytest
from meshserve.protocol.errors import ModelLoadError
from meshserve.server.model_settings import ModelSettings
from meshserve.server.runtimes.registry import BUILTIN, infer_runtime, resolve_runtime


def _touch(folder, *names: str, text: bytes = b"x"):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(text)
    return folder


@pytest.mark.parametrize(
    "files, text, runtime",
    [
        (["model.pt2"], b"x", "torch"),
        (["model.pt"], b"x", "torch"),
        (["model.onnx"], b"x", "onnx"),
        (["model.ubj"], b"x", "xgboost"),
        (["model.json"], b'{"learner": {}}', "xgboost"),
        (["model.bst"], b"binf", "xgboost"),
        (["model.txt"], b"tree\nversion=v4\n", "lightgbm"),
        (["model.bst"], b"tree\nversion=v4\n", "lightgbm"),
        (["model.joblib"], b"x", "sklearn"),
    ],
)
def test_runtime_from_files(tmp_path, files, text, runtime):
    folder = _touch(tmp_path / "m", *files, text=text)
    assert infer_runtime(ModelSettings(name="m"), folder) == runtime
    assert resolve_runtime(ModelSettings(name="m"), folder).__module__ == BUILTIN[runtime].split(":")[0]


def test_transformers_folder(tmp_path):
    folder = _touch(tmp_path / "m", "tokenizer.json", "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "bert"}')
    assert infer_runtime(ModelSettings(name="m"), folder) == "transformers"


def test_ambiguous_and_unknown_folders(tmp_path):
    both = _touch(tmp_path / "both", "model.pt", "model.onnx")
    with pytest.raises(ModelLoadError, match=r"model 'm': cannot tell its runtime \(.*files of onnx, torch"):
        infer_runtime(ModelSettings(name="m"), both)
    other = _touch(tmp_path / "other", "README.md", "notes.txt")
    with pytest.raises(ModelLoadError, match="no model file it knows"):
        infer_runtime(ModelSettings(name="m"), other)
    assert infer_runtime(ModelSettings(name="m", runtime="onnx"), both) == "onnx"
