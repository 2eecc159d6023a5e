"""How endpoints reach an engine: the model's lease, one running sequence, its chunks.

The model is looked up and loaded through the mesh cache exactly as ``infer``
does, and the lease is held until the sequence ends, so a model is never
evicted under a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from meshserve.protocol.errors import InferenceError, InvalidInput, ModelExecutionError, ServerNotReady
from meshserve.server.llm.api_params import Sampling, model_defaults
from meshserve.server.llm.types import GenerationChunk, LLMEngine, SamplingParams

if TYPE_CHECKING:
    from meshserve.server.dataplane import DataPlane
    from meshserve.server.loaded_model import LoadedModel

log = logging.getLogger(__name__)

LLM_RUNTIMES = frozenset({"llm", "vllm"})
CLIENT_GONE = 499  # nginx's "client closed request": logged, never received

Prompt = str | list[int]
# (engine, the model's generation defaults) -> (prompt, parameters)
Build = Callable[[LLMEngine, Sampling | None], tuple[Prompt, SamplingParams]]


PARSED_BODY = "meshserve.json"  # ASGI scope key: the body's JSON object, when the front decoded it


async def request_object(request: Any) -> dict[str, Any]:
    """The request's JSON object: the one the front decoded to route it, else the body's."""
    doc = request.scope.get(PARSED_BODY)
    if doc is not None:
        return doc
    from meshserve.protocol.rest_codec import loads_object

    return loads_object(await request.body())


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def engine_of(loaded: LoadedModel, name: str) -> LLMEngine:
    engine = getattr(loaded.model, "engine", None)
    if engine is None:
        raise InvalidInput(f"model {name!r} does not support generate (it is not a language model)")
    return engine


def is_llm(entry: Any) -> bool:
    """A registered model served by an LLM engine (asked without loading it)."""
    handle = entry.handle
    if handle is not None:
        return getattr(handle.model, "engine", None) is not None
    spec = entry.spec
    runtime = getattr(spec, "runtime", None)
    if runtime:
        return runtime in LLM_RUNTIMES
    uri = getattr(spec, "uri", None)
    if not uri or getattr(spec, "implementation", None) or "://" in uri:
        return False
    from meshserve.server.runtimes.files import runtimes_for_dir  # a local folder: what its files say

    return any(r in LLM_RUNTIMES for r in runtimes_for_dir(Path(uri)))


def is_llm_model(dp: DataPlane, name: str, version: str | None) -> bool:
    try:
        entry = dp.cache.get(dp.repository.resolve(name, version))
    except InferenceError:
        return False
    return entry is not None and is_llm(entry)


class Generation:
    """One sequence running on an engine, started (its first chunk is in) and not yet closed."""

    def __init__(self, stack: AsyncExitStack, loaded: LoadedModel, it: AsyncIterator[GenerationChunk],
                 first: GenerationChunk) -> None:  # fmt: skip
        self._stack = stack
        self.loaded = loaded
        self.model_name = loaded.name
        self.model_version = loaded.version
        self._it = it
        self.first = first

    @classmethod
    async def start(
        cls, dp: DataPlane, name: str, version: str | None, build: Build, rid: str, text_input: bool = False
    ) -> Generation:
        """Errors before the first token (unknown model, bad parameters, a prompt past the
        context, a full queue) raise here, while the endpoint can still answer with a status.
        ``text_input``: the prompt is an OIP text_input, which the model may put through its
        chat template (``parameters.chat``); OpenAI prompts and chats are taken as they are."""
        stack = AsyncExitStack()
        try:
            if dp.stopping:  # as infer: requests still arriving while draining are served
                raise ServerNotReady("server is shutting down")
            key = dp.repository.resolve(name, version)
            loaded = await stack.enter_async_context(dp.cache.acquire(key))
            engine = engine_of(loaded, name)
            defaults = model_defaults(loaded.model.settings.parameters.get("generation"))
            prompt, params = build(engine, defaults)
            wrap = getattr(loaded.model, "text_prompt", None) if text_input else None
            if wrap is not None and isinstance(prompt, str):
                prompt = wrap(engine, prompt)
            it = engine.generate(prompt, params, rid)
            stack.push_async_callback(_aclose, it)
            try:
                first = await anext(it)
            except StopAsyncIteration:
                raise ModelExecutionError(f"model {name!r} ended the sequence without any output") from None
            except InferenceError:
                raise
            except Exception as e:
                log.exception("generation on %s failed", name)
                raise ModelExecutionError(f"model {name!r} failed: {type(e).__name__}: {e}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        return cls(stack, loaded, it, first)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """Every chunk, the first included; closes the sequence when done, failed or abandoned."""
        try:
            yield self.first
            if self.first.finish_reason is not None:
                return
            async for chunk in self._it:
                yield chunk
                if chunk.finish_reason is not None:
                    return
        except InferenceError:
            raise
        except Exception as e:
            log.exception("generation on %s failed", self.model_name)
            raise ModelExecutionError(f"model {self.model_name!r} failed: {type(e).__name__}: {e}") from None
        finally:
            await self.close()

    async def collect(self) -> Completed:
        parts: list[str] = []
        last = self.first
        logprobs: list[Any] | None = [] if self.first.logprobs is not None else None
        async for chunk in self.chunks():
            parts.append(chunk.text)
            if logprobs is not None and chunk.logprobs is not None:
                logprobs.extend(chunk.logprobs)
            last = chunk
        done = Completed("".join(parts), last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens)
        done.logprobs, done.prompt_logprobs = logprobs, self.first.prompt_logprobs
        return done

    async def collect_while_connected(self, receive: Callable[[], Any]) -> Completed:
        """``collect``, dropping the sequence as soon as the HTTP client goes away
        (``receive`` is the request's ASGI receive, its body already read)."""
        (done,) = await collect_all_while_connected([self], receive)
        return done

    async def close(self) -> None:
        # Shielded: a stream cancelled on disconnect (anyio cancels every await in
        # its scope) must still drop the sequence and give back the lease.
        with anyio.CancelScope(shield=True):
            await self._stack.aclose()


async def start_all(starts: list[Awaitable[Generation]]) -> list[Generation]:
    """Start several sequences together (one prefill batch); if one fails, close the others."""
    if len(starts) == 1:
        return [await starts[0]]
    results = await asyncio.gather(*starts, return_exceptions=True)
    gens = [r for r in results if isinstance(r, Generation)]
    failed = [r for r in results if not isinstance(r, Generation)]
    if failed:
        for g in gens:
            await g.close()
        raise failed[0]
    return gens


async def collect_all_while_connected(gens: list[Generation], receive: Callable[[], Any]) -> list[Completed]:
    """Every sequence's whole answer; all are dropped if one fails or the client goes away."""
    tasks = [asyncio.ensure_future(g.collect()) for g in gens]
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                raise ClientGone()
            pending.discard(watch)
            for t in done:
                t.result()  # the first failure ends them all
        return [t.result() for t in tasks]
    finally:
        watch.cancel()
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def merged_chunks(gens: list[Generation]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """(index, chunk) of several sequences as they come; one failing ends them all."""
    if len(gens) == 1:
        async for chunk in gens[0].chunks():
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for chunk in g.chunks():
                queue.put_nowait((i, chunk, None))
            queue.put_nowait((i, None, None))
        except Exception as e:
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                remaining -= 1
            else:
                yield i, chunk
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready (nobody to answer)."""


async def _disconnected(receive: Callable[[], Any]) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


class Completed:
    __slots__ = ("text", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs", "prompt_logprobs")

    def __init__(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.text = text
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.logprobs: list[Any] | None = None  # TokenLogprob per generated token, when asked for
        self.prompt_logprobs: list[Any] | None = None


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def chat_prompt(engine: LLMEngine, messages: list[dict[str, Any]]) -> str:
    """The tokenizer's chat template applied; a model without one is a 400."""
    try:
        return engine.apply_chat_template(messages, add_generation_prompt=True)
    except InferenceError:
        raise
    except Exception as e:
        raise InvalidInput(f"model {engine.model_name!r} cannot format chat messages: {e}") from None
