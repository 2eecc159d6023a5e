"""The engine core: the model and its scheduler, with token ids in and token ids out.

It knows no tokenizer, no event loop and no client: :func:`run_core` drives it from a
channel of messages (``("add", CoreRequest)``, ``("abort", key)``, ``("stop",)``) and
sends back one message per step carrying every sequence's new token, so the same core
runs on a thread of the serving process or alone in a child process
(:mod:`meshserve.server.llm.core_process`), as vLLM's V1 engine core does. Detokenization,
stop strings and the per-request streams stay with the caller
(:class:`meshserve.server.llm.engine.TransformersEngine`).

Iteration-level scheduling, as Orca and vLLM do it, on plain transformers; each step:

* takes in the requests and aborts that arrived since the last step;
* drops the rows of sequences that finished or were aborted;
* runs one decode forward over the running batch (one new token for every row);
* admits waiting prompts within the step's token budget (``max_num_batched_tokens``:
  one token per running row, the rest for padded prompt tokens), so new requests are
  prefilled at the next step while decodes go on, and prefills them in one forward
  (left-padded together) whose last logits give each its first token;
* prefills the next chunk of a prompt longer than ``max_prefill_chunk`` (one such prompt
  at a time, in a KV cache of its own), so running rows never stall behind it;
* the prefilled rows join the running batch.

The forwards and the running batch's KV cache belong to a batch runner: for Llama-family
models :class:`~meshserve.server.llm.fast_llama.FastLlama` (a lean forward over a
preallocated cache, ``fast_forward: true``, the default), for any other causal LM (or with
``fast_forward: false``) :class:`~meshserve.server.llm.hf_batch.HFBatch` (transformers'
forward over a left-padded ``DynamicCache``). Either way greedy decoding under batching
equals unbatched ``model.generate`` token for token (tested).

Every sequence keeps its own sampling settings (its own ``torch.Generator`` when seeded;
repetition, presence and frequency penalties; EOS and ``stop_token_ids`` masked until
``min_tokens``) and token budget. Logprobs are the raw log-softmax of the row's logits,
before penalties and temperature, as vLLM's; prompt logprobs need every position's
logits, so each such prompt gets a prefill forward of its own.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.protocol.errors import ModelLoadError
from meshserve.server.llm.types import SamplingParams
from meshserve.server.runtimes.hf_import import transformers_with

log = logging.getLogger(__name__)

# Tokens per step: a wave of 16 prompts admitted a few at a time gives the first ones their
# token early (TTFT p50 ~50 -> ~25 ms at 16 streams on the bench's model) at the same tokens/s.
DEFAULT_BATCHED_TOKENS = 128
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": None}  # fmt: skip

# One token's logprob entry as the core sends it: (token, logprob or None, [(id, logprob), ...]).
RawLogprob = tuple[int, float | None, list[tuple[int, float]]]
# One sequence's output of one step: (key, token, finish reason or None, logprob, prompt logprobs).
TokenOut = tuple[int, int, str | None, RawLogprob | None, list[RawLogprob] | None]


@dataclass(slots=True)
class CoreRequest:
    """What the core needs of a request: its key, prompt ids, settings and token budget."""

    key: int
    prompt_ids: list[int]
    params: SamplingParams
    budget: int


class CoreSeq:
    """One request's state inside the core (owned by the core's thread)."""

    __slots__ = ("key", "prompt_ids", "params", "generated", "last", "pos", "generator", "finished", "budget",
                 "seen", "counts", "stop_ids", "min_mask", "prompt_lps")  # fmt: skip

    def __init__(self, req: CoreRequest) -> None:
        self.key = req.key
        self.prompt_ids = req.prompt_ids
        self.params = req.params
        self.generated = 0
        self.last = req.prompt_ids[-1]
        self.pos = len(req.prompt_ids) - 1  # position id of ``last``, the next token fed
        self.generator: Any = None
        self.finished = False
        self.budget = req.budget  # tokens it may still generate (max_tokens, bounded by the context)
        self.seen: Any = None  # token ids for the repetition penalty
        self.counts: dict[int, int] | None = None  # generated token -> count (presence/frequency penalties)
        self.stop_ids: frozenset[int] = frozenset()
        self.min_mask: Any = None  # ids masked while fewer than min_tokens were generated (EOS, stop ids)
        self.prompt_lps: list[RawLogprob] | None = None  # sent with the first token


class EngineCore:
    """A transformers causal LM under continuous batching (see the module docstring)."""

    def __init__(self, path: str | Path, parameters: dict[str, Any], extra_eos: tuple[int, ...] = ()) -> None:
        p = parameters
        self.path = Path(path)
        self.max_num_seqs = positive(p, "max_num_seqs", 32)
        self.max_prefill_tokens = positive(p, "max_prefill_tokens", 4096)
        self.max_prefill_chunk = positive(p, "max_prefill_chunk", 512, zero_ok=True)
        self.max_num_batched_tokens = positive(p, "max_num_batched_tokens", DEFAULT_BATCHED_TOKENS)
        self._max_model_len_setting = p.get("max_model_len")
        self.fast_forward = flag(p, "fast_forward", True)
        self.packed_linear = flag(p, "packed_linear", True)
        self._device_setting = str(p.get("device", "auto"))
        self._dtype_setting = p.get("dtype")
        self._extra_eos = extra_eos
        self.max_model_len = 0
        self.model: Any = None
        self._seqs: dict[int, CoreSeq] = {}
        self._waiting: deque[CoreSeq] = deque()
        self._rows: list[CoreSeq] = []  # the running batch, in KV-cache row order
        self.batch: Any = None  # the forwards and the KV cache: FastLlama or HFBatch
        self.forward_kind = ""
        self._chunking: CoreSeq | None = None
        self._chunk_done = 0  # prompt tokens of _chunking already prefilled
        self.prompt_tokens = self.generation_tokens = self.steps = 0

    # -- loading -------------------------------------------------------------
    def load(self, threads: int | None) -> dict[str, Any]:
        """Read the model (blocking); what the caller needs to know of it."""
        import torch

        transformers = transformers_with("AutoModelForCausalLM")
        if threads:
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
            model = transformers.AutoModelForCausalLM.from_pretrained(str(self.path), **kwargs)
        except Exception as e:
            raise ModelLoadError(f"cannot load a causal LM from {self.path.name}: {type(e).__name__}: {e}") from None
        self.model = model.to(device).eval()
        self.device = device
        self._torch = torch
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or 2048
        if self._max_model_len_setting is not None:
            wanted = int(self._max_model_len_setting)
            if not 0 < wanted <= limit:
                raise ModelLoadError(f"max_model_len {wanted} must be in [1, {limit}] for this model")
            limit = wanted
        self.max_model_len = int(limit)
        eos = set(self._extra_eos)
        for source in (getattr(model, "generation_config", None), config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                eos.update([value] if isinstance(value, int) else value)
        self.eos_ids = frozenset(eos)
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) else (min(eos) if eos else 0)
        self.vocab_size = int(getattr(config, "vocab_size", 0))
        self.batch = self._new_batch()
        return {"max_model_len": self.max_model_len, "eos_ids": sorted(eos), "vocab_size": self.vocab_size,
                "size_bytes": self.size_bytes(), "device": str(device), "forward": self.forward_kind}  # fmt: skip

    def _new_batch(self) -> Any:
        """The fast forward when asked for and the model is Llama-family, else transformers' own."""
        from meshserve.server.llm.fast_llama import FastLlama, unsupported
        from meshserve.server.llm.hf_batch import HFBatch

        why = "fast_forward: false" if not self.fast_forward else unsupported(self.model, self.max_model_len)
        if why is None:
            self.forward_kind = "fast"
            log.info("%s: the fast Llama forward (fast_forward: false turns it off)", self.path.name)
            return FastLlama(self.model, self.max_model_len, self.packed_linear)
        log.info("%s: transformers' forward (%s)", self.path.name, why)
        self.forward_kind = "transformers"
        return HFBatch(self.model, self.pad_id)

    def size_bytes(self) -> int:
        if self.model is None:
            return 0
        model = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])
        return model + (self.batch.size_bytes() if self.batch is not None else 0)  # and the KV cache held now

    def release(self) -> None:
        on_gpu = self.model is not None and self.device.type == "cuda"
        self._seqs.clear()
        self._waiting.clear()
        self._rows = []
        self._end_chunking()
        self.model = self.batch = None
        if on_gpu:
            self._torch.cuda.empty_cache()

    # -- requests ------------------------------------------------------------
    def add(self, req: CoreRequest) -> None:
        seq = CoreSeq(req)
        self._seqs[req.key] = seq
        self._waiting.append(seq)

    def abort(self, key: int) -> None:
        """Finished at once; its row leaves the batch at the next step."""
        seq = self._seqs.pop(key, None)
        if seq is not None:
            seq.finished = True

    def busy(self) -> bool:
        return bool(self._rows or self._waiting or self._chunking is not None)

    def running(self) -> int:
        return sum(1 for s in [*self._rows, *self._chunked()] if not s.finished)

    def _chunked(self) -> list[CoreSeq]:
        return [] if self._chunking is None else [self._chunking]

    def _end_chunking(self) -> None:
        self._chunking, self._chunk_done = None, 0
        if self.batch is not None:
            self.batch.end_chunked()

    # -- one step --------------------------------------------------------------
    def step(self) -> tuple[Any, ...]:
        """One scheduler step: ``("step", outputs, decode seconds or None, counters)`` or, when the
        model raised, ``("failed", keys, message)`` for the sequences it took down (the core goes on)."""
        decode_s: float | None = None
        out: list[TokenOut] = []
        new: list[CoreSeq] = []
        try:
            with self._torch.inference_mode():
                self._drop_finished()
                if self._rows:
                    started = time.perf_counter()
                    self._decode(out)
                    decode_s = time.perf_counter() - started
                    self._drop_finished()  # their slots are free for this step's prompts
                new = self._admit()
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
        except Exception as e:  # a failed step fails its sequences; the core keeps serving
            log.exception("decoding step failed")
            keys = [s.key for s in [*self._rows, *self._waiting, *self._chunked()] if not s.finished]
            keys += [s.key for s in new if not s.finished]
            for key in keys:
                self._seqs.pop(key, None)
            self._rows = []
            self.batch.reset()
            self._waiting = deque(s for s in self._waiting if s.key not in keys)
            self._end_chunking()
            return ("failed", sorted(set(keys)), f"{type(e).__name__}: {e}")
        self.steps += 1
        return ("step", out, decode_s, (self.prompt_tokens, self.generation_tokens, self.steps))

    def _admit(self) -> list[CoreSeq]:
        """The waiting sequences that join at this step, in arrival order, within the step's token
        budget (each running row decodes one token; padded prompt tokens take the rest, at least
        one prompt when the budget is spent by decodes alone). A prompt longer than
        ``max_prefill_chunk`` becomes the one prefilled in chunks (when none is)."""
        room = self.max_num_seqs - self.running()
        budget = min(self.max_prefill_tokens, self.max_num_batched_tokens - len(self._rows))
        new: list[CoreSeq] = []
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
            if new and longest2 * (len(new) + 1) > budget:
                break
            longest = longest2
            new.append(self._waiting.popleft())
        return new

    def _decode(self, out: list[TokenOut]) -> None:
        rows = self._rows
        logits = self.batch.decode([s.last for s in rows], [s.pos for s in rows])
        self._emit(rows, logits, out)

    def _prefill(self, new: list[CoreSeq], out: list[TokenOut], keep_all: bool) -> None:
        """One forward over the new prompts; their rows join the batch (finished ones leave at
        the step's end)."""
        logits, every = self.batch.prefill([s.prompt_ids for s in new], keep_all)
        if every is not None:
            for s, rows in zip(new, every, strict=True):
                lps = rows[:-1].float().log_softmax(-1)
                k = s.params.prompt_logprobs or 0
                first: RawLogprob = (s.prompt_ids[0], None, [])
                s.prompt_lps = [first] + [self._logprob(lps[j], s.prompt_ids[j + 1], k) for j in range(len(lps))]
        self.prompt_tokens += sum(len(s.prompt_ids) for s in new)
        self._rows = self._rows + new
        self._emit(new, logits, out)

    def _prefill_chunk(self, out: list[TokenOut]) -> None:
        """The next ``max_prefill_chunk`` tokens of the long prompt; after its last chunk, its
        first token is sampled and it joins the running batch."""
        seq = self._chunking
        assert seq is not None
        if seq.finished:  # aborted while waiting for its chunks
            self._end_chunking()
            return
        n = len(seq.prompt_ids)
        start = self._chunk_done
        if start == 0:
            self._prepare(seq)
        end = min(start + self.max_prefill_chunk, n)
        k = seq.params.prompt_logprobs
        logits, every = self.batch.prefill_chunk(seq.prompt_ids[start:end], start, k is not None)
        if every is not None:
            lps = every[0].float().log_softmax(-1)
            if start == 0:
                seq.prompt_lps = [(seq.prompt_ids[0], None, [])]
            assert seq.prompt_lps is not None
            seq.prompt_lps += [self._logprob(lps[j - start], seq.prompt_ids[j + 1], k) for j in range(start, end)
                               if j + 1 < n]  # fmt: skip
        self._chunk_done = end
        if end < n:
            return
        self.batch.join_chunked(n)
        self._chunking, self._chunk_done = None, 0
        self.prompt_tokens += n
        self._rows = self._rows + [seq]
        self._emit([seq], logits, out)

    def _prepare(self, seq: CoreSeq) -> None:
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

    def _sample(self, seqs: list[CoreSeq], logits: Any) -> tuple[list[int], list[RawLogprob | None]]:
        """Each row's next token and, where asked, its logprob entry (of the raw distribution, as vLLM's).
        Greedy rows held by ``min_tokens`` are masked together, in one op (a benchmark's every row is)."""
        torch = self._torch
        held: list[int] = []
        picked: list[tuple[int, bool]] = []
        for i, seq in enumerate(seqs):
            p = seq.params
            masking = seq.min_mask is not None and seq.generated < p.min_tokens
            if p.temperature != 0 or p.repetition_penalty != 1.0 or seq.counts:
                picked.append((i, masking))
            elif masking:
                held.append(i)
        greedy = logits
        if held:
            masks = [seqs[i].min_mask for i in held]
            counts = torch.tensor([len(m) for m in masks], device=logits.device)
            rows = torch.tensor(held, device=logits.device).repeat_interleave(counts)
            inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
            greedy = logits.index_put((rows, torch.cat(masks)), inf)
        chosen = greedy.argmax(dim=-1).tolist()
        for i, masking in picked:
            chosen[i] = self._pick(seqs[i], logits[i].float(), masking)
        lps: list[RawLogprob | None] = [None] * len(seqs)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.logprobs is not None:
                lps[i] = self._logprob(logits[i].float().log_softmax(-1), chosen[i], p.logprobs)
        return chosen, lps

    def _logprob(self, logprobs: Any, token: int, k: int) -> RawLogprob:
        """``token``'s entry in one position's log-softmax row, with the ``k`` most likely tokens."""
        top: list[tuple[int, float]] = []
        if k:
            values, ids = self._torch.topk(logprobs, min(k, logprobs.shape[0]))
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return (token, float(logprobs[token]), top)

    def _pick(self, seq: CoreSeq, row: Any, masking: bool) -> int:
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

    def _emit(self, seqs: list[CoreSeq], logits: Any, out: list[TokenOut]) -> None:
        """Each row's token, and its end: "stop" at EOS (unless ignored) or a stop token, "length"
        when its budget is spent. Stop strings are the caller's (it aborts the sequence)."""
        chosen, lps = self._sample(seqs, logits)
        self.generation_tokens += len(seqs)
        for seq, tok, lp in zip(seqs, chosen, lps, strict=True):
            if seq.finished:  # aborted while the step ran: its token is dropped with it
                continue
            seq.generated += 1
            seq.last = tok
            seq.pos += 1
            seq.budget -= 1
            if seq.seen is not None:
                seq.seen.add(tok)
            if seq.counts is not None:
                seq.counts[tok] = seq.counts.get(tok, 0) + 1
            reason = None
            if (tok in self.eos_ids and not seq.params.ignore_eos) or tok in seq.stop_ids:
                reason = "stop"
            elif seq.budget <= 0:
                reason = "length"
            if reason is not None:
                seq.finished = True
                self._seqs.pop(seq.key, None)
            prompt_lps, seq.prompt_lps = seq.prompt_lps, None
            out.append((seq.key, tok, reason, lp, prompt_lps))

    def _drop_finished(self) -> None:
        rows = self._rows
        if not rows or not any(s.finished for s in rows):
            return
        keep = [i for i, s in enumerate(rows) if not s.finished]
        order = self.batch.drop(keep)
        self._rows = [rows[i] for i in order]


def run_core(core: EngineCore, receive: Callable[[bool], list[Any]], send: Callable[[Any], None]) -> None:
    """Serve ``core`` until a ``("stop",)`` message: take in what arrived (waiting for it when
    idle), step, send the step's one message."""
    while True:
        for msg in receive(not core.busy()):
            kind = msg[0]
            if kind == "add":
                core.add(msg[1])
            elif kind == "abort":
                core.abort(msg[1])
            elif kind == "stop":
                return
        if core.busy():
            send(core.step())


def core_threads(setting: Any, replicas: int = 1) -> int:
    """Intra-op threads: the cores less one, in the engine process too (shared by ``replicas``
    cores). With every core in the intra-op team, each small op waits for a descheduled thread
    whenever anything else runs (the server's front, its clients): on 2 busy cores that cost
    more than the second thread gave (measured: loadtests/README.md). vLLM's CPU backend
    likewise leaves a core to its front."""
    if setting:
        return int(setting)
    return max(1, (cpu_count() - 1) // replicas)


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def positive(p: dict[str, Any], key: str, default: int, zero_ok: bool = False) -> int:
    value = p.get(key, default)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{key} must be an integer, got {value!r}") from None
    if n < (0 if zero_ok else 1):
        raise ModelLoadError(f"{key} must be >= {0 if zero_ok else 1}, got {n}")
    return n


def flag(p: dict[str, Any], key: str, default: bool) -> bool:
    value = p.get(key, default)
    if not isinstance(value, bool):
        raise ModelLoadError(f"{key} must be true or false, got {value!r}")
    return value


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
