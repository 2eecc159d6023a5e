"""The continuous-batching transformers engine on the tiny random Llama.

One engine per module runs on an event loop in a background thread, as in the server;
each test submits coroutines to it. Its core runs in a child process (the default), except
where a test reaches into the core and asks for it on a thread (``engine_process=False``).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from meshserve.protocol.errors import CapacityExhausted, InvalidInput
from meshserve.server.llm.types import SamplingParams

from tests.server.llm.engine_support import (
    PROMPTS,
    collect,
    greedy,
    make_engine,
    paced_engine,
    wait_idle,
    wait_running,
)


@pytest.fixture(scope="module")
def hf_engine(loop, tiny_llama):
    """The engine on transformers' own forward (``fast_forward: false``)."""
    eng = make_engine(loop, tiny_llama, fast_forward=False)
    yield eng
    loop.run(eng.stop())


@pytest.fixture(scope="module")
def paced(loop, tiny_llama):
    """The engine with its core on a thread, each step at least 4 ms: for the tests that act
    while a sequence is running (see ``paced_engine``)."""
    eng = paced_engine(loop, tiny_llama)
    yield eng
    loop.run(eng.stop())


@pytest.mark.parametrize("forward", ["fast", "transformers"])
def test_greedy_under_continuous_batching_equals_unbatched_generate(forward, engine, hf_engine, loop, reference):
    engine = engine if forward == "fast" else hf_engine
    assert engine.forward == forward
    # The long one starts with two others; the rest arrive as it reaches 2, 4 and 6 tokens
    # (arrivals tied to its progress, not to the clock, so they overlap on any machine).
    plan = [(PROMPTS[2], 40, 0), (PROMPTS[0], 24, 0), (PROMPTS[1], 9, 0), (PROMPTS[3], 17, 2),
            (PROMPTS[4], 31, 4), (PROMPTS[5], 5, 6)]  # fmt: skip
    peak = [0]

    async def go():
        reached = {k: asyncio.Event() for _, _, k in plan}

        async def long_one():
            chunks, n = [], 0
            async for chunk in engine.generate(plan[0][0], greedy(plan[0][1]), "long"):
                chunks.append(chunk)
                n += len(chunk.token_ids)
                peak[0] = max(peak[0], engine.stats()["running"])
                for k, ev in reached.items():
                    if n >= k:
                        ev.set()
            for ev in reached.values():
                ev.set()
            return {"tokens": [t for c in chunks for t in c.token_ids], "finish": chunks[-1].finish_reason}

        async def later(i: int):
            prompt, n, k = plan[i]
            await reached[k].wait()
            return await collect(engine, prompt, greedy(n), 0, f"r{i}")

        return await asyncio.gather(long_one(), *[later(i) for i in range(1, len(plan))])

    steps_before = engine.stats()["steps"]
    results = loop.run(go())
    steps = engine.stats()["steps"] - steps_before
    for (prompt, n, _), res in zip(plan, results, strict=True):
        assert res["tokens"] == reference(prompt, n), prompt
        assert res["finish"] in ("length", "stop")
    # Batched: sequences shared steps (one at a time would take a step per token).
    assert peak[0] >= 3
    assert steps < sum(len(r["tokens"]) for r in results)
    assert loop.run(wait_idle(engine))["running"] == 0


def test_sequences_join_and_leave_mid_run(paced, loop, reference):
    async def go():
        long = asyncio.ensure_future(collect(paced, PROMPTS[2], greedy(120, ignore_eos=True), 0, "long"))
        seen_running = await wait_running(paced, 1)
        short = await collect(paced, PROMPTS[0], greedy(3, ignore_eos=True), 0, "short")
        short_done = time.perf_counter()
        running_after_short = paced.stats()["running"]
        res = await long
        return res, short, short_done, seen_running, running_after_short

    long, short, short_done, seen_running, running_after_short = loop.run(go())
    assert seen_running == 1
    assert short_done < long["end_at"]  # joined the running batch, left it before the long one ended
    assert running_after_short == 1  # ...and only the short one left
    assert len(short["tokens"]) == 3 and short["finish"] == "length"
    assert len(long["tokens"]) == 120
    assert short["tokens"] == reference(PROMPTS[0], 3)


# -- cancellation -----------------------------------------------------------------
def test_closing_the_stream_drops_the_sequence_at_once(paced, loop, reference):
    async def go():
        other = asyncio.ensure_future(collect(paced, PROMPTS[1], greedy(40), 0, "other"))
        stream = paced.generate(PROMPTS[0], greedy(200, ignore_eos=True), "closed")
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        running = paced.stats()["running"]  # at once, not after the next step
        res = await other
        return got, running, res, await wait_idle(paced)

    before = paced.stats()["requests_aborted"]
    got, running, other, idle = loop.run(go())
    assert len(got) == 3
    assert running <= 1  # only "other" can still be running
    assert other["tokens"] == reference(PROMPTS[1], 40)  # the others never notice
    assert idle["running"] == 0 and idle["waiting"] == 0
    assert idle["requests_aborted"] == before + 1


def test_cancelling_the_consumer_task_leaves_no_sequence(paced, loop):
    async def go():
        tasks = [
            asyncio.ensure_future(collect(paced, p, greedy(200, ignore_eos=True), 0, f"c{i}"))
            for i, p in enumerate(PROMPTS)
        ]
        peak = await wait_running(paced, len(PROMPTS))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peak, await wait_idle(paced, 2.0)

    peak, idle = loop.run(go())
    assert peak == len(PROMPTS)
    assert idle["running"] == 0 and idle["waiting"] == 0
    assert paced._seqs == {}


def test_a_stream_never_iterated_is_dropped_when_closed(engine, loop):
    async def go():
        stream = engine.generate(PROMPTS[0], greedy(50), "never")
        await stream.aclose()
        return await wait_idle(engine)

    assert loop.run(go())["waiting"] == 0


# -- capacity ---------------------------------------------------------------------
def test_full_queue_is_capacity_exhausted_and_others_finish(loop, tiny_llama):
    small = make_engine(loop, tiny_llama, max_num_seqs=2, max_waiting=1)

    async def go():
        streams = [small.generate(PROMPTS[i], greedy(8, ignore_eos=True), f"q{i}") for i in range(3)]
        with pytest.raises(CapacityExhausted, match="capacity"):
            small.generate(PROMPTS[3], greedy(8), "q3")
        results = []
        for s in streams:
            results.append([c async for c in s])
        after = [c async for c in small.generate(PROMPTS[3], greedy(8, ignore_eos=True), "q4")]
        return results, after

    try:
        results, after = loop.run(go())
    finally:
        loop.run(small.stop())
    assert [sum(len(c.token_ids) for c in r) for r in results] == [8, 8, 8]
    assert sum(len(c.token_ids) for c in after) == 8  # room again once the queue drained
    assert small.stats()["requests_rejected"] == 1


# -- stop conditions ---------------------------------------------------------------
def test_stop_string_spanning_tokens_cuts_the_text(engine, loop, reference):
    tok = reference.tokenizer
    ref_ids = reference(PROMPTS[3], 30)
    full = tok.decode(ref_ids, skip_special_tokens=True)
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode(ref_ids[: i + 1], skip_special_tokens=True) for i in range(len(ref_ids))]
    start = len(pieces[3]) - 1
    stop = full[start : start + 4]
    assert len(stop) == 4 and stop not in full[:start]
    res = loop.run(collect(engine, PROMPTS[3], greedy(30, stop=[stop, "never-there"])))
    assert res["finish"] == "stop"
    assert res["text"] == full[: full.index(stop)]
    assert stop not in res["text"]


def test_eos_stops_unless_ignored(engine, loop, reference):
    eos = reference.tokenizer.eos_token_id
    # Ask for a continuation that ends in EOS by feeding the token ids: prompt + reference, find one with EOS.
    res = loop.run(collect(engine, PROMPTS[0], greedy(20, ignore_eos=True)))
    assert len(res["tokens"]) == 20 and res["finish"] == "length"
    for prompt in PROMPTS:
        ids = reference(prompt, 60)
        if eos in ids:
            got = loop.run(collect(engine, prompt, greedy(60)))
            assert got["tokens"] == ids[: ids.index(eos) + 1] and got["finish"] == "stop"


def test_context_length_ends_with_length(loop, tiny_llama):
    short = make_engine(loop, tiny_llama, max_model_len=32)
    try:
        res = loop.run(collect(short, PROMPTS[2], greedy(32, ignore_eos=True)))
        prompt_len = res["chunks"][-1].prompt_tokens
        assert res["finish"] == "length"
        assert prompt_len + len(res["tokens"]) == 32
        with pytest.raises(InvalidInput, match="context"):
            short.generate("The quick brown fox jumps over the lazy dog. " * 5, greedy(1), "too-long")
    finally:
        loop.run(short.stop())


# -- sampling -------------------------------------------------------------------------
def test_seed_makes_sampling_reproducible(engine, loop):
    def sample(seed, rid):
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=seed, ignore_eos=True)
        return collect(engine, PROMPTS[0], params, 0, rid)

    async def go():  # the same seed alone, and beside other sequences
        a = await sample(7, "a")
        b, c, _ = await asyncio.gather(sample(7, "b"), sample(8, "c"), collect(engine, PROMPTS[2], greedy(30)))
        return a, b, c

    a, b, c = loop.run(go())
    assert a["tokens"] == b["tokens"]
    assert a["tokens"] != c["tokens"]


def test_top_k_one_and_penalty(engine, loop, reference):
    res = loop.run(collect(engine, PROMPTS[4], SamplingParams(max_tokens=12, temperature=0.8, top_k=1)))
    assert res["tokens"] == reference(PROMPTS[4], 12)[: len(res["tokens"])]
    plain = reference(PROMPTS[4], 40)
    penalised = loop.run(collect(engine, PROMPTS[4], greedy(40, repetition_penalty=5.0, ignore_eos=True)))
    assert len(penalised["tokens"]) == 40
    assert len(set(penalised["tokens"])) >= len(set(plain))


@pytest.mark.parametrize(
    "params, fragment",
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=-3), "max_tokens"),
        (SamplingParams(max_tokens=10**6), "context"),
        (SamplingParams(temperature=-0.5), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (SamplingParams(seed=-1), "seed"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(max_tokens="ten"), "max_tokens"),  # type: ignore[arg-type]
    ],
)
def test_bad_parameters_are_invalid_input(engine, params, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        engine.generate(PROMPTS[0], params, "bad")
    assert engine.stats()["waiting"] == 0


def test_bad_prompts_are_invalid_input(engine):
    with pytest.raises(InvalidInput, match="empty"):
        engine.generate("", greedy(4), "empty")
    with pytest.raises(InvalidInput, match="vocabulary"):
        engine.generate([1, 2, 10**7], greedy(4), "oov")
    with pytest.raises(InvalidInput, match="token ids"):
        engine.generate([1, "x"], greedy(4), "mixed")  # type: ignore[list-item]


def test_token_id_prompt_equals_text_prompt(engine, loop, reference):
    ids = reference.tokenizer(PROMPTS[0])["input_ids"]
    res = loop.run(collect(engine, ids, greedy(10)))
    assert res["tokens"] == reference(PROMPTS[0], 10)


def test_chat_template(engine):
    text = engine.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text == "<s>user\nhello</s>\n<s>assistant\n"


# -- text ----------------------------------------------------------------------------------
def test_streamed_text_is_the_decoded_tokens(engine, loop, reference):
    tok = reference.tokenizer
    for i, prompt in enumerate(PROMPTS):
        res = loop.run(collect(engine, prompt, SamplingParams(max_tokens=30, seed=i, ignore_eos=True)))
        assert res["text"] == tok.decode(res["tokens"], skip_special_tokens=True)


# -- metrics -----------------------------------------------------------------------------
def test_metrics_observe_requests_and_steps(engine, loop):
    from meshserve.server.llm import metrics
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    metrics.LLMMetrics(registry, lambda: [("tiny", engine)]).attach("tiny", engine)
    try:

        async def three():
            return await asyncio.gather(*[collect(engine, p, greedy(10, ignore_eos=True)) for p in PROMPTS[:3]])

        loop.run(three())
        text = generate_latest(registry).decode()
    finally:
        engine.observer = None
    assert 'meshserve_llm_time_to_first_token_seconds_count{model="tiny"} 3.0' in text
    assert 'meshserve_llm_request_generation_tokens_sum{model="tiny"} 30.0' in text
    assert 'meshserve_llm_num_requests_running{model="tiny"} 0.0' in text
    steps = float(text.split('meshserve_llm_inter_token_latency_seconds_count{model="tiny"} ')[1].split()[0])
    assert 9 <= steps < 27  # one observation per decoding step, not per token


# -- the llm runtime in-process ---------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_packed_linear_setting_reaches_the_forward(packed, loop, tiny_llama, reference):
    """``packed_linear`` picks the fast forward's matmuls (oneDNN's packed weights, the default on
    a CPU in float32; ``F.linear`` when false); batched greedy tokens equal unbatched generate either way."""
    eng = make_engine(loop, tiny_llama, engine_process=False, packed_linear=packed)
    try:
        assert eng.forward == "fast" and eng.core.core.batch.packed is packed

        async def go():
            return await asyncio.gather(*[collect(eng, p, greedy(12), 0, f"r{i}") for i, p in enumerate(PROMPTS[:4])])

        for prompt, got in zip(PROMPTS[:4], loop.run(go()), strict=True):
            assert got["tokens"] == reference(prompt, 12), prompt
    finally:
        loop.run(eng.stop())
