"""The ONNX runtime on a file exported from the tiny torch MLP."""

from __future__ import annotations

import numpy as np
import pytest
from meshserve.protocol.errors import InvalidInput, ModelLoadError

from tests.server.runtimes.conftest import infer, load, outputs, request

ort = pytest.importorskip("onnxruntime")
X = np.random.default_rng(2).random((6, 4), dtype=np.float32)


def test_predicts_like_torch(torch_dirs):
    import torch

    module = torch.jit.load(str(torch_dirs["script"] / "model.pt"))
    with torch.inference_mode():
        want = module(torch.from_numpy(X)).numpy()
    out = outputs(infer(load(torch_dirs["onnx"]), request("onnx", x=X)))
    np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-6)


def test_signature_comes_from_the_session(torch_dirs):
    lm = load(torch_dirs["onnx"])
    assert lm.metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.shape) for t in lm.metadata.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, t.shape) for t in lm.metadata.outputs] == [("logits", "FP32", [-1, 3])]
    assert lm.size_bytes >= (torch_dirs["onnx"] / "model.onnx").stat().st_size
    with pytest.raises(InvalidInput, match="model 'onnx': input 'x' must be FP32, got INT64"):
        infer(lm, request("onnx", x=np.ones((2, 4), np.int64)))
    with pytest.raises(InvalidInput, match=r"shape \[-1, 4\], got \[2, 2\]"):
        infer(lm, request("onnx", x=np.ones((2, 2), np.float32)))
    with pytest.raises(InvalidInput, match="has no input 'y'"):
        infer(lm, request("onnx", y=X))
    with pytest.raises(InvalidInput, match="has no output 'nope'"):
        infer(lm, request("onnx", ["nope"], x=X))


def test_session_options(torch_dirs):
    options = {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1}
    options |= {"graph_optimization_level": "basic", "enable_cpu_mem_arena": False}
    lm = load(torch_dirs["onnx"], parameters=options)
    assert outputs(infer(lm, request("onnx", x=X)))["logits"].shape == (6, 3)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"parameters": {"providers": ["TensorrtExecutionProvider"]}}, "TensorrtExecutionProvider not available"),
        ({"parameters": {"graph_optimization_level": "max"}}, "unknown graph_optimization_level"),
    ],
)
def test_bad_options(torch_dirs, settings, message):
    with pytest.raises(ModelLoadError, match=message):
        load(torch_dirs["onnx"], **settings)


def test_a_file_that_is_not_onnx(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="model.onnx is not an ONNX model"):
        load(tmp_path)
