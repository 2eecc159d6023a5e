"""Request fields -> SamplingParams, in process (the endpoints are tested over sockets)."""

from __future__ import annotations

import pytest
from meshserve.protocol.errors import InvalidInput
from meshserve.server.llm.api_params import (
    ParamError,
    chat_messages,
    check_model_defaults,
    model_defaults,
    oip_sampling,
    openai_request,
)


def test_oip_aliases_and_options():
    s, opts = oip_sampling({"max_new_tokens": 7, "random_seed": 3, "stop_words": "x", "top_k": -1, "stream": True})
    p = s.bind(256, 16)
    assert (p.max_tokens, p.seed, p.stop, p.top_k) == (7, 3, ["x"], 0)
    assert opts.stream and opts.exclude_input_in_output
    _, opts = oip_sampling({"stream": None, "exclude_input_in_output": False})
    assert not opts.stream and not opts.exclude_input_in_output
    assert oip_sampling(None)[0].bind(256, 16).max_tokens == 16
    assert oip_sampling({}, ignore=frozenset({"binary_data_output"}))[0].bind(8, 16).max_tokens == 8  # capped
    s, _ = oip_sampling({"binary_data_output": True, "temperature": 0}, ignore=frozenset({"binary_data_output"}))
    assert s.bind(256, 16).temperature == 0.0


@pytest.mark.parametrize(
    ("params", "param", "words"),
    [
        ({"max_tokens": 2, "max_new_tokens": 3}, "max_new_tokens", "either"),
        ({"max_tokens": True}, "max_tokens", "integer"),
        ({"max_tokens": 2.5}, "max_tokens", "integer"),
        ({"temperature": float("nan")}, "temperature", "finite"),
        ({"top_p": 1.5}, "top_p", "<= 1.0"),
        ({"top_k": -2}, "top_k", ">= -1"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"repetition_penalty": 0}, "repetition_penalty", "> 0.0"),
        ({"stop": ["a"] * 17}, "stop", "at most 16"),
        ({"stop": [""]}, "stop", "1 to 256"),
        ({"ignore_eos": "yes"}, "ignore_eos", "boolean"),
        ({"stream": 1}, "stream", "boolean"),
        ({"foo": 1, "bar": 2}, "bar", "'bar', 'foo'"),
    ],
)
def test_oip_bad_parameters(params, param, words):
    with pytest.raises(ParamError) as e:
        oip_sampling(params)
    assert e.value.param == param and words in e.value.message
    assert isinstance(e.value, InvalidInput)  # a 400 / INVALID_ARGUMENT everywhere


def test_request_then_model_then_endpoint_default():
    model = model_defaults({"max_tokens": 5, "temperature": 0.5, "stop_sequences": ["\n"]})
    s, _ = oip_sampling({"temperature": 0})
    p = s.bind(256, 16, model)
    assert (p.max_tokens, p.temperature, p.stop) == (5, 0.0, ["\n"])
    assert oip_sampling(None)[0].bind(256, 16, model_defaults(None)).max_tokens == 16
    with pytest.raises(ParamError, match="parameters.generation.max_tokens"):
        oip_sampling(None)[0].bind(4, 16, model_defaults({"max_tokens": 5}))


def test_openai_fields():
    body = {"model": "m", "prompt": ["hi"], "n": 1, "logprobs": None, "frequency_penalty": 0, "user": "u",
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    r = openai_request(body, chat=False)
    assert r.prompts == ["hi"] and r.stream and r.include_usage
    assert openai_request({"model": "m", "prompt": [[1, 2]]}, chat=False).prompts == [[1, 2]]
    assert openai_request({"model": "m", "prompt": [1, 2]}, chat=False).prompts == [[1, 2]]
    assert openai_request({"model": "m", "prompt": ["a", [3]]}, chat=False).prompts == ["a", [3]]
    for bad in ("", [], ["a", ""], [[]], [-1], [True], ["a"] * 65, 5):
        with pytest.raises(ParamError) as e:
            openai_request({"model": "m", "prompt": bad}, chat=False)
        assert e.value.param == "prompt"
    r = openai_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": False,
                        "max_completion_tokens": 4, "response_format": {"type": "text"}}, chat=True)  # fmt: skip
    assert r.sampling.bind(256, None).max_tokens == 4
    assert (
        openai_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}, True)
        .sampling.bind(256, None)
        .max_tokens
        == 256
    )  # chat: up to the context
    with pytest.raises(ParamError, match="not both"):
        openai_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                        "max_completion_tokens": 3}, chat=True)  # fmt: skip
    with pytest.raises(ParamError, match="'messages'") as e:
        openai_request({"model": "m", "prompt": "x", "messages": []}, chat=False)
    assert e.value.param == "messages"
    with pytest.raises(ParamError, match="tool calling"):
        openai_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, chat=True)


def test_chat_messages_join_text_parts_and_check_roles():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert chat_messages([{"role": "user", "content": parts, "name": "n"}]) == [
        {"role": "user", "content": "ab", "name": "n"}
    ]
    for bad in ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                [{"role": "user"}], [{"role": "user", "content": "x", "tool_calls": []}], ["hi"]):  # fmt: skip
        with pytest.raises(ParamError):
            chat_messages(bad)


def test_new_sampling_fields_and_openai_options():
    s, _ = oip_sampling({"min_tokens": 4, "stop_token_ids": [2, 7], "presence_penalty": -1, "frequency_penalty": 2})
    p = s.bind(256, 16)
    assert (p.min_tokens, p.stop_token_ids, p.presence_penalty, p.frequency_penalty) == (4, [2, 7], -1.0, 2.0)
    with pytest.raises(ParamError, match="<= max_tokens") as e:
        oip_sampling({"min_tokens": 17})[0].bind(256, 16)  # the endpoint's default max_tokens counts too
    assert e.value.param == "min_tokens"
    r = openai_request({"model": "m", "prompt": ["a", "b"], "n": 3, "logprobs": 2, "seed": 5}, chat=False)
    assert (r.n, r.logprobs, r.echo_only) == (3, 2, False)
    assert [r.choice_params(r.sampling.copy().bind(256, 16), j).seed for j in range(3)] == [5, 6, 7]
    echo = openai_request({"model": "m", "prompt": [1, 2], "echo": True, "max_tokens": 0, "logprobs": 1}, False)
    p = echo.choice_params(echo.sampling.copy().bind(256, 16), 0)
    assert echo.echo_only and (p.max_tokens, p.logprobs, p.prompt_logprobs) == (1, 1, 1)
    chat = openai_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, True)
    assert chat.logprobs == 0  # the chosen token's logprob, no alternatives
    assert openai_request({"model": "m", "prompt": "x", "logprobs": None}, False).logprobs is None


def test_one_wording_for_unknown_parameters():
    with pytest.raises(ParamError) as oip:
        oip_sampling({"mirostat": 1})
    with pytest.raises(ParamError) as api:
        openai_request({"model": "m", "prompt": "x", "mirostat": 1}, chat=False)
    for e, where in ((oip, "generation"), (api, "request")):
        assert e.value.message.startswith(f"unknown {where} parameter 'mirostat'; supported: ")
        supported = e.value.message.split("supported: ")[1].split(", ")
        assert {"frequency_penalty", "presence_penalty", "min_tokens", "stop_token_ids"} <= set(supported)
        assert "suffix" not in supported and "logit_bias" not in supported  # refused: never listed
    with pytest.raises(ParamError, match="unknown generation parameter 'n'"):
        check_model_defaults({"n": 2})
    assert check_model_defaults({"max_new_tokens": 5}).bind(256, 16).max_tokens == 5
