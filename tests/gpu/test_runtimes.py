"""The torch and ONNX runtimes and the transformers engine on a CUDA GPU: the same answers
as on the CPU, and an unload that gives the GPU memory back (skipped without CUDA)."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from tests.gpu.conftest import GREEDY_TOKENS, PROMPTS
from tests.server.runtimes.conftest import infer, load, outputs, request

STATE_DICT = {"model_class": "tests.server.runtimes.torch_classes:TinyMLP"}
FORMS = [("script", {}), ("export", {}), ("state_dict", STATE_DICT)]
X = np.random.default_rng(7).random((64, 4), dtype=np.float32)


def allocated() -> int:
    import torch

    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


@pytest.mark.parametrize("form, params", FORMS)
def test_torch_on_cuda_equals_cpu_and_unload_frees(torch_dirs, form, params):
    cpu = load(torch_dirs[form], parameters={**params, "device": "cpu"})
    want = outputs(infer(cpu, request(form, x=X)))["output0"]

    def cycle() -> None:
        gpu = load(torch_dirs[form], parameters={**params, "device": "cuda:0"})
        assert gpu.model._device.type == "cuda"
        assert allocated() > before, "the weights should be on the GPU"
        assert gpu.size_bytes == cpu.size_bytes
        got = outputs(infer(gpu, request(form, x=X)))["output0"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 both: only the summation order differs
        gpu.model.unload()

    # The first cycle also makes what CUDA keeps per process (cuBLAS handles and their
    # workspaces, from the same caching allocator): the second must end where it began.
    before = allocated()
    cycle()
    before = allocated()
    cycle()
    assert allocated() == before


def test_torch_auto_device_is_the_gpu_and_half_precision_is_close(torch_dirs):
    cpu = load(torch_dirs["script"], parameters={"device": "cpu"})
    want = outputs(infer(cpu, request("script", x=X)))["output0"]
    auto = load(torch_dirs["script"])
    assert str(auto.model._device) == "cuda:0"
    half = load(torch_dirs["script"], parameters={"dtype": "float16", "device": "cuda"})
    got = outputs(infer(half, request("script", x=X)))["output0"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2)
    bf16 = load(torch_dirs["script"], parameters={"dtype": "bfloat16", "device": "cuda"})
    got = outputs(infer(bf16, request("script", x=X)))["output0"]
    assert got.dtype == np.float32  # bfloat16 has no OIP datatype: sent as FP32
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)
    for lm in (auto, half, bf16):
        lm.model.unload()


def test_onnx_on_the_cuda_provider_equals_cpu(torch_dirs):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)")
    cpu = load(torch_dirs["onnx"], parameters={"providers": ["CPUExecutionProvider"]})
    want = outputs(infer(cpu, request("onnx", x=X)))["logits"]
    gpu = load(torch_dirs["onnx"])  # default providers: CUDA first when this onnxruntime has it
    # ONNX Runtime falls back to the CPU, with only a warning, when the CUDA libraries do not load.
    assert gpu.model._session.get_providers()[0] == "CUDAExecutionProvider", gpu.model._session.get_providers()
    got = outputs(infer(gpu, request("onnx", x=X)))["logits"]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # the CUDA provider's default use_tf32
    gpu.model.unload()


def _run_engine(folder, parameters: dict, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Start meshserve's transformers engine, generate greedily for every prompt at once
    (one continuous batch), stop it."""
    from meshserve.server.llm.engine import TransformersEngine
    from meshserve.server.llm.types import SamplingParams

    async def go():
        engine = TransformersEngine(folder, "smollm2", parameters)
        await engine.start()
        try:
            assert engine.device.type == "cuda"
            params = SamplingParams(max_tokens=max_tokens, temperature=0)

            async def one(i: int, prompt: str):
                chunks = [c async for c in engine.generate(prompt, params, f"r{i}")]
                return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)

            return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        finally:
            await engine.stop()

    results = asyncio.run(go())
    return [r[0] for r in results], [r[1] for r in results]


def test_transformers_engine_on_cuda_greedy_equals_cpu_generate_and_frees(smollm2, hf_greedy):
    # The core on a thread of this process, so this process's CUDA allocator shows what it frees.
    settings = {"device": "cuda", "dtype": "float32", "max_model_len": 512, "engine_process": False}
    _run_engine(smollm2, settings, PROMPTS[:1], 2)  # warms what CUDA keeps per process (see above)
    before = allocated()
    tokens, texts = _run_engine(smollm2, settings, PROMPTS, GREEDY_TOKENS)
    for prompt, got, text in zip(PROMPTS, tokens, texts, strict=True):
        assert got == hf_greedy[prompt]["tokens"], (prompt, got, hf_greedy[prompt]["tokens"])
        assert text == hf_greedy[prompt]["text"]
    assert allocated() == before, "the engine's weights and KV cache must leave the GPU on stop"


def test_transformers_engine_core_process_on_cuda_equals_cpu_generate(smollm2, hf_greedy):
    """The default: the core in a child process of its own, CUDA initialised there."""
    settings = {"device": "cuda", "dtype": "float32", "max_model_len": 512}
    tokens, texts = _run_engine(smollm2, settings, PROMPTS, GREEDY_TOKENS)
    for prompt, got, text in zip(PROMPTS, tokens, texts, strict=True):
        assert got == hf_greedy[prompt]["tokens"], (prompt, got, hf_greedy[prompt]["tokens"])
        assert text == hf_greedy[prompt]["text"]


def test_transformers_engine_bfloat16_on_auto_device(smollm2):
    _, texts = _run_engine(smollm2, {"dtype": "bfloat16"}, ["The capital of France is"], 4)
    assert "Paris" in texts[0]
