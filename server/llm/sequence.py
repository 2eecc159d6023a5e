"""One request's state in the embedded engine, the engine's counters, and the stream of
chunks a caller reads (its close or loss aborts the sequence)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from meshserve.server.llm.text import Detokenizer, StopMatcher
from meshserve.server.llm.types import GenerationChunk, SamplingParams

if TYPE_CHECKING:
    from meshserve.server.llm.engine import TransformersEngine


class Sequence:
    """One request's state on the serving side: its stream, detokenizer and stop strings
    (the engine core holds the rest)."""

    __slots__ = ("id", "key", "prompt_ids", "params", "queue", "generated", "detok", "stops", "finished",
                 "aborted", "arrival", "first_token_at")  # fmt: skip

    def __init__(self, rid: str, key: int, prompt_ids: list[int], params: SamplingParams) -> None:
        self.id = rid
        self.key = key  # the core's name for it
        self.prompt_ids = prompt_ids
        self.params = params
        self.queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self.generated = 0
        self.detok: Detokenizer | None = None
        self.stops = StopMatcher(params.stop)
        self.finished = False
        self.aborted = False
        self.arrival = time.perf_counter()
        self.first_token_at = 0.0


class EngineStats:
    """Plain counters read at scrape time (no metrics cost on the decode path)."""

    __slots__ = ("prompt_tokens", "generation_tokens", "requests_finished", "requests_aborted", "steps",
                 "rejected", "running", "waiting")  # fmt: skip

    def __init__(self) -> None:
        self.prompt_tokens = self.generation_tokens = self.requests_finished = self.requests_aborted = 0
        self.steps = self.rejected = self.running = self.waiting = 0


class GenerationStream:
    """The chunks of one sequence. ``aclose()``, a cancelled ``__anext__`` or dropping the
    stream (even one never iterated) takes the sequence out of the queue or batch at once."""

    __slots__ = ("_engine", "_seq", "_closed")

    def __init__(self, engine: TransformersEngine, seq: Sequence) -> None:
        self._engine = engine
        self._seq = seq
        self._closed = False

    @property
    def request_id(self) -> str:
        return self._seq.id

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._closed:
            raise StopAsyncIteration
        seq = self._seq
        try:
            item = await seq.queue.get()
        except BaseException:  # cancelled: the client went away
            self._close()
            raise
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        while item.finish_reason is None and not seq.queue.empty():  # a slow reader: merge what piled up
            more = seq.queue.get_nowait()
            if isinstance(more, BaseException):
                self._closed = True
                raise more
            item = _merge(item, more)
        if item.finish_reason is not None:
            self._closed = True
        return item

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._seq.finished:
                self._engine._abort(self._seq)

    def __del__(self) -> None:
        if not self._closed and not self._seq.finished:
            loop = self._engine._loop
            if loop is not None and not loop.is_closed():  # collected on any thread: abort on the loop
                loop.call_soon_threadsafe(self._engine._abort, self._seq)


def _merge(a: GenerationChunk, b: GenerationChunk) -> GenerationChunk:
    logprobs = a.logprobs + b.logprobs if a.logprobs is not None and b.logprobs is not None else None
    return GenerationChunk(
        a.text + b.text, a.token_ids + b.token_ids, b.finish_reason, b.prompt_tokens, b.completion_tokens,
        logprobs, a.prompt_logprobs,
    )  # fmt: skip
