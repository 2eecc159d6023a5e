"""Incremental detokenization and stop strings, per sequence.

A token can end in the middle of a UTF-8 character (byte-level BPE splits multi-byte
characters across tokens): :class:`Detokenizer` emits text only once the decoded tail
is a whole character, as TGI and vLLM do (decode a short window of recent tokens,
compare against the window without the newest ones).

A stop string can span several tokens: :class:`StopMatcher` holds back the longest
tail of the text that could still begin a stop string and cuts the text where a stop
string starts, so the stop string itself is never sent.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded with the first new ones, so leading spaces come out right


class Detokenizer:
    __slots__ = ("decode", "ids", "prefix", "read")

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int]) -> None:
        self.decode = decode
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        """The new text that ``token`` completes ("" while a character is still partial)."""
        self.ids.append(token)
        return self._step(final=False)

    def flush(self) -> str:
        """What remains at the end of the sequence (a trailing partial character as U+FFFD)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self.read >= len(self.ids):
            return ""
        before = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if len(text) > len(before) and (final or not text.endswith(REPLACEMENT)):
            new = text[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            if self.prefix > 64:  # keep the window short: only ids[prefix:] are ever decoded
                del self.ids[: self.prefix]
                self.read -= self.prefix
                self.prefix = 0
            return new
        return ""


class StopMatcher:
    __slots__ = ("stops", "held")

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.held = ""
            return buf[:cut], True
        keep = 0
        for s in self.stops:  # the longest tail of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
