"""The engine's failures, settings and sampling rows, and chunked prefill (engine_support.py
has the loop, the engine and the reference outputs)."""

from __future__ import annotations

import asyncio
import time

import pytest
from meshserve.protocol.errors import InvalidInput

from tests.server.llm.engine_support import PROMPTS, collect, greedy, make_engine, paced_engine


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
    batch = eng.core.core.batch
    real = batch.decode
    calls = {"n": 0}

    def failing_once(*args):  # a fault injected into the second decode step
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real(*args)

    batch.decode = failing_once
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

    eng = paced_engine(loop, tiny_llama)  # 250 steps of at least 4 ms: it is running when stopped

    async def go():
        stream = eng.generate(PROMPTS[0], greedy(250, ignore_eos=True), "r")
        first = await stream.__anext__()
        assert first.finish_reason is None

        async def rest():
            async for _ in stream:
                pass

        task = asyncio.ensure_future(rest())
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
        ({"fast_forward": "yes"}, "fast_forward must be true or false"),
        ({"packed_linear": 1}, "packed_linear must be true or false"),
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


@pytest.mark.parametrize(
    "own_process, fast", [(False, True), (True, True), (False, False)], ids=["thread", "process", "transformers"]
)
def test_chunked_prefill_keeps_decoding_while_a_long_prompt_is_prefilled(
    loop, tiny_llama, reference, own_process, fast
):
    """A prompt longer than max_prefill_chunk is prefilled a chunk per step: a running
    sequence gets a token at each of those steps (unchunked: one step, one token), and the
    long one's output and prompt logprobs are those of an unchunked run. With the core in a
    thread, the steps are counted in the core itself (exact, whatever the machine's load);
    with the core in a process of its own, by the tokens the loop saw in the meantime (a
    loop that falls behind sees more, never fewer)."""
    long_prompt = " ".join(PROMPTS) * 3
    long_ids = reference.tokenizer(long_prompt)["input_ids"]
    n = len(long_ids)
    chunks = -(-n // 16)
    assert chunks >= 8

    def count_steps(eng) -> list[int]:
        """The decoder's tokens in each core step from the one that found the long prompt
        waiting to the one that gave the long prompt's first token."""
        core = eng.core.core
        real = core.step
        steps: list[int] = []
        state = {"long": None, "done": False}

        def step():
            if state["long"] is None:
                state["long"] = next((s.key for s in core._waiting if len(s.prompt_ids) == n), None)
            msg = real()
            if state["long"] is not None and not state["done"]:
                keys = [o[0] for o in msg[1]]
                steps.append(sum(k != state["long"] for k in keys))
                state["done"] = state["long"] in keys
            return msg

        core.step = step
        return steps

    async def scenario(eng):
        """(decoder tokens the loop saw between the long prompt's arrival and its first token, its chunks)."""
        arrivals: list[tuple[float, int]] = []
        started = asyncio.Event()

        async def decoder():
            async for chunk in eng.generate(PROMPTS[0], greedy(120, ignore_eos=True), "decoder"):
                arrivals.append((time.perf_counter(), len(chunk.token_ids)))
                if sum(k for _, k in arrivals) >= 3:
                    started.set()

        task = asyncio.ensure_future(decoder())
        await started.wait()
        # Token ids, not text: tokenizing on the loop would hold back tokens the core made meanwhile.
        submitted = time.perf_counter()
        out = []
        async for chunk in eng.generate(long_ids, greedy(6, prompt_logprobs=1), "long"):
            out.append((time.perf_counter(), chunk))
        await task
        first = out[0][0]
        return sum(k for t, k in arrivals if submitted < t <= first), [c for _, c in out]

    results, core_steps = {}, {}
    for chunk_size in (16, 0):
        eng = make_engine(loop, tiny_llama, max_prefill_chunk=chunk_size, engine_process=own_process, fast_forward=fast)
        try:
            if not own_process:
                core_steps[chunk_size] = count_steps(eng)
            results[chunk_size] = loop.run(scenario(eng))
        finally:
            loop.run(eng.stop())
    during, got = results[16]
    during_unchunked, whole = results[0]
    if own_process:
        assert during >= chunks - 2, (during, chunks)  # the decoder kept its pace through the chunks
    else:
        # A chunk per step, the decoder's token in each; unchunked, one step for the whole prompt.
        assert core_steps[16] == [1] * chunks, (core_steps[16], chunks)
        assert core_steps[0] == [1], core_steps[0]
    tokens = [t for c in got for t in c.token_ids]
    assert tokens == [t for c in whole for t in c.token_ids] == reference(long_prompt, 6)
    chunked_lps = [e.logprob for e in got[0].prompt_logprobs[1:]]
    assert len(chunked_lps) == n - 1
    assert chunked_lps == pytest.approx([e.logprob for e in whole[0].prompt_logprobs[1:]], abs=1e-4)
