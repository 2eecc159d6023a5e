"""The embedded LLM engine: a transformers causal LM under continuous batching.

Iteration-level scheduling, as Orca and vLLM do it, on plain transformers:

* one scheduler task on the event loop; each step runs on one worker thread
  (the loop never blocks on the model) and does, in order:
  - drop the rows of sequences that finished or were aborted since the last step;
  - one decode forward over the running batch (one new token for every row);
  - one prefill forward over the requests admitted at this step (left-padded
    together), whose last logits give each its first token;
  - the prefilled rows join the running batch for the next step.
* the running batch's KV cache is a transformers ``DynamicCache`` held left-padded:
  keys/values ``[rows, kv_heads, T, head_dim]`` with a ``[rows, T]`` attention mask
  and per-row position ids. Rows join by left-padding the shorter side and
  concatenating; rows leave by ``index_select``, and columns no row uses any more
  are trimmed off the left.
* every sequence keeps its own sampling settings (its own ``torch.Generator`` when
  seeded; repetition, presence and frequency penalties; EOS and ``stop_token_ids``
  masked until ``min_tokens``), stop strings and stop tokens, token budget and
  incremental detokenizer; finished rows leave the batch in the same step.
* chunked prefill: a prompt longer than ``max_prefill_chunk`` fills a KV cache of its own,
  one chunk per step after that step's decode, so running sequences never stall behind it
  for a whole long prefill; after its last chunk it samples its first token and joins.
* logprobs (when asked) are the raw log-softmax of the row's logits, before penalties
  and temperature, as vLLM's; prompt logprobs need every position's logits, so each
  such prompt gets a prefill forward of its own (the others keep only the last position).

Greedy decoding under batching equals unbatched ``model.generate`` token for token
(tested): masked columns contribute exact zeros, so only float summation order can
differ.

Settings (model ``parameters``): ``max_num_seqs`` (running batch, default 32),
``max_waiting`` (queued requests beyond the batch, default 256; then 503),
``max_model_len`` (default: the model's ``max_position_embeddings``),
``max_prefill_tokens`` (padded prompt tokens per prefill forward, default 4096),
``max_prefill_chunk`` (a longer prompt is prefilled this many tokens per step, one such
prompt at a time, while the running batch keeps decoding; default 512, 0: off),
``device`` (auto|cpu|cuda[:n]|mps), ``dtype`` (float32|float16|bfloat16),
``torch_threads`` (intra-op threads, process-wide; default: the cores less one).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from meshserve.protocol.errors import CapacityExhausted, ModelExecutionError, ModelLoadError
from meshserve.server.llm.api_params import check_params
from meshserve.server.llm.prompts import adds_special_tokens, apply_chat_template, check_token_ids
from meshserve.server.llm.sequence import EngineStats, GenerationStream, Sequence
from meshserve.server.llm.text import Detokenizer
from meshserve.server.llm.types import GenerationChunk, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": None}  # fmt: skip


class TransformersEngine:
    """Continuous-batching generation on a transformers ``AutoModelForCausalLM``."""

    def __init__(self, path: str | Path, name: str, parameters: dict[str, Any] | None = None) -> None:
        p = dict(parameters or {})
        self.path = Path(path)
        self.model_name = name
        self.max_num_seqs = _positive(p, "max_num_seqs", 32)
        self.max_waiting = _positive(p, "max_waiting", 256, zero_ok=True)
        self.max_prefill_tokens = _positive(p, "max_prefill_tokens", 4096)
        self.max_prefill_chunk = _positive(p, "max_prefill_chunk", 512, zero_ok=True)
        self._max_model_len_setting = p.get("max_model_len")
        self._device_setting = str(p.get("device", "auto"))
        self._dtype_setting = p.get("dtype")
        self._threads = p.get("torch_threads")
        self.max_model_len = 0
        self.counters = EngineStats()
        self.observer: Any = None  # metrics hooks: on_first_token(s), on_step(s), on_finish(prompt, completion, s)
        self.tokenizer: Any = None
        self.model: Any = None
        self._waiting: deque[Sequence] = deque()
        self._rows: list[Sequence] = []  # the running batch, in KV-cache row order (worker thread)
        self._cache: Any = None
        self._mask: Any = None
        # Chunked prefill: one long prompt at a time, a chunk per step, in a KV cache of its own.
        self._chunking: Sequence | None = None
        self._chunk_cache: Any = None
        self._chunk_done = 0  # prompt tokens already in _chunk_cache
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._texts: dict[int, str] = {}  # token id -> its text (logprobs), decoded once

    # -- loading -------------------------------------------------------------
    def load(self) -> None:
        """Read the tokenizer and model (blocking; call on a worker thread)."""
        import torch
        import transformers

        # Leave one core to the event loop (HTTP, gRPC, detokenized chunks), as vLLM's CPU
        # backend reserves one: with every core in the intra-op team, each small op waits for
        # a descheduled thread whenever anything else runs (20x slower steps on 2 busy cores).
        threads = int(self._threads) if self._threads else max(1, (os.cpu_count() or 2) - 1)
        if self._threads or threads < torch.get_num_threads():
            torch.set_num_threads(threads)
        if not (self.path / "config.json").is_file():
            raise ModelLoadError(f"{self.path.name} has no config.json; save the model with save_pretrained")
        dtype_name = DTYPES.get(str(self._dtype_setting).lower()) if self._dtype_setting else None
        if self._dtype_setting and str(self._dtype_setting).lower() not in DTYPES:
            raise ModelLoadError(f"unknown dtype {self._dtype_setting!r}; expected one of {', '.join(DTYPES)}")
        device = _pick_device(torch, self._device_setting)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype_name:
            kwargs["dtype"] = getattr(torch, dtype_name)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(self.path), **kwargs)
        except Exception as e:
            raise ModelLoadError(f"cannot load a causal LM from {self.path.name}: {type(e).__name__}: {e}") from None
        self.model = model.to(device).eval()
        self.device = device
        self._torch = torch
        self._cache_cls = transformers.DynamicCache
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or 2048
        if self._max_model_len_setting is not None:
            wanted = int(self._max_model_len_setting)
            if not 0 < wanted <= limit:
                raise ModelLoadError(f"max_model_len {wanted} must be in [1, {limit}] for this model")
            limit = wanted
        self.max_model_len = int(limit)
        fwd = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in fwd else "past_key_values"
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in fwd else None
        self._cache_takes_config = "config" in inspect.signature(transformers.DynamicCache.__init__).parameters
        if not hasattr(self._new_cache(), "layers"):
            raise ModelLoadError(f"the llm engine needs transformers >= 4.56 (found {transformers.__version__})")
        eos = set()
        for source in (getattr(model, "generation_config", None), config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                eos.update([value] if isinstance(value, int) else value)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(eos) if eos else 0)
        self.vocab_size = int(getattr(config, "vocab_size", len(self.tokenizer)))
        backend = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "decode"):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)

    def size_bytes(self) -> int:
        if self.model is None:
            return 0
        return sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        if self.model is None:
            await asyncio.to_thread(self.load)
        if self._task is not None:
            return
        self._stopping = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"llm-{self.model_name}")
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"llm-scheduler-{self.model_name}")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._executor is not None:  # a step in flight finishes first
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True)
        gone = ModelExecutionError(f"model {self.model_name!r} was unloaded")
        for seq in [*self._waiting, *self._rows, *self._chunked()]:
            if not seq.finished:
                seq.finished = True
                seq.queue.put_nowait(gone)
        self._waiting.clear()
        self._rows = []
        self._end_chunking()
        self._cache = self._mask = None
        self._sync_gauges()
        on_gpu = getattr(self, "device", None) is not None and self.device.type == "cuda"
        self.model = None
        if on_gpu:
            self._torch.cuda.empty_cache()

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
        if self._task is None or self._stopping:
            raise ModelExecutionError(f"model {self.model_name!r}: the engine is not running")
        ids = self.tokenize(prompt)
        check_params(params, self.max_model_len, len(ids))
        running = self._running()
        if running + len(self._waiting) >= self.max_num_seqs + self.max_waiting:
            self.counters.rejected += 1
            raise CapacityExhausted(
                f"model {self.model_name!r} is at capacity ({running} running, {len(self._waiting)} waiting; "
                f"max_num_seqs {self.max_num_seqs}, max_waiting {self.max_waiting}); retry later"
            )
        budget = min(params.max_tokens, self.max_model_len - len(ids))
        seq = Sequence(request_id, ids, params, budget)
        self._waiting.append(seq)
        self.counters.waiting = len(self._waiting)
        assert self._wake is not None
        self._wake.set()
        return GenerationStream(self, seq)

    def _abort(self, seq: Sequence) -> None:
        if seq.aborted:
            return
        seq.aborted = True
        seq.finished = True
        self.counters.requests_aborted += 1
        with contextlib.suppress(ValueError):
            self._waiting.remove(seq)
        self._sync_gauges()  # it no longer counts; its row goes at the next step boundary
        if self._wake is not None:
            self._wake.set()

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
        self.counters.running = self._running()
        self.counters.waiting = len(self._waiting)

    def _running(self) -> int:
        """Sequences holding a batch slot: the running rows and a prompt being prefilled in chunks."""
        return sum(1 for s in [*self._rows, *self._chunked()] if not s.finished)

    def _chunked(self) -> list[Sequence]:
        return [] if self._chunking is None else [self._chunking]

    def _end_chunking(self) -> None:
        self._chunking, self._chunk_cache, self._chunk_done = None, None, 0

    # -- the scheduler -------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self._rows and not self._waiting and self._chunking is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            new = self._admit()
            if not new and not self._rows and self._chunking is None:
                continue
            try:
                out = await loop.run_in_executor(self._executor, self._step, new)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed step fails its sequences; the engine keeps serving
                log.exception("model %s: decoding step failed", self.model_name)
                err = ModelExecutionError(f"model {self.model_name!r} failed: {type(e).__name__}: {e}")
                for seq in [*self._rows, *new, *self._chunked()]:
                    if not seq.finished:
                        seq.finished = True
                        seq.queue.put_nowait(err)
                self._rows, self._cache, self._mask = [], None, None
                self._end_chunking()
                self._sync_gauges()
                continue
            for seq, chunk in out:
                seq.queue.put_nowait(chunk)
            self._sync_gauges()
            if not out:
                await asyncio.sleep(0)

    def _admit(self) -> list[Sequence]:
        """The waiting sequences that join at this step, in arrival order. A prompt longer than
        ``max_prefill_chunk`` becomes the one prefilled in chunks (when none is), so running
        rows keep decoding meanwhile; the queue behind it waits for its turn."""
        room = self.max_num_seqs - self._running()
        new: list[Sequence] = []
        longest = 0
        while self._waiting and len(new) < room:
            seq = self._waiting[0]
            if seq.finished:
                self._waiting.popleft()
                continue
            if self.max_prefill_chunk and len(seq.prompt_ids) > self.max_prefill_chunk:
                if self._chunking is not None:
                    break
                self._chunking = self._waiting.popleft()
                room -= 1
                continue
            longest2 = max(longest, len(seq.prompt_ids))
            if new and longest2 * (len(new) + 1) > self.max_prefill_tokens:
                break
            longest = longest2
            new.append(self._waiting.popleft())
        self.counters.waiting = len(self._waiting)
        return new

    # -- one step on the worker thread ---------------------------------------
    def _step(self, new: list[Sequence]) -> list[tuple[Sequence, GenerationChunk]]:
        torch = self._torch
        out: list[tuple[Sequence, GenerationChunk]] = []
        with torch.inference_mode():
            self._drop_finished()
            if self._rows:
                started = time.perf_counter()
                rows = self._rows
                ids = torch.tensor([[s.last] for s in rows], device=self.device)
                pos = torch.tensor([[s.pos] for s in rows], device=self.device)
                self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
                logits = self._forward(ids, self._mask, pos, self._cache)
                self._emit(rows, logits, out)
                if self.observer is not None:  # every row got its next token: one inter-token gap per step
                    self.observer.on_step(time.perf_counter() - started)
            if new:
                for seq in new:
                    self._prepare(seq)
                # Prompt logprobs need every position's logits ([T, vocab]): each such prompt gets a
                # prefill of its own, so the logits held at once stay one prompt's (or one chunk's).
                plain = [s for s in new if s.params.prompt_logprobs is None]
                if plain:
                    self._prefill(plain, out, keep_all=False)
                for seq in new:
                    if seq.params.prompt_logprobs is not None:
                        self._prefill([seq], out, keep_all=True)
            if self._chunking is not None:
                self._prefill_chunk(out)
            self._drop_finished()
        self.counters.steps += 1
        return out

    def _prefill(self, new: list[Sequence], out: list[tuple[Sequence, GenerationChunk]], keep_all: bool) -> None:
        """One forward over the new prompts (left-padded together); their rows join the batch."""
        torch = self._torch
        width = max(len(s.prompt_ids) for s in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, s in enumerate(new):
            n = len(s.prompt_ids)
            ids[i, width - n :] = torch.tensor(s.prompt_ids)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = self._new_cache()
        logits = self._forward(ids, mask, pos, cache, keep_all)
        if keep_all:
            for i, s in enumerate(new):
                n = len(s.prompt_ids)
                lps = logits[i, width - n : width - 1].float().log_softmax(-1)
                k = s.params.prompt_logprobs or 0
                first = TokenLogprob(s.prompt_ids[0], self._token_text(s.prompt_ids[0]), None, [])
                s.prompt_lps = [first] + [self._logprob(lps[j], s.prompt_ids[j + 1], k) for j in range(n - 1)]
            logits = logits[:, -1, :]
        self.counters.prompt_tokens += sum(len(s.prompt_ids) for s in new)
        self._emit(new, logits, out)
        self._join(new, cache, mask)

    def _prefill_chunk(self, out: list[tuple[Sequence, GenerationChunk]]) -> None:
        """The next ``max_prefill_chunk`` tokens of the long prompt; after its last chunk, its
        first token is sampled and it joins the running batch."""
        torch = self._torch
        seq = self._chunking
        assert seq is not None
        if seq.finished:  # aborted while waiting for its chunks
            self._end_chunking()
            return
        n = len(seq.prompt_ids)
        start = self._chunk_done
        if start == 0:
            self._prepare(seq)
            self._chunk_cache = self._new_cache()
        end = min(start + self.max_prefill_chunk, n)
        ids = torch.tensor([seq.prompt_ids[start:end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device).unsqueeze(0)
        k = seq.params.prompt_logprobs
        logits = self._forward(ids, mask, pos, self._chunk_cache, keep_all=k is not None)
        if k is not None:
            lps = logits[0].float().log_softmax(-1)
            if start == 0:
                seq.prompt_lps = [TokenLogprob(seq.prompt_ids[0], self._token_text(seq.prompt_ids[0]), None, [])]
            assert seq.prompt_lps is not None
            seq.prompt_lps += [self._logprob(lps[j - start], seq.prompt_ids[j + 1], k) for j in range(start, end)
                               if j + 1 < n]  # fmt: skip
            logits = logits[:, -1, :]
        self._chunk_done = end
        if end < n:
            return
        cache = self._chunk_cache
        self._end_chunking()
        self.counters.prompt_tokens += n
        self._emit([seq], logits, out)
        self._join([seq], cache, mask)

    def _new_cache(self) -> Any:
        return self._cache_cls(config=self.model.config) if self._cache_takes_config else self._cache_cls()

    def _forward(self, ids: Any, mask: Any, pos: Any, cache: Any, keep_all: bool = False) -> Any:
        """The last position's logits ``[rows, vocab]``; with ``keep_all`` every position's ``[rows, T, vocab]``."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self._cache_arg: cache,
                  "use_cache": True}  # fmt: skip
        if self._keep_arg and not keep_all:
            kwargs[self._keep_arg] = 1
        logits = self.model(**kwargs).logits
        return logits if keep_all else logits[:, -1, :]

    def _prepare(self, seq: Sequence) -> None:
        torch = self._torch
        p = seq.params
        if p.temperature > 0:
            gen = torch.Generator(device=self.device)
            if p.seed is not None:
                gen.manual_seed(p.seed)
            else:
                gen.seed()
            seq.generator = gen
        if p.repetition_penalty != 1.0:
            seq.seen = set(seq.prompt_ids)
        if p.presence_penalty or p.frequency_penalty:
            seq.counts = {}
        seq.stop_ids = frozenset(t for t in p.stop_token_ids if t < self.vocab_size)
        if p.min_tokens > 0:
            masked = sorted(t for t in (self.eos_ids | seq.stop_ids) if t < self.vocab_size)
            if masked:
                seq.min_mask = torch.tensor(masked, device=self.device)
        seq.detok = Detokenizer(self._decode, seq.prompt_ids)

    def _sample(self, seqs: list[Sequence], logits: Any) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's next token and, where asked, its logprob entry (of the raw distribution, as vLLM's)."""
        chosen = logits.argmax(dim=-1).tolist()
        lps: list[TokenLogprob | None] = [None] * len(seqs)
        for i, seq in enumerate(seqs):
            p = seq.params
            masking = seq.min_mask is not None and len(seq.tokens) < p.min_tokens
            plain = p.temperature == 0 and p.repetition_penalty == 1.0 and not seq.counts and not masking
            if not plain:
                chosen[i] = self._pick(seq, logits[i].float(), masking)
            if p.logprobs is not None:
                lps[i] = self._logprob(logits[i].float().log_softmax(-1), chosen[i], p.logprobs)
        return chosen, lps

    def _logprob(self, logprobs: Any, token: int, k: int) -> TokenLogprob:
        """``token``'s entry in one position's log-softmax row, with the ``k`` most likely tokens."""
        top: list[tuple[int, str, float]] = []
        if k:
            values, ids = self._torch.topk(logprobs, min(k, logprobs.shape[0]))
            top = [(i, self._token_text(i), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return TokenLogprob(token, self._token_text(token), float(logprobs[token]), top)

    def _token_text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text

    def _pick(self, seq: Sequence, row: Any, masking: bool) -> int:
        """One token after penalties, the min_tokens mask, temperature, top-k and top-p."""
        torch = self._torch
        p = seq.params
        if p.repetition_penalty != 1.0:
            idx = torch.tensor(sorted(seq.seen), device=row.device)
            vals = row.index_select(0, idx)
            row = row.index_copy(
                0, idx, torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
            )
        if seq.counts:  # OpenAI: logit - count * frequency_penalty - (count > 0) * presence_penalty
            idx = torch.tensor(list(seq.counts), device=row.device)
            counts = torch.tensor(list(seq.counts.values()), dtype=row.dtype, device=row.device)
            row = row.index_add(0, idx, -(counts * p.frequency_penalty + p.presence_penalty))
        if masking:
            row = row.index_fill(0, seq.min_mask, float("-inf"))
        if p.temperature == 0:
            return int(row.argmax())
        row = row / p.temperature
        if 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(row, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
            row = row.index_fill(0, order[drop], float("-inf"))
        probs = row.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _emit(self, seqs: list[Sequence], logits: Any, out: list[tuple[Sequence, GenerationChunk]]) -> None:
        chosen, lps = self._sample(seqs, logits)
        now = time.perf_counter()
        obs = self.observer
        self.counters.generation_tokens += len(seqs)
        for seq, tok, lp in zip(seqs, chosen, lps, strict=True):
            if seq.finished:  # aborted while the step ran: its token is dropped with it
                continue
            p = seq.params
            seq.tokens.append(tok)
            seq.last = tok
            seq.pos += 1
            seq.budget -= 1
            if seq.seen is not None:
                seq.seen.add(tok)
            if seq.counts is not None:
                seq.counts[tok] = seq.counts.get(tok, 0) + 1
            if seq.first_token_at == 0.0:
                seq.first_token_at = now
                if obs is not None:
                    obs.on_first_token(now - seq.arrival)
            seq.last_token_at = now
            reason = None
            early = len(seq.tokens) <= p.min_tokens  # no stop string ends it before min_tokens
            if (tok in self.eos_ids and not p.ignore_eos) or tok in seq.stop_ids:
                text, reason = seq.detok.flush(), "stop"  # the stop token's own text is not sent
                text, hit = seq.stops.feed(text)
                text += "" if hit else seq.stops.flush()
            else:
                text, hit = seq.detok.add(tok), False
                if not early:
                    text, hit = seq.stops.feed(text)
                if hit:
                    reason = "stop"
                elif seq.budget <= 0:
                    tail = seq.detok.flush()
                    if not early:
                        tail, hit = seq.stops.feed(tail)
                        tail += "" if hit else seq.stops.flush()
                    text += tail
                    reason = "stop" if hit else "length"
            if reason is not None:
                seq.finished = True
                self.counters.requests_finished += 1
                if obs is not None:
                    obs.on_finish(len(seq.prompt_ids), len(seq.tokens), now - seq.arrival)
            chunk = GenerationChunk(text, [tok], reason, len(seq.prompt_ids), len(seq.tokens))
            if lp is not None:
                chunk.logprobs = [lp]
            if seq.prompt_lps is not None:
                chunk.prompt_logprobs, seq.prompt_lps = seq.prompt_lps, None
            out.append((seq, chunk))

    def _drop_finished(self) -> None:
        rows = self._rows
        if not rows or not any(s.finished for s in rows):
            return
        keep = [i for i, s in enumerate(rows) if not s.finished]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        torch = self._torch
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        lead = int(used[0]) if used.numel() else 0
        mask = mask[:, lead:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]
        self._mask = mask
        self._rows = [rows[i] for i in keep]

    def _join(self, new: list[Sequence], cache: Any, mask: Any) -> None:
        """Add the prefilled rows (finished ones already excluded below) to the running batch."""
        torch = self._torch
        live = [i for i, s in enumerate(new) if not s.finished]
        if not live:
            return
        if len(live) != len(new):
            idx = torch.tensor(live, device=self.device)
            mask = mask.index_select(0, idx)
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
        joined = [new[i] for i in live]
        if not self._rows:
            self._rows, self._cache, self._mask = joined, cache, mask
            return
        old_t, new_t = self._mask.shape[1], mask.shape[1]
        pad_old, pad_new = max(0, new_t - old_t), max(0, old_t - new_t)
        pad = torch.nn.functional.pad
        self._mask = torch.cat([pad(self._mask, (pad_old, 0)), pad(mask, (pad_new, 0))], dim=0)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, (0, 0, pad_old, 0)), pad(theirs.keys, (0, 0, pad_new, 0))], 0)
            mine.values = torch.cat([pad(mine.values, (0, 0, pad_old, 0)), pad(theirs.values, (0, 0, pad_new, 0))], 0)
        self._rows = self._rows + joined


def _positive(p: dict[str, Any], key: str, default: int, zero_ok: bool = False) -> int:
    value = p.get(key, default)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{key} must be an integer, got {value!r}") from None
    if n < (0 if zero_ok else 1):
        raise ModelLoadError(f"{key} must be >= {0 if zero_ok else 1}, got {n}")
    return n


def _pick_device(torch: Any, name: str) -> Any:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ModelLoadError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available")
    return device
