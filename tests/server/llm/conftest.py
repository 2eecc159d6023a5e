"""Fixtures for the LLM tests: a tiny random Llama folder built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.server.llm.engine_support import Loop, make_engine

if TYPE_CHECKING:
    from meshserve.server.llm.engine import TransformersEngine


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    """A save_pretrained folder: random 2-layer Llama (head size 32) + byte-level BPE with a chat template."""
    pytest.importorskip("transformers")
    from tests.server.llm.tiny_llama import build

    return build(tmp_path_factory.mktemp("llm") / "tiny-llama")


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory: pytest.TempPathFactory):
    """The ~4 M parameter variant (benchmarks)."""
    pytest.importorskip("transformers")
    from tests.server.llm.tiny_llama import build

    return build(tmp_path_factory.mktemp("llm") / "small-llama", variant="small")


@pytest.fixture(scope="module")
def http(server):
    """A client of the module's own ``server`` fixture."""
    import httpx

    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


# The engine tests' loop, engine and reference outputs (tests/server/llm/engine_support.py).
@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def engine(loop: Loop, tiny_llama) -> Iterator[TransformersEngine]:
    eng = make_engine(loop, tiny_llama)
    yield eng
    loop.run(eng.stop())


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Unbatched greedy ``model.generate``: the ground truth for batching equivalence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    cache: dict[tuple[str, int], list[int]] = {}

    def generate(prompt: str, max_tokens: int) -> list[int]:
        if (prompt, max_tokens) not in cache:
            ids = tok(prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            cache[(prompt, max_tokens)] = out[0, ids.input_ids.shape[1] :].tolist()
        return cache[(prompt, max_tokens)]

    generate.tokenizer = tok  # type: ignore[attr-defined]
    return generate
