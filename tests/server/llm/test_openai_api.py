"""The OpenAI-compatible routes with the real ``openai`` client (sync and async,
streaming and not), under /v1 and /openai/v1, and OpenAI's error shape."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.server.llm.api_support import engine_gauge, llm_server, sse_events, wait_for_gauge

GREEDY = {"temperature": 0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    # No settings file and no preload: the routes find the LLM by its files and load it on first use.
    with llm_server(tmp_path_factory.mktemp("api-openai"), tiny_llama, "--no-preload", settings=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_both_prefixes_and_lazy_load(server, prefix):
    with openai.OpenAI(base_url=server.http_url + prefix, api_key="unused", max_retries=0) as c:
        assert [m.id for m in c.models.list().data] == ["tiny-llama"]
        done = c.completions.create(model="tiny-llama", prompt="hi", **GREEDY)
        assert done.usage.completion_tokens == 10


def test_models_lists_only_language_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    card = client.models.retrieve("tiny-llama")
    assert card.id == "tiny-llama" and card.object == "model" and card.owned_by == "meshserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("echo")


def test_completion(client):
    c = client.completions.create(model="tiny-llama", prompt="The capital of France is", **GREEDY)
    assert c.object == "text_completion" and c.model == "tiny-llama" and c.id.startswith("cmpl-")
    assert isinstance(c.created, int)
    (choice,) = c.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert c.usage.completion_tokens == 10 and c.usage.prompt_tokens > 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + 10
    again = client.completions.create(model="tiny-llama", prompt="The capital of France is", **GREEDY)
    assert again.choices[0].text == choice.text
    echoed = client.completions.create(model="tiny-llama", prompt="The capital of France is", echo=True, **GREEDY)
    assert echoed.choices[0].text == "The capital of France is" + choice.text
    ids = client.completions.create(model="tiny-llama", prompt=[5, 6, 7, 8], **GREEDY)  # token ids, as vLLM takes
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 10
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="tiny-llama", prompt=[5, 10**6], **GREEDY)


def test_completion_stream_matches(client):
    whole = client.completions.create(model="tiny-llama", prompt="Where is the Eiffel Tower?", **GREEDY)
    chunks = list(
        client.completions.create(
            model="tiny-llama", prompt="Where is the Eiffel Tower?", stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )  # fmt: skip
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)


def test_several_prompts_one_choice_each(client, http):
    prompts = ["The capital of France is", "Where is the Eiffel Tower?", "Bonjour"]
    alone = [client.completions.create(model="tiny-llama", prompt=p, **GREEDY) for p in prompts]
    together = client.completions.create(model="tiny-llama", prompt=prompts, **GREEDY)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert together.usage.completion_tokens == 30
    chunks = list(client.completions.create(model="tiny-llama", prompt=prompts, stream=True, echo=True,
                                            stream_options={"include_usage": True}, **GREEDY))  # fmt: skip
    texts = ["", "", ""]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.text
    assert texts == [p + a.choices[0].text for p, a in zip(prompts, alone, strict=True)]
    assert chunks[-1].usage.completion_tokens == 30
    # one bad prompt fails the request; the sequence already started for the good one is dropped
    before = engine_gauge(http, "aborted")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-llama", prompt=["Hello", "word " * 400], max_tokens=200,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert wait_for_gauge(http, "aborted", before + 1) == before + 1
    assert wait_for_gauge(http, "running", 0) == 0


def test_chat(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
    c = client.chat.completions.create(model="tiny-llama", messages=messages, **GREEDY)
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-")
    (choice,) = c.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and c.usage.completion_tokens == 10
    # the tokenizer's chat template formatted the prompt: it costs more tokens than the bare question
    bare = client.completions.create(model="tiny-llama", prompt="Where is Paris?", **GREEDY)
    assert c.usage.prompt_tokens > bare.usage.prompt_tokens
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert content == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # max_completion_tokens is the newer name of max_tokens
    short = client.chat.completions.create(model="tiny-llama", messages=messages, max_completion_tokens=3,
                                           temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert short.usage.completion_tokens == 3


def test_async_client_concurrent_streams(server):
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as c:

            async def one(i: int) -> str:
                stream = await c.chat.completions.create(
                    model="tiny-llama", messages=[{"role": "user", "content": f"Count to {i}"}], stream=True, **GREEDY
                )
                return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

            async def whole(i: int) -> str:
                r = await c.chat.completions.create(
                    model="tiny-llama", messages=[{"role": "user", "content": f"Count to {i}"}], **GREEDY
                )
                return r.choices[0].message.content

            streamed = await asyncio.gather(*(one(i) for i in range(4)))
            single = await asyncio.gather(*(whole(i) for i in range(4)))
            assert streamed == single  # greedy: batching changes nothing
            return streamed

    assert len(asyncio.run(main())) == 4


@pytest.mark.parametrize(
    ("kwargs", "error", "param", "words"),
    [
        ({"n": 0}, openai.BadRequestError, "n", ">= 1"),  # the sampling features: test_openai_sampling.py
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens", ">= 1"),
        ({"max_tokens": 100000}, openai.BadRequestError, "max_tokens", "context"),
        ({"max_tokens": 10**7}, openai.BadRequestError, "max_tokens", "<= 1048576"),
        ({"extra_body": {"mirostat": 1}}, openai.BadRequestError, "mirostat", "unknown"),
        ({"temperature": -1}, openai.BadRequestError, "temperature", "temperature"),
        ({"model": "nope"}, openai.NotFoundError, None, "nope"),
        ({"model": "echo"}, openai.BadRequestError, None, "not a language model"),
        ({"prompt": "word " * 400}, openai.BadRequestError, None, "context"),
        ({"prompt": ["one"] * 65}, openai.BadRequestError, "prompt", "at most 64"),
        ({"prompt": ["one", "word " * 400]}, openai.BadRequestError, None, "context"),
    ],
)
def test_completion_errors(client, kwargs, error, param, words):
    args = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(error) as e:
        client.completions.create(**args)
    body = e.value.body
    assert words in body["message"] and body["param"] == param
    assert body["type"] == "invalid_request_error"
    if error is openai.NotFoundError:
        assert body["code"] == "model_not_found"


def test_error_shape_over_plain_http(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": []})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "'messages' must be a non-empty list", "type": "invalid_request_error",
                                  "param": "messages", "code": None}}  # fmt: skip
    r = http.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b'{"model": "tiny-llama", "prompt": "\xff"}')
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = http.post("/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "stream_options": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    r = http.post("/v1/completions", json={"model": "tiny-llama", "prompt": "word " * 400, "stream": True})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"


def test_raw_sse_ends_with_done(http):
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 3, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    assert sum(e["choices"][0]["text"] != "" for e in events[:-1]) >= 1
