"""The continuous-batching transformers engine on the tiny random Llama.

One engine per module runs on an event loop in a background thread, as in the server;
each test submits coroutines to it. Its core runs in a child process (the default), except
where a test reaches into the core and asks for it on a thread (``engine_process=False``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from meshserve.protocol.errors import CapacityExhausted, InvalidInput
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
def test_greedy_under_continuous_batching_equals_unbatched_generate(engine, loop, reference):
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


def test_sequences_join_and_leave_mid_run(engine, loop, reference):
    async def go():
        long = asyncio.ensure_future(collect(engine, PROMPTS[2], greedy(120, ignore_eos=True), 0, "long"))
        seen_running = await wait_running(engine, 1)
        short = await collect(engine, PROMPTS[0], greedy(3, ignore_eos=True), 0, "short")
        short_done = time.perf_counter()
        running_after_short = engine.stats()["running"]
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
def test_closing_the_stream_drops_the_sequence_at_once(engine, loop, reference):
    async def go():
        other = asyncio.ensure_future(collect(engine, PROMPTS[1], greedy(40), 0, "other"))
        stream = engine.generate(PROMPTS[0], greedy(200, ignore_eos=True), "closed")
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        running = engine.stats()["running"]  # at once, not after the next step
        res = await other
        return got, running, res, await wait_idle(engine)

    before = engine.stats()["requests_aborted"]
    got, running, other, idle = loop.run(go())
    assert len(got) == 3
    assert running <= 1  # only "other" can still be running
    assert other["tokens"] == reference(PROMPTS[1], 40)  # the others never notice
    assert idle["running"] == 0 and idle["waiting"] == 0
    assert idle["requests_aborted"] == before + 1


def test_cancelling_the_consumer_task_leaves_no_sequence(engine, loop):
    async def go():
        tasks = [
            asyncio.ensure_future(collect(engine, p, greedy(200, ignore_eos=True), 0, f"c{i}"))
            for i, p in enumerate(PROMPTS)
        ]
        peak = await wait_running(engine, len(PROMPTS))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peak, await wait_idle(engine, 2.0)

    peak, idle = loop.run(go())
    assert peak == len(PROMPTS)
    assert idle["running"] == 0 and idle["waiting"] == 0
    assert engine._seqs == {}


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
def test_runtime_rejects_invalid_utf8_and_keeps_serving(loop, tiny_llama):
    import numpy as np
    from meshserve.protocol.datatypes import bytes_array
    from meshserve.protocol.types import InferenceRequest, Tensor
    from meshserve.server.model_settings import parse_model_settings
    from meshserve.server.runtimes.llm import LLMModel

    model = LLMModel(
        parse_model_settings({"name": "tiny", "parameters": {"generation": {"max_tokens": 3}}}), tiny_llama
    )
    loop.run(model.load())
    try:

        def request(*texts: bytes) -> InferenceRequest:
            data = bytes_array(list(texts), (len(texts),))
            return InferenceRequest("tiny", [Tensor("text_input", "BYTES", data)], parameters={"temperature": 0})

        with pytest.raises(InvalidInput, match="UTF-8"):
            loop.run(model.predict(request(b"fine", b"\xff\xfe broken")))
        out = loop.run(model.predict(request("ça va 🙂".encode())))
        assert out.outputs[0].name == "text_output" and isinstance(out.outputs[0].data[0], bytes)
        assert out.parameters["completion_tokens"] == 3  # the model's generation defaults apply
        assert model.size_bytes() > 0 and model.engine.stats()["waiting"] == 0
        assert np.asarray(out.outputs[0].data).shape == (1,)
    finally:
        loop.run(model.unload())
    assert model.engine is None


# -- failures -----------------------------------------------------------------------------------
def test_a_failed_step_fails_its_sequences_and_the_engine_keeps_serving(loop, tiny_llama, reference):
    from meshserve.protocol.errors import ModelExecutionError

    eng = make_engine(loop, tiny_llama, engine_process=False)  # the fault goes into the core's thread
    core = eng.core.core
    real = core._forward
    calls = {"n": 0}

    def failing_once(*args):  # a fault injected into the third forward pass (a decode step)
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real(*args)

    core._forward = failing_once
    try:
        with pytest.raises(ModelExecutionError, match="injected fault"):
            loop.run(collect(eng, PROMPTS[0], greedy(10, ignore_eos=True)))
        assert eng.stats()["running"] == 0
        res = loop.run(collect(eng, PROMPTS[0], greedy(10)))
        assert res["tokens"] == reference(PROMPTS[0], 10)
    finally:
        loop.run(eng.stop())


def test_stop_fails_sequences_in_flight(loop, tiny_llama):
    from meshserve.protocol.errors import ModelExecutionError

    eng = make_engine(loop, tiny_llama)

    async def go():
        task = asyncio.ensure_future(collect(eng, PROMPTS[0], greedy(250, ignore_eos=True)))
        await asyncio.sleep(0.05)
        await eng.stop()
        with pytest.raises(ModelExecutionError, match="unloaded"):
            await asyncio.wait_for(task, 10)
        with pytest.raises(ModelExecutionError, match="not running"):
            eng.generate(PROMPTS[0], greedy(4), "late")

    loop.run(go())


def test_a_templated_prompt_gets_no_second_bos(loop, tiny_llama):
    from tokenizers.processors import TemplateProcessing

    eng = make_engine(loop, tiny_llama)
    try:
        tok = eng.tokenizer  # make it add a BOS, as Llama tokenizers do
        bos = tok.bos_token_id
        tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        assert eng.tokenize("hi")[0] == bos
        chat = eng.apply_chat_template([{"role": "user", "content": "hi"}])
        ids = eng.tokenize(chat)
        assert ids[0] == bos and ids[1] != bos
    finally:
        loop.run(eng.stop())


@pytest.mark.parametrize(
    "parameters, fragment",
    [
        ({"max_num_seqs": "many"}, "integers"),
        ({"engine": "tensorrt"}, "unknown engine"),
        ({"max_model_len": 100000}, "max_model_len"),
        ({"dtype": "int3"}, "dtype"),
        ({"generation": {"max_tokens": 0}}, "max_tokens"),
        ({"generation": {"colour": "red"}}, "unknown generation parameter"),
        ({"chat": "yes"}, "parameters.chat"),
    ],
)
def test_bad_model_settings_fail_the_load_clearly(loop, tiny_llama, parameters, fragment):
    from meshserve.protocol.errors import ModelLoadError
    from meshserve.server.model_settings import parse_model_settings
    from meshserve.server.runtimes.llm import LLMModel

    with pytest.raises(ModelLoadError, match=fragment):
        model = LLMModel(parse_model_settings({"name": "bad", "parameters": parameters}), tiny_llama)
        loop.run(model.load())


def test_chat_setting_sends_plain_infer_prompts_through_the_chat_template(loop, tiny_llama):
    from meshserve.protocol.datatypes import bytes_array
    from meshserve.protocol.types import InferenceRequest, Tensor
    from meshserve.server.model_settings import parse_model_settings
    from meshserve.server.runtimes.llm import LLMModel

    def prompt_tokens(chat: bool) -> int:
        settings = {"name": "m", "parameters": {"chat": chat, "generation": {"max_tokens": 2, "temperature": 0}}}
        model = LLMModel(parse_model_settings(settings), tiny_llama)
        loop.run(model.load())
        try:
            text = Tensor("text_input", "BYTES", bytes_array([b"hello there"], (1,)))
            response = loop.run(model.predict(InferenceRequest("m", [text])))
        finally:
            loop.run(model.unload())
        expected = model_prompt_len(chat)
        assert response.parameters["prompt_tokens"] == expected
        return expected

    def model_prompt_len(chat: bool) -> int:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_llama)
        text = "hello there"
        if chat:
            messages = [{"role": "user", "content": text}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text)["input_ids"])

    assert prompt_tokens(True) > prompt_tokens(False)


def test_logprobs_penalties_and_min_tokens_rows_leave_greedy_rows_unchanged(engine, loop, reference):
    """Rows asking for prompt logprobs (a prefill of their own), token logprobs, penalties or
    min_tokens share steps with plain greedy rows, which still equal unbatched generate."""
    import torch

    tok = reference.tokenizer
    plain = [(PROMPTS[0], 12), (PROMPTS[3], 9)]
    special = [
        greedy(6, prompt_logprobs=2, logprobs=1),
        greedy(10, logprobs=3, frequency_penalty=1.0, presence_penalty=0.5),
        greedy(8, min_tokens=8, stop_token_ids=[5, 6]),
    ]

    async def go():
        return await asyncio.gather(
            *[collect(engine, p, greedy(n), 0, f"plain{i}") for i, (p, n) in enumerate(plain)],
            *[collect(engine, PROMPTS[1], sp, 0, f"special{i}") for i, sp in enumerate(special)],
        )

    results = loop.run(go())
    for (prompt, n), res in zip(plain, results, strict=False):
        assert res["tokens"] == reference(prompt, n)
        assert all(c.logprobs is None and c.prompt_logprobs is None for c in res["chunks"])
    scored, penalised, held = results[len(plain) :]
    assert scored["tokens"] == reference(PROMPTS[1], 6)  # greedy with logprobs: the same tokens
    ids = tok(PROMPTS[1])["input_ids"]
    with torch.inference_mode():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(engine.path).eval()
        table = model(torch.tensor([ids + scored["tokens"]])).logits[0].float().log_softmax(-1)
    prompt_lps = scored["chunks"][0].prompt_logprobs
    assert [e.token_id for e in prompt_lps] == ids and prompt_lps[0].logprob is None
    for i in range(1, len(ids)):
        assert prompt_lps[i].logprob == pytest.approx(float(table[i - 1, ids[i]]), abs=1e-4)
        assert len(prompt_lps[i].top) == 2 and prompt_lps[i].top[0][2] >= prompt_lps[i].top[1][2]
    token_lps = [e for c in scored["chunks"] for e in c.logprobs]
    assert [e.token_id for e in token_lps] == scored["tokens"]
    for i, e in enumerate(token_lps):
        assert e.logprob == pytest.approx(float(table[len(ids) - 1 + i, e.token_id]), abs=1e-4)
        assert e.top[0][0] == e.token_id  # greedy: the chosen token is the most likely
    assert len([e for c in penalised["chunks"] for e in c.logprobs]) == len(penalised["tokens"])
    assert len(held["tokens"]) == 8 and not {5, 6} & set(held["tokens"])


@pytest.mark.parametrize("own_process", [False, True], ids=["thread", "process"])
def test_chunked_prefill_keeps_decoding_while_a_long_prompt_is_prefilled(loop, tiny_llama, reference, own_process):
    """A prompt longer than max_prefill_chunk is prefilled a chunk per step: a running
    sequence gets a token at each of those steps (unchunked: one step, one token), and the
    long one's output and prompt logprobs are those of an unchunked run. With the core in a
    process of its own, the steps already under way when the prompt is sent (it crosses a
    pipe) add their tokens to both counts."""
    long_prompt = " ".join(PROMPTS) * 3
    n = len(reference.tokenizer(long_prompt)["input_ids"])
    chunks = -(-n // 16)
    assert chunks >= 8

    async def scenario(eng):
        """(decoder tokens between the long prompt's arrival and its first token, its chunks)."""
        arrivals: list[tuple[float, int]] = []
        started = asyncio.Event()

        async def decoder():
            async for chunk in eng.generate(PROMPTS[0], greedy(120, ignore_eos=True), "decoder"):
                arrivals.append((time.perf_counter(), len(chunk.token_ids)))
                if sum(k for _, k in arrivals) >= 3:
                    started.set()

        task = asyncio.ensure_future(decoder())
        await started.wait()
        submitted = time.perf_counter()
        out = []
        async for chunk in eng.generate(long_prompt, greedy(6, prompt_logprobs=1), "long"):
            out.append((time.perf_counter(), chunk))
        await task
        first = out[0][0]
        return sum(k for t, k in arrivals if submitted < t <= first), [c for _, c in out]

    results = {}
    for chunk_size in (16, 0):
        eng = make_engine(loop, tiny_llama, max_prefill_chunk=chunk_size, engine_process=own_process)
        try:
            results[chunk_size] = loop.run(scenario(eng))
        finally:
            loop.run(eng.stop())
    during, got = results[16]
    during_unchunked, whole = results[0]
    assert during >= chunks - 2, (during, chunks)  # the decoder kept its pace through the chunks
    # unchunked, it waited for the whole prefill
    assert during_unchunked <= (during // 2 if own_process else 2), (during_unchunked, during)
    tokens = [t for c in got for t in c.token_ids]
    assert tokens == [t for c in whole for t in c.token_ids] == reference(long_prompt, 6)
    chunked_lps = [e.logprob for e in got[0].prompt_logprobs[1:]]
    assert len(chunked_lps) == n - 1
    assert chunked_lps == pytest.approx([e.logprob for e in whole[0].prompt_logprobs[1:]], abs=1e-4)
