"""Memory is measured, not guessed: a model of a few hundred MB reports its size,
is resident while loaded, and after unload and gc the process returns to within
10% of where it was before the load. Each measurement runs in its own process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.server import REPO

torch = pytest.importorskip("torch")
WIDTH, LAYERS = 4096, 3  # 3 x 4096 x 4096 FP32: 201 MB of weights
MB = 1 << 20


@pytest.fixture(scope="module")
def big_model_dirs(tmp_path_factory, torch_dirs):
    base = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    with torch.no_grad():
        layers = [torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]
    big = torch.nn.Sequential(*layers).eval()
    weights = sum(p.numel() * p.element_size() for p in big.parameters())
    (base / "torch").mkdir()
    torch.jit.script(big).save(str(base / "torch" / "model.pt"))
    (base / "onnx").mkdir()
    torch.onnx.export(big, (torch.ones(1, WIDTH),), str(base / "onnx" / "model.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)  # fmt: skip
    del big, layers
    return base, weights


def probe(tiny, big) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.server.runtimes.memory_probe", str(tiny), str(big), str(WIDTH)],
        capture_output=True, text=True, cwd=REPO, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(big.name, {k: f"{v / MB:.0f} MB" for k, v in figures.items()})
    return figures


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_size_is_real_and_unload_frees(big_model_dirs, torch_dirs, runtime):
    base, weights = big_model_dirs
    tiny = torch_dirs["script" if runtime == "torch" else "onnx"]
    m = probe(tiny, base / runtime)
    if runtime == "torch":
        assert m["size_bytes"] == weights  # parameters and buffers, exactly
    else:
        assert weights * 0.95 <= m["size_bytes"] <= weights * 2.5  # measured: weights, pre-packing, arena
    assert m["loaded"] - m["before"] >= weights * 0.9, "the weights should be resident while loaded"
    assert abs(m["after"] - m["before"]) <= 0.10 * m["before"], "RSS must return within 10% of the pre-load level"
    assert m["after"] - m["before"] <= 0.10 * weights, "unload should give back (nearly) all the model's memory"
