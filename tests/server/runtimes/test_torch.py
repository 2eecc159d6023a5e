"""The torch runtime on a tiny MLP saved as TorchScript, torch.export and a state dict."""

from __future__ import annotations

import numpy as np
import pytest
from meshserve.protocol.errors import InvalidInput, ModelLoadError

from tests.server.runtimes.conftest import infer, load, outputs, request

torch = pytest.importorskip("torch")
STATE_DICT = {"parameters": {"model_class": "tests.server.runtimes.torch_classes:TinyMLP"}}
X = np.random.default_rng(1).random((5, 4), dtype=np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    from tests.server.runtimes.tiny_models import tiny_mlp

    with torch.inference_mode():
        return tiny_mlp()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("form, settings", [("script", {}), ("export", {}), ("state_dict", STATE_DICT)])
def test_every_form_predicts_like_the_module(torch_dirs, form, settings):
    lm = load(torch_dirs[form], **settings)
    out = outputs(infer(lm, request(form, x=X)))
    assert list(out) == ["output0"]
    np.testing.assert_allclose(out["output0"], expected(X), rtol=1e-6, atol=1e-6)


def test_size_is_parameters_and_buffers(torch_dirs):
    module = torch.jit.load(str(torch_dirs["script"] / "model.pt"))
    want = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    for form, settings in [("script", {}), ("export", {}), ("state_dict", STATE_DICT)]:
        assert load(torch_dirs[form], **settings).size_bytes == want == (4 * 16 + 16 + 16 * 3 + 3 + 3) * 4


def test_export_signature_is_inferred_and_enforced(torch_dirs):
    lm = load(torch_dirs["export"])
    meta = lm.metadata
    assert meta.platform == "pytorch_export"
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [("output0", "FP32", [-1, 3])]
    with pytest.raises(InvalidInput, match=r"model 'export': input 'x' must be FP32, got FP64"):
        infer(lm, request("export", x=X.astype(np.float64)))
    with pytest.raises(InvalidInput, match=r"must have shape \[-1, 4\], got \[5, 3\]"):
        infer(lm, request("export", x=X[:, :3]))


def test_torchscript_checks_a_declared_signature(torch_dirs):
    lm = load(torch_dirs["script"], inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}])
    with pytest.raises(InvalidInput, match="must have shape"):
        infer(lm, request("script", x=np.ones((2, 5), np.float32)))
    with pytest.raises(InvalidInput, match="takes 1 input"):
        infer(load(torch_dirs["script"]), request("script", x=X, y=X))


def test_positional_inputs_and_dtype_parameter(torch_dirs):
    lm = load(torch_dirs["script"], parameters={"dtype": "float64", "threads": 1, "device": "cpu"})
    out = infer(lm, request("script", INPUT__0=X)).outputs[0]
    assert out.datatype == "FP64"
    np.testing.assert_allclose(out.data, expected(X), rtol=1e-5, atol=1e-6)
    assert lm.size_bytes == 134 * 8


@pytest.mark.parametrize(
    "form, settings, message",
    [
        ("state_dict", {}, "weights.pt is not a TorchScript program"),
        ("script", {"parameters": {"file": "missing.pt"}}, "'missing.pt' not found"),
        ("state_dict", {"parameters": {"model_class": "no_such_module:Net"}}, "cannot import module 'no_such_module'"),
        ("state_dict", {"parameters": {"model_class": "numpy:ndarray"}}, "is not a torch.nn.Module subclass"),
        ("state_dict", {"parameters": {**STATE_DICT["parameters"], "model_kwargs": {"hidden": 8}}}, "does not fit"),
        ("script", {"parameters": {"device": "cuda:7"}}, "not available"),
        ("export", {"parameters": {"format": "torchscript"}}, "model.pt2 is not a TorchScript program"),
        ("onnx", {"runtime": "torch"}, r"expected one model file \(.pt"),
    ],
)
def test_load_errors_say_what_is_wrong(torch_dirs, form, settings, message):
    with pytest.raises(ModelLoadError, match=message):
        load(torch_dirs[form], **settings)


def test_unload_drops_the_module(torch_dirs):
    lm = load(torch_dirs["export"])
    lm.model.unload()
    assert lm.model._module is None


def test_export_programs_load_concurrently(torch_dirs):
    """Startup preloads on several threads; torch.export.load alone is not thread-safe."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda i: load(torch_dirs["export"], name=f"e{i}"), range(8)))
    assert all(m.size_bytes == 134 * 4 for m in models)
