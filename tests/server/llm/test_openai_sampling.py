"""The sampling and OpenAI features clients use, with the real ``openai`` client on a real
server: min_tokens / ignore_eos, stop_token_ids, presence/frequency penalties, seed per
choice, n > 1, logprobs (completions and chat, streamed and not), echo with prompt logprobs,
stream_options.include_usage; the same parameters on OIP generate and gRPC streaming; and
every bad value a 400 naming its field. Exact values are checked against transformers
run in this process on the same weights."""

from __future__ import annotations

import math

import grpc
import openai
import orjson
import pytest

from tests.server.llm.api_support import llm_server

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with llm_server(tmp_path_factory.mktemp("api-sampling"), tiny_llama) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def ref(tiny_llama):
    """transformers in this process: the prompt's ids, greedy continuations, logprobs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class Ref:
        tok = AutoTokenizer.from_pretrained(tiny_llama)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()

        def ids(self, text: str) -> list[int]:
            return self.tok(text)["input_ids"]

        def logprobs(self, ids: list[int]) -> torch.Tensor:
            """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
            with torch.inference_mode():
                return self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

        def greedy(self, ids: list[int], n: int, presence: float = 0.0, frequency: float = 0.0) -> list[int]:
            """Greedy decoding with OpenAI's penalties on the generated tokens (no EOS stop)."""
            out: list[int] = []
            for _ in range(n):
                row = self.logprobs(ids + out)[-1].clone()
                for t in set(out):
                    row[t] -= out.count(t) * frequency + presence
                out.append(int(row.argmax()))
            return out

    return Ref()


def complete(client, **kw):
    args = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 10, **GREEDY}
    extra = {**args.pop("extra_body", {}), **kw.pop("extra_body", {})}
    return client.completions.create(**{**args, **kw}, extra_body=extra)


def test_min_tokens_and_ignore_eos_give_exactly_the_length_asked(client, ref):
    want = ref.greedy(ref.ids(PROMPT), 12)
    k = next(i for i in range(2, 12) if want[i] not in want[:i])  # a token met first at step k
    stopped = complete(client, max_tokens=12, extra_body={"stop_token_ids": [want[k]]})
    (c,) = stopped.choices
    assert c.finish_reason == "stop" and stopped.usage.completion_tokens == k + 1
    assert c.text == ref.tok.decode(want[:k])  # the stop token's own text is not sent
    # min_tokens masks the stop token (and EOS) until it is reached: exactly 12 tokens
    held = complete(client, max_tokens=12, extra_body={"stop_token_ids": [want[k]], "min_tokens": 12})
    assert held.usage.completion_tokens == 12 and held.choices[0].finish_reason == "length"
    # without ignore_eos, min_tokens == max_tokens still answers the full length (EOS is masked)
    for _ in range(3):
        r = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=20, temperature=1.0,
                                      extra_body={"min_tokens": 20})  # fmt: skip
        assert r.usage.completion_tokens == 20


def test_presence_and_frequency_penalties_follow_openai(client, ref):
    ids = ref.ids(PROMPT)
    plain = ref.greedy(ids, 30)
    assert len(set(plain)) < 30  # unpenalised greedy repeats itself within 30 tokens here
    for presence, frequency in ((0.0, 1.5), (2.0, 0.0), (1.0, 1.0)):
        want = ref.greedy(ids, 30, presence, frequency)
        assert want != plain
        got = complete(client, max_tokens=30, presence_penalty=presence, frequency_penalty=frequency)
        assert got.choices[0].text == ref.tok.decode(want), (presence, frequency)


def test_seed_per_choice_and_n(client):
    sampled = {"temperature": 1.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    two = complete(client, n=2, seed=7, **sampled)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 24
    assert two.choices[0].text != two.choices[1].text
    assert [c.text for c in complete(client, n=2, seed=7, **sampled).choices] == [c.text for c in two.choices]
    # choice j is seeded with seed + j, as vLLM's parallel sampling does
    assert complete(client, seed=7, **sampled).choices[0].text == two.choices[0].text
    assert complete(client, seed=8, **sampled).choices[0].text == two.choices[1].text
    # several prompts x n: prompt-major indices, the prompt counted once in usage
    alone = [complete(client, prompt=p).choices[0].text for p in ("Hello", "Bonjour")]
    both = complete(client, prompt=["Hello", "Bonjour"], n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert both.usage.prompt_tokens == complete(client, prompt=["Hello", "Bonjour"]).usage.prompt_tokens
    chunks = list(complete(client, prompt=["Hello", "Bonjour"], n=2, stream=True,
                           stream_options={"include_usage": True}))  # fmt: skip
    texts = ["", "", "", ""]
    for ch in chunks[:-1]:
        (c,) = ch.choices
        texts[c.index] += c.text
    assert texts == [c.text for c in both.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_chat_n_streamed_and_not(client):
    messages = [{"role": "user", "content": "Where is Paris?"}]
    args = {"model": "tiny-llama", "messages": messages, "max_tokens": 6, "n": 3, **GREEDY}
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.message.content for c in whole.choices}) == 1  # greedy: all alike
    assert whole.usage.completion_tokens == 18
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    roles = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    content = ["", "", ""]
    for ch in chunks[:-1]:
        content[ch.choices[0].index] += ch.choices[0].delta.content or ""
    assert content == [c.message.content for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == 18 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_logprobs_equal_transformers(client, ref):
    ids = ref.ids(PROMPT)
    r = complete(client, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    out = ref.greedy(ids, 10)
    table = ref.logprobs(ids + out)
    for i, t in enumerate(out):
        want = float(table[len(ids) - 1 + i, t])
        assert math.isclose(lp.token_logprobs[i], want, abs_tol=1e-4)
        assert len(lp.top_logprobs[i]) >= 3
        assert math.isclose(max(lp.top_logprobs[i].values()), lp.token_logprobs[i], abs_tol=1e-6)  # greedy: the top
    streamed = list(complete(client, logprobs=3, stream=True))
    got = [x for ch in streamed for x in ch.choices[0].logprobs.token_logprobs]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-6)
    offsets = [x for ch in streamed for x in ch.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_echo_with_prompt_logprobs_and_no_generation(client, ref):
    """lm-eval's loglikelihood request: token ids, echo, max_tokens 0 (or 1), logprobs."""
    ids = ref.ids("Where is the Eiffel Tower? It stands in Paris")
    table = ref.logprobs(ids)
    want = [float(table[i - 1, ids[i]]) for i in range(1, len(ids))]
    for max_tokens in (0, 1):
        r = client.completions.create(model="tiny-llama", prompt=ids, echo=True, max_tokens=max_tokens, logprobs=1,
                                      temperature=0)  # fmt: skip
        (c,) = r.choices
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
        assert c.text.startswith(ref.tok.decode(ids)) and r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == max_tokens
    text = client.completions.create(model="tiny-llama", prompt=PROMPT, echo=True, max_tokens=0, logprobs=0)
    assert text.choices[0].text == PROMPT and text.choices[0].finish_reason == "length"
    scoring = {"echo": True, "max_tokens": 0, "logprobs": 1, "stream": True, "stream_options": {"include_usage": True}}
    streamed = list(client.completions.create(model="tiny-llama", prompt=[ids, ids[:4]], **scoring))
    by_index = {ch.choices[0].index: ch.choices[0] for ch in streamed if ch.choices}
    assert by_index[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert len(by_index[1].logprobs.tokens) == 4 and by_index[1].finish_reason == "length"
    assert streamed[-1].usage.completion_tokens == 0 and streamed[-1].usage.prompt_tokens == len(ids) + 4


def test_chat_logprobs(client):
    messages = [{"role": "user", "content": "Where is Paris?"}]
    args = {"model": "tiny-llama", "messages": messages, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    r = client.chat.completions.create(**args, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes) == entry.token.encode()
    streamed = list(client.chat.completions.create(**args, stream=True, **GREEDY))
    pieces = [ch.choices[0].logprobs.content for ch in streamed if ch.choices and ch.choices[0].logprobs]
    got = [e.logprob for piece in pieces for e in piece]
    assert got == pytest.approx([e.logprob for e in content], abs=1e-6)
    plain = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=2, logprobs=False)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"n": 0}, "n", ">= 1"),
        ({"n": 65}, "n", "<= 64"),
        ({"prompt": ["a", "b"], "n": 33}, "n", "at most 64 choices"),
        ({"logprobs": 21}, "logprobs", "<= 20"),
        ({"logprobs": -1}, "logprobs", ">= 0"),
        ({"extra_body": {"min_tokens": -1}}, "min_tokens", ">= 0"),
        ({"extra_body": {"min_tokens": 5}}, "min_tokens", "<= max_tokens"),
        ({"extra_body": {"stop_token_ids": "2"}}, "stop_token_ids", "token ids"),
        ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids", "token ids"),
        ({"presence_penalty": 3}, "presence_penalty", "<= 2.0"),
        ({"frequency_penalty": "a"}, "frequency_penalty", "number"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"best_of": 3}, "best_of", "best_of"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"suffix": "x"}, "suffix", "not supported"),
        ({"extra_body": {"mirostat": 1}}, "mirostat", "unknown request parameter 'mirostat'"),
    ],
)
def test_bad_values_are_400_naming_the_field(client, kwargs, param, words):
    args = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert words in e.value.body["message"] and e.value.body["param"] == param


def test_unknown_parameter_lists_only_what_is_supported(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-llama", prompt="hi", extra_body={"mirostat": 1})
    supported = e.value.body["message"].split("supported: ")[1].split(", ")
    assert "frequency_penalty" in supported and "min_tokens" in supported and "logprobs" in supported
    assert "suffix" not in supported and "tools" not in supported  # refused features are not listed
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)  # fmt: skip
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                       logprobs=True, top_logprobs=21)  # fmt: skip
    assert e.value.body["param"] == "top_logprobs"


def test_oip_generate_takes_the_same_parameters(client, http, ref):
    want = ref.greedy(ref.ids(PROMPT), 12)
    k = next(i for i in range(2, 12) if want[i] not in want[:i])
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 12, "temperature": 0, "ignore_eos": True,
                                                 "stop_token_ids": [want[k]]}}  # fmt: skip
    doc = http.post("/v2/models/tiny-llama/generate", content=orjson.dumps(body)).json()
    assert doc["completion_tokens"] == k + 1 and doc["finish_reason"] == "stop"
    body["parameters"]["min_tokens"] = 12
    assert http.post("/v2/models/tiny-llama/generate", content=orjson.dumps(body)).json()["completion_tokens"] == 12
    pen = {"text_input": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "frequency_penalty": 1.5}
    text = http.post("/v2/models/tiny-llama/generate", content=orjson.dumps(pen)).json()["text_output"]
    assert text == complete(client, frequency_penalty=1.5).choices[0].text
    r = http.post("/v2/models/tiny-llama/generate", json={"text_input": "hi", "parameters": {"min_tokens": "x"}})
    assert r.status_code == 400 and "min_tokens" in r.json()["error"]
    r = http.post("/v2/models/tiny-llama/generate", json={"text_input": "hi", "parameters": {"n": 2}})
    assert r.status_code == 400 and "unknown generation parameter 'n'" in r.json()["error"]
    # plain infer reads its parameters the same way
    infer = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}],
             "parameters": {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "min_tokens": 12}}  # fmt: skip
    assert http.post("/v2/models/tiny-llama/infer", json=infer).json()["parameters"]["completion_tokens"] == 12
    infer["parameters"]["presence_penalty"] = 9
    r = http.post("/v2/models/tiny-llama/infer", json=infer)
    assert r.status_code == 400 and "presence_penalty" in r.json()["error"]


def test_grpc_streaming_takes_the_same_parameters(server, client):
    from meshserve.protocol.grpc import grpc_service_pb2 as pb
    from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc

    def request(**params):
        msg = pb.ModelInferRequest(model_name="tiny-llama", id="g")
        t = msg.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        t.contents.bytes_contents.append(PROMPT.encode())
        for k, v in {"stream": True, "temperature": 0, "ignore_eos": True, "max_tokens": 8, **params}.items():
            if isinstance(v, bool):
                msg.parameters[k].bool_param = v
            elif isinstance(v, int):
                msg.parameters[k].int64_param = v
            elif isinstance(v, float):
                msg.parameters[k].double_param = v
        return msg

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        plain = list(stub.ModelStreamInfer(iter([request()]), timeout=60))
        assert all(not r.error_message for r in plain)
        held = list(stub.ModelStreamInfer(iter([request(min_tokens=8, frequency_penalty=1.5)]), timeout=60))
        assert not held[-1].error_message and held[-1].infer_response.parameters["triton_final_response"].bool_param
        text = b"".join(r.infer_response.raw_output_contents[0][4:] for r in held).decode()
        assert text == complete(client, max_tokens=8, frequency_penalty=1.5).choices[0].text
        bad = list(stub.ModelStreamInfer(iter([request(min_tokens=9)]), timeout=60))
        assert "min_tokens" in bad[0].error_message
