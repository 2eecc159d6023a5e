"""``data_parallel_size``: several engine cores, each a process with its own copy of the model.
Requests spread over them and keep transformers' greedy tokens, aborts reach the replica that
holds the request, the counters add up, one replica's death restarts them all, and bad
values fail the load."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from meshserve.protocol.errors import ModelLoadError, ModelNotReady
from meshserve.server.llm.core import cpu_count
from meshserve.server.llm.engine import TransformersEngine
from meshserve.server.llm.types import SamplingParams

from tests.server.llm.engine_support import PROMPTS, collect, greedy, make_engine
from tests.server.llm.test_engine_process import alive, wait_gone


@pytest.fixture(scope="module")
def engine(loop, tiny_llama):
    eng = make_engine(loop, tiny_llama, data_parallel_size=2)
    yield eng
    loop.run(eng.stop())


def test_requests_spread_over_two_processes_and_keep_hf_greedy_tokens(loop, engine, reference):
    pids = engine.core.pids
    assert len(pids) == 2 and len(set(pids)) == 2 and all(alive(p) for p in pids) and os.getpid() not in pids
    served = {0: 0, 1: 0}
    real_send = engine.core.cores[0].send, engine.core.cores[1].send

    def counting(i):
        def send(msg):
            if msg[0] == "add":
                served[i] += 1
            real_send[i](msg)

        return send

    engine.core.cores[0].send, engine.core.cores[1].send = counting(0), counting(1)
    try:
        results = loop.run(run_all(engine))
    finally:
        engine.core.cores[0].send, engine.core.cores[1].send = real_send
    assert served[0] >= 2 and served[1] >= 2 and served[0] + served[1] == len(PROMPTS)
    for prompt, res in zip(PROMPTS, results, strict=True):
        assert res["tokens"] == reference(prompt, 10), prompt
        assert res["finish"] == "length"
    assert engine.core._load == [0, 0] and not engine.core._where
    stats = engine.stats()
    assert stats["generation_tokens"] >= 10 * len(PROMPTS) and stats["running"] == 0 and stats["waiting"] == 0
    assert engine.size_bytes() == sum(c.size_bytes() for c in engine.core.cores) > 0


async def run_all(engine) -> list[dict]:
    return await asyncio.gather(*(collect(engine, p, greedy(10), rid=f"r{i}") for i, p in enumerate(PROMPTS)))


def test_an_abort_frees_its_replica(loop, engine):
    async def abandon():
        stream = engine.generate("Hi", greedy(200), "gone")
        await stream.__anext__()
        await stream.aclose()  # the client went away

    loop.run(abandon())
    assert engine.core._load == [0, 0] and not engine.core._where
    # a stop string ends a request in the front: the replica is told, and the slot freed
    res = loop.run(collect(engine, "0 1 2", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, stop=[" "])))
    assert res["finish"] == "stop"
    deadline = time.monotonic() + 5
    while engine.core._where and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.core._load == [0, 0] and not engine.core._where


def test_one_replica_killed_restarts_them_all(loop, tiny_llama, reference):
    eng = make_engine(loop, tiny_llama, data_parallel_size=2, fast_forward=False)  # slower: still running at the kill
    old = list(eng.core.pids)
    try:

        async def kill_one():
            streams = [eng.generate(p, greedy(240, ignore_eos=True), f"k{i}") for i, p in enumerate(PROMPTS[:2])]
            for s in streams:
                await s.__anext__()
            os.kill(old[1], signal.SIGKILL)
            for s in streams:
                with pytest.raises(ModelNotReady, match="engine process died"):
                    async for _ in s:
                        pass

        loop.run(kill_one())
        deadline = time.monotonic() + 90
        while (eng.core is None or eng._unavailable) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert eng.core is not None and not eng._unavailable, eng._unavailable
        assert wait_gone(old[0], 15), "the surviving replica was not stopped"
        new = eng.core.pids
        assert len(new) == 2 and not set(new) & set(old) and all(alive(p) for p in new)
        res = loop.run(collect(eng, PROMPTS[0], greedy(10)))
        assert res["tokens"] == reference(PROMPTS[0], 10)
    finally:
        loop.run(eng.stop())
    assert all(wait_gone(p, 10) for p in new)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"data_parallel_size": 2, "engine_process": False}, "needs engine_process: true"),
        ({"data_parallel_size": 0}, ">= 1"),
        ({"data_parallel_size": "two"}, "must be an integer"),
        ({"data_parallel_size": 10_000}, "more than this machine's"),
    ],
)
def test_bad_values_fail_the_load(tiny_llama, parameters, message):
    with pytest.raises(ModelLoadError, match=message):
        TransformersEngine(tiny_llama, "tiny", parameters)


def test_threads_are_shared_among_replicas():
    from meshserve.server.llm.core import core_threads

    assert core_threads(None, 2) == max(1, (cpu_count() - 1) // 2)
    assert core_threads(3, 2) == 3  # an explicit setting is each replica's


def test_the_load_reserves_room_for_every_copy(tmp_path):
    """Placement's prediction counts each replica's weights, so a load that cannot fit its
    copies is refused before any process starts (a client's config cannot multiply memory)."""
    from concurrent.futures import ThreadPoolExecutor

    from meshserve.server.model_settings import ModelSettings
    from meshserve.server.repository import ModelRepository
    from meshserve.server.settings import Settings

    settings = Settings(model_dir=tmp_path, default_model_bytes=1000, model_overhead_bytes=7)
    with ThreadPoolExecutor(1) as pool:
        repo = ModelRepository(settings, pool, pool)
        size = {
            str(p): repo.predicted_size(ModelSettings(name="m", runtime="llm", parameters=p))
            for p in ({}, {"data_parallel_size": 3}, {"data_parallel_size": "2"}, {"data_parallel_size": "x"})
        }
    assert list(size.values()) == [1007, 3007, 2007, 1007]
