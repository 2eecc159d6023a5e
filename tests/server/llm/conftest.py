"""Fixtures for the LLM tests: a tiny random Llama folder built once per session."""

from __future__ import annotations

import pytest


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
