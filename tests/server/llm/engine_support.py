"""What the engine tests share: an event loop on a background thread (as in the server),
one engine per module on the tiny random Llama, and Hugging Face's own greedy outputs."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from meshserve.server.llm.engine import TransformersEngine
from meshserve.server.llm.types import GenerationChunk, SamplingParams

PROMPTS = [
    "Where is Eiffel Tower?",
    "Hi",
    "The capital of France is Paris and the quick brown fox jumps",
    "0 1 2",
    "def add(a, b):",
    "Bonjour, ça va ?",
]


class Loop:
    """An event loop in a thread: ``run(coro)`` waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def make_engine(loop: Loop, folder, **parameters: Any) -> TransformersEngine:
    engine = TransformersEngine(folder, "tiny", parameters)
    loop.run(engine.start())
    return engine


def paced_engine(loop: Loop, folder, step_s: float = 0.004, **parameters: Any) -> TransformersEngine:
    """An engine whose core (on a thread) takes at least ``step_s`` per step: a test that acts
    while a sequence runs (closes, cancels, stops) then has hundreds of ms to act in, however
    busy the machine (a loaded machine only makes the steps slower), where the tiny model's
    fast forward makes 200 tokens in a few tens of ms."""
    engine = make_engine(loop, folder, engine_process=False, **parameters)
    core = engine.core.core
    real = core.step

    def step() -> tuple[Any, ...]:
        time.sleep(step_s)
        return real()

    core.step = step
    return engine


async def collect(engine, prompt, params: SamplingParams, delay: float = 0.0, rid: str = "r") -> dict[str, Any]:
    await asyncio.sleep(delay)
    chunks: list[GenerationChunk] = []
    started = time.perf_counter()
    async for chunk in engine.generate(prompt, params, rid):
        chunks.append(chunk)
    return {
        "tokens": [t for c in chunks for t in c.token_ids],
        "text": "".join(c.text for c in chunks),
        "chunks": chunks,
        "finish": chunks[-1].finish_reason,
        "first_at": started,
        "end_at": time.perf_counter(),
    }


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


async def wait_idle(engine, timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0:
            return s
        await asyncio.sleep(0.01)
    return engine.stats()


async def wait_running(engine, n: int, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while engine.stats()["running"] != n and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    return engine.stats()["running"]


# -- batching equivalence -------------------------------------------------------
