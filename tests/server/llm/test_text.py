"""Incremental detokenization (multi-byte UTF-8 split across tokens) and stop strings."""

from __future__ import annotations

import pytest
from meshserve.server.llm.text import Detokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def stream(tokenizer, ids, prompt_ids=()):
    detok = Detokenizer(lambda x: tokenizer.decode(x, skip_special_tokens=True), list(prompt_ids))
    parts = [detok.add(t) for t in ids]
    parts.append(detok.flush())
    return parts


def test_characters_split_across_byte_tokens_come_out_whole(tokenizer):
    text = "a😀b東京🚀ü"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text)  # some characters really are split over several tokens
    parts = stream(tokenizer, ids, tokenizer("Hello")["input_ids"])
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)
    assert "" in parts  # a token that only began a character sent nothing


def test_a_truncated_character_is_flushed_as_replacement(tokenizer):
    ids = tokenizer("x😀")["input_ids"]
    parts = stream(tokenizer, ids[:-1])
    assert "".join(parts).startswith("x") and "".join(parts).endswith("\ufffd")


def test_stop_matcher_across_feeds():
    m = StopMatcher(["END", "stop!"])
    assert m.feed("hello E") == ("hello ", False)  # "E" may begin "END": held back
    assert m.feed("N") == ("", False)
    assert m.feed("Dx") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("xyz") == ("Exyz", False)  # not a stop after all: released
    assert m.flush() == ""
    m = StopMatcher(["ab"])
    assert m.feed("xa") == ("x", False)
    assert m.flush() == "a"


def test_earliest_stop_wins():
    m = StopMatcher(["cd", "b"])
    assert m.feed("abcd") == ("a", True)
