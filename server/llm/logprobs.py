"""OpenAI's logprobs shapes, as vLLM answers them, from the engines' :class:`TokenLogprob` entries.

Completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (each
``top_logprobs`` entry maps token text to logprob: the ``k`` most likely and the chosen one;
the first prompt token of an echo has ``None`` for both). Chat:
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
"""

from __future__ import annotations

from typing import Any

from meshserve.server.llm.types import TokenLogprob

FLOOR = -9999.0  # -inf as vLLM sends it: JSON has no infinity


def _lp(v: float) -> float:
    return max(v, FLOOR)


class CompletionLogprobs:
    """Builds completions' logprobs chunk by chunk; ``text_offset`` runs on across chunks."""

    __slots__ = ("offset",)

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def build(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for e in entries:
            tokens.append(e.text)
            offsets.append(self.offset)
            self.offset += len(e.text)
            if e.logprob is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_lp(e.logprob))
            top = {text: _lp(v) for _, text, v in e.top}
            top.setdefault(e.text, _lp(e.logprob))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}  # fmt: skip


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode())}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {**_chat_token(e.text, e.logprob or 0.0), "top_logprobs": [_chat_token(t, v) for _, t, v in e.top]}
            for e in entries
        ]
    }
