"""The embedded LLM engine: a transformers causal LM under continuous batching.

Two halves, as vLLM's V1 engine: the engine core (:mod:`meshserve.server.llm.core`: the
model and its iteration-level scheduler, token ids in and out) and this front, which stays
in the serving process: tokenization, chat templates, request checks and the queue bound,
incremental detokenization and stop strings, each request's stream of chunks, metrics.

By default the core runs in a child process of its own (``engine_process: true``): the
model's steps never share the interpreter lock with the HTTP and gRPC servers; the front
sends each request and abort as one message and gets one message per step carrying every
sequence's new token (:mod:`meshserve.server.llm.core_client`). A child that dies fails
its requests with 503 (``ModelNotReady``) and is restarted; unload and server shutdown
stop it; its resident memory is the model's size. With ``engine_process: false`` the core
runs on a thread of the serving process instead.

Settings (model ``parameters``): ``engine_process`` (default true), ``max_num_seqs``
(running batch, default 32), ``max_waiting`` (queued requests beyond the batch, default
256; then 503), ``max_model_len`` (default: the model's ``max_position_embeddings``),
``max_num_batched_tokens`` (tokens per step: one per running sequence, the rest for new
prompts, default 128: a wave of prompts is admitted a few per step),
``max_prefill_tokens`` (padded prompt tokens per prefill forward,
default 4096), ``max_prefill_chunk`` (a longer prompt is prefilled this many tokens per
step, one such prompt at a time, while the running batch keeps decoding; default 512, 0:
off), ``device`` (auto|cpu|cuda[:n]|mps), ``dtype`` (float32|float16|bfloat16),
``torch_threads`` (intra-op threads; default: the cores less one, leaving one to the server),
``data_parallel_size`` (default 1: that many cores, each a process with its own copy of the
model, requests spread to the least busy, :class:`~meshserve.server.llm.core_client.ReplicatedCore`),
``fast_forward`` (default true: Llama-family models run on a lean forward with a
preallocated KV cache, :mod:`meshserve.server.llm.fast_llama`; false, or another
architecture: transformers' own forward), ``packed_linear`` (default true: on the CPU in
float32 the fast forward's linear layers run on oneDNN with weights packed once at load, the
dense copies freed; :mod:`meshserve.server.llm.fast_llama`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from meshserve.protocol.errors import CapacityExhausted, ModelExecutionError, ModelLoadError, ModelNotReady
from meshserve.server.llm.api_params import check_params
from meshserve.server.llm.core import (
    DEFAULT_BATCHED_TOKENS,
    CoreRequest,
    RawLogprob,
    TokenOut,
    core_threads,
    cpu_count,
    flag,
    positive,
)
from meshserve.server.llm.core_client import ProcessCore, ReplicatedCore, ThreadCore
from meshserve.server.llm.prompts import adds_special_tokens, apply_chat_template, check_token_ids
from meshserve.server.llm.sequence import EngineStats, GenerationStream, Sequence
from meshserve.server.llm.text import Detokenizer
from meshserve.server.llm.types import GenerationChunk, SamplingParams, TokenLogprob
from meshserve.server.runtimes.hf_import import transformers_with

log = logging.getLogger(__name__)


class TransformersEngine:
    """Continuous-batching generation on a transformers ``AutoModelForCausalLM``."""

    def __init__(self, path: str | Path, name: str, parameters: dict[str, Any] | None = None) -> None:
        p = dict(parameters or {})
        self.path = Path(path)
        self.model_name = name
        self.parameters = p
        self.max_num_seqs = positive(p, "max_num_seqs", 32)
        self.max_waiting = positive(p, "max_waiting", 256, zero_ok=True)
        # The core's own settings, checked here so a bad value fails the load before any process starts.
        positive(p, "max_prefill_tokens", 4096)
        positive(p, "max_prefill_chunk", 512, zero_ok=True)
        positive(p, "max_num_batched_tokens", DEFAULT_BATCHED_TOKENS)
        own = flag(p, "engine_process", True)
        self.own_process = own
        self.replicas = positive(p, "data_parallel_size", 1)
        if self.replicas > 1 and not own:
            raise ModelLoadError("data_parallel_size > 1 needs engine_process: true (each copy is a process)")
        if self.replicas > cpu_count():
            raise ModelLoadError(f"data_parallel_size {self.replicas} is more than this machine's {cpu_count()} cores")
        flag(p, "fast_forward", True)  # checked here too: a bad value fails before a core process starts
        flag(p, "packed_linear", True)
        self.forward = ""  # the core's forward: "fast" (Llama family) or "transformers"
        self.max_model_len = 0
        self.counters = EngineStats()
        self.observer: Any = None  # metrics hooks: on_first_token(s), on_step(s), on_finish(prompt, completion, s)
        self.tokenizer: Any = None
        self.device: Any = None
        self.core: ThreadCore | ProcessCore | ReplicatedCore | None = None
        self._seqs: dict[int, Sequence] = {}  # the live sequences by key: queued, running or in a step
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running_core = False
        self._stopping = False
        self._unavailable: str | None = None  # why requests get 503 now (the core process is restarting)
        self._restart: asyncio.Task | None = None
        self._texts: dict[int, str] = {}  # token id -> its text (logprobs), decoded once

    # -- loading -------------------------------------------------------------
    def _load_tokenizer(self) -> None:
        transformers = transformers_with("AutoTokenizer")

        if not (self.path / "config.json").is_file():
            raise ModelLoadError(f"{self.path.name} has no config.json; save the model with save_pretrained")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"cannot load a tokenizer from {self.path.name}: {type(e).__name__}: {e}") from None
        backend = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "decode"):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_core(self) -> ThreadCore | ProcessCore | ReplicatedCore:
        eos = self.tokenizer.eos_token_id
        extra = (eos,) if isinstance(eos, int) else ()
        if self.replicas > 1:
            p = dict(self.parameters)
            p["torch_threads"] = core_threads(p.get("torch_threads"), self.replicas)
            return ReplicatedCore([ProcessCore(self.path, self.model_name, p, extra) for _ in range(self.replicas)])
        kind = ProcessCore if self.own_process else ThreadCore
        return kind(self.path, self.model_name, self.parameters, extra)

    def size_bytes(self) -> int:
        return self.core.size_bytes() if self.core is not None else 0

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        if self._running_core:
            return
        if self.tokenizer is None:
            await asyncio.to_thread(self._load_tokenizer)
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        core = self._new_core()
        info = await core.start(self._on_message)
        self._started(core, info)

    def _started(self, core: ThreadCore | ProcessCore | ReplicatedCore, info: dict[str, Any]) -> None:
        import torch

        self.core = core
        self.max_model_len = int(info["max_model_len"])
        self.eos_ids = frozenset(info["eos_ids"])
        self.vocab_size = int(info["vocab_size"]) or len(self.tokenizer)
        self.device = torch.device(info["device"])
        self.forward = info["forward"]
        self._running_core = True
        self._unavailable = None

    async def stop(self) -> None:
        self._stopping = True
        self._running_core = False
        restart, self._restart = self._restart, None
        if restart is not None:
            restart.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await restart
        core, self.core = self.core, None
        if core is not None:
            await core.stop()
        self._fail_all(ModelExecutionError(f"model {self.model_name!r} was unloaded"))

    def _fail_all(self, error: Exception) -> None:
        seqs, self._seqs = list(self._seqs.values()), {}
        for seq in seqs:
            seq.finished = True
            seq.queue.put_nowait(error)
        self._sync_gauges()

    # -- requests --------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return apply_chat_template(self.tokenizer, self.model_name, messages, add_generation_prompt)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            special = adds_special_tokens(self.tokenizer, prompt)
            return list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])
        return check_token_ids(prompt, self.vocab_size)

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        """Check and queue at once (errors raise here, before any iteration), then stream chunks."""
        if not self._running_core or self._stopping:
            raise ModelExecutionError(f"model {self.model_name!r}: the engine is not running")
        if self._unavailable is not None:
            raise ModelNotReady(self._unavailable)
        ids = self.tokenize(prompt)
        check_params(params, self.max_model_len, len(ids))
        if len(self._seqs) >= self.max_num_seqs + self.max_waiting:
            self.counters.rejected += 1
            c = self.counters
            raise CapacityExhausted(
                f"model {self.model_name!r} is at capacity ({c.running} running, {c.waiting} waiting; "
                f"max_num_seqs {self.max_num_seqs}, max_waiting {self.max_waiting}); retry later"
            )
        budget = min(params.max_tokens, self.max_model_len - len(ids))
        key = next(self._keys)
        seq = Sequence(request_id, key, ids, params)
        seq.detok = Detokenizer(self._decode, ids)
        self._seqs[key] = seq
        self.counters.waiting += 1
        assert self.core is not None
        self.core.send(("add", CoreRequest(key, ids, params, budget)))
        return GenerationStream(self, seq)

    def _abort(self, seq: Sequence) -> None:
        if seq.aborted:
            return
        seq.aborted = True
        seq.finished = True
        self.counters.requests_aborted += 1
        if self._seqs.pop(seq.key, None) is not None and self.core is not None:
            self.core.send(("abort", seq.key))  # out of the queue, or its row leaves at the next step
        self._sync_gauges()

    def stats(self) -> dict[str, float]:
        c = self.counters
        return {
            "prompt_tokens": c.prompt_tokens,
            "generation_tokens": c.generation_tokens,
            "requests_finished": c.requests_finished,
            "requests_aborted": c.requests_aborted,
            "requests_rejected": c.rejected,
            "steps": c.steps,
            "running": c.running,
            "waiting": c.waiting,
        }

    def _sync_gauges(self) -> None:
        """Running: sequences that got a token; waiting: the others (queued or being prefilled)."""
        running = sum(1 for s in self._seqs.values() if s.generated)
        self.counters.running = running
        self.counters.waiting = len(self._seqs) - running

    # -- the core's messages (on the event loop) ---------------------------------
    def _on_message(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "step":
            _, outs, decode_s, (prompt_tokens, generation_tokens, steps) = msg
            c = self.counters
            c.prompt_tokens, c.generation_tokens, c.steps = prompt_tokens, generation_tokens, steps
            if decode_s is not None and self.observer is not None:  # one inter-token gap per decoding step
                self.observer.on_step(decode_s)
            now = time.perf_counter()
            for out in outs:
                seq = self._seqs.get(out[0])
                if seq is not None:  # else aborted while the step ran: its token is dropped with it
                    self._deliver(seq, out, now)
            self._sync_gauges()
        elif kind == "failed":
            _, keys, message = msg
            log.error("model %s: decoding step failed: %s", self.model_name, message)
            err = ModelExecutionError(f"model {self.model_name!r} failed: {message}")
            for key in keys:
                seq = self._seqs.pop(key, None)
                if seq is not None:
                    seq.finished = True
                    seq.queue.put_nowait(err)
            self._sync_gauges()
        elif kind == "died" and not self._stopping:
            why = f"model {self.model_name!r}: the engine process died ({msg[1]}); it is restarting, retry shortly"
            self._unavailable = why
            self._fail_all(ModelNotReady(why))
            old, self.core = self.core, None
            self._restart = asyncio.get_running_loop().create_task(self._restart_core(old))

    async def _restart_core(self, old: ThreadCore | ProcessCore | ReplicatedCore | None) -> None:
        if old is not None:
            await old.stop()
        core = self._new_core()
        try:
            info = await core.start(self._on_message)
        except Exception as e:
            self._unavailable = f"model {self.model_name!r}: the engine process died and did not restart: {e}"
            log.error("%s", self._unavailable)
            return
        if self._stopping:
            await core.stop()
            return
        log.warning("model %s: the engine process was restarted", self.model_name)
        self._started(core, info)

    def _deliver(self, seq: Sequence, out: TokenOut, now: float) -> None:
        """A token's text (incremental detokenization, stop strings) and its chunk."""
        key, tok, core_reason, lp, prompt_lps = out
        seq.generated += 1
        obs = self.observer
        if seq.first_token_at == 0.0:
            seq.first_token_at = now
            if obs is not None:
                obs.on_first_token(now - seq.arrival)
        p = seq.params
        assert seq.detok is not None
        reason = None
        early = seq.generated <= p.min_tokens  # no stop string ends it before min_tokens
        if core_reason == "stop":  # EOS or a stop token: its own text is not sent
            text, reason = seq.detok.flush(), "stop"
            text, hit = seq.stops.feed(text)
            text += "" if hit else seq.stops.flush()
        else:
            text, hit = seq.detok.add(tok), False
            if not early:
                text, hit = seq.stops.feed(text)
            if hit:
                reason = "stop"
                if core_reason is None and self.core is not None:
                    self.core.send(("abort", key))
            elif core_reason == "length":
                tail = seq.detok.flush()
                if not early:
                    tail, hit = seq.stops.feed(tail)
                    tail += "" if hit else seq.stops.flush()
                text += tail
                reason = "stop" if hit else "length"
        if reason is not None:
            seq.finished = True
            del self._seqs[key]
            self.counters.requests_finished += 1
            if obs is not None:
                obs.on_finish(len(seq.prompt_ids), seq.generated, now - seq.arrival)
        chunk = GenerationChunk(text, [tok], reason, len(seq.prompt_ids), seq.generated)
        if lp is not None:
            chunk.logprobs = [self._logprob(lp)]
        if prompt_lps is not None:
            chunk.prompt_logprobs = [self._logprob(e) for e in prompt_lps]
        seq.queue.put_nowait(chunk)

    def _logprob(self, raw: RawLogprob) -> TokenLogprob:
        token, logprob, top = raw
        return TokenLogprob(token, self._token_text(token), logprob, [(i, self._token_text(i), v) for i, v in top])

    def _token_text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text
