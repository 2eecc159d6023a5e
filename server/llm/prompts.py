"""Prompt handling both engines share: the chat template, the BOS rule, token-id checks."""

from __future__ import annotations

from typing import Any

from meshserve.protocol.errors import InvalidInput


def apply_chat_template(
    tokenizer: Any, model_name: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> str:
    """The model's chat template applied to ``messages``; a model without one, or messages the
    template rejects, are the client's error (400)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(f"model {model_name!r} has no chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise InvalidInput(f"cannot apply the chat template: {type(e).__name__}: {e}") from None


def adds_special_tokens(tokenizer: Any, prompt: str) -> bool:
    """A chat template usually writes the BOS itself: do not add a second one."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and prompt.startswith(bos))


def check_token_ids(prompt: Any, vocab_size: int) -> list[int]:
    """A prompt given as token ids: a list of ints, each inside the vocabulary."""
    if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise InvalidInput("a prompt is a string or a list of token ids")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidInput(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return list(prompt)
