"""The running batch on transformers' own forward: any ``AutoModelForCausalLM``.

The batch's KV cache is a transformers ``DynamicCache`` held left-padded: keys/values
``[rows, kv_heads, T, head_dim]`` with a ``[rows, T]`` attention mask and per-row position
ids. Rows join by left-padding the shorter side and concatenating; rows leave by
``index_select``, and columns no row uses any more are trimmed off the left. Masked columns
contribute exact zeros, so greedy decoding under batching equals unbatched
``model.generate`` token for token (tested). A prompt prefilled in chunks has a cache of
its own until it joins.

It offers the same operations as :class:`meshserve.server.llm.fast_llama.FastLlama`, which
the engine core uses instead for Llama-family models.
"""

from __future__ import annotations

import inspect
from typing import Any

from meshserve.protocol.errors import ModelLoadError
from meshserve.server.runtimes.hf_import import transformers_with


class HFBatch:
    """Forwards and the left-padded KV cache of the running batch (the core's thread only)."""

    def __init__(self, model: Any, pad_id: int) -> None:
        import torch

        transformers = transformers_with("DynamicCache")
        self.torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self._cache_cls = transformers.DynamicCache
        fwd = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in fwd else "past_key_values"
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in fwd else None
        self._cache_takes_config = "config" in inspect.signature(transformers.DynamicCache.__init__).parameters
        if not hasattr(self._new_cache(), "layers"):
            raise ModelLoadError(f"the llm engine needs transformers >= 4.56 (found {transformers.__version__})")
        self.cache: Any = None
        self.mask: Any = None
        self._chunk_cache: Any = None

    def reset(self) -> None:
        self.cache = self.mask = self._chunk_cache = None

    def size_bytes(self) -> int:
        """The running batch's KV cache now (it grows and shrinks with the batch)."""
        tensors = [t for c in (self.cache, self._chunk_cache) if c is not None for ly in c.layers
                   for t in (ly.keys, ly.values) if t is not None]  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- forwards -------------------------------------------------------------
    def decode(self, tokens: list[int], positions: list[int]) -> Any:
        """One token for each running row; logits ``[rows, vocab]``."""
        torch = self.torch
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        pos = torch.tensor(positions, device=self.device).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
        return self.forward(ids, self.mask, pos, self.cache)

    def prefill(self, prompts: list[list[int]], keep_all: bool) -> tuple[Any, list[Any] | None]:
        """One forward over the new prompts (left-padded together); they join the batch as its
        last rows. The last logits ``[prompts, vocab]`` and, with ``keep_all``, each prompt's at
        every position."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = self._new_cache()
        logits = self.forward(ids, mask, pos, cache, keep_all)
        every = None
        if keep_all:
            every = [logits[i, width - len(p) :] for i, p in enumerate(prompts)]
            logits = logits[:, -1, :]
        self._join(cache, mask)
        return logits, every

    def prefill_chunk(self, ids: list[int], start: int, keep_all: bool) -> tuple[Any, list[Any] | None]:
        """The next chunk of the prompt prefilled in chunks, in a cache of its own."""
        torch = self.torch
        if start == 0:
            self._chunk_cache = self._new_cache()
        end = start + len(ids)
        t = torch.tensor([ids], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device).unsqueeze(0)
        logits = self.forward(t, mask, pos, self._chunk_cache, keep_all)
        if keep_all:
            return logits[:, -1, :], [logits[0]]
        return logits, None

    def join_chunked(self, length: int) -> None:
        mask = self.torch.ones((1, length), dtype=self.torch.long, device=self.device)
        cache, self._chunk_cache = self._chunk_cache, None
        self._join(cache, mask)

    def end_chunked(self) -> None:
        self._chunk_cache = None

    def forward(self, ids: Any, mask: Any, pos: Any, cache: Any, keep_all: bool = False) -> Any:
        """The last position's logits ``[rows, vocab]``; with ``keep_all`` every position's ``[rows, T, vocab]``."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self._cache_arg: cache,
                  "use_cache": True}  # fmt: skip
        if self._keep_arg and not keep_all:
            kwargs[self._keep_arg] = 1
        logits = self.model(**kwargs).logits
        return logits if keep_all else logits[:, -1, :]

    def _new_cache(self) -> Any:
        return self._cache_cls(config=self.model.config) if self._cache_takes_config else self._cache_cls()

    # -- the batch's rows -------------------------------------------------------
    def drop(self, keep: list[int]) -> list[int]:
        """Keep these rows (indices, ascending), in order; trim the columns no row uses any more."""
        if not keep:
            self.cache = self.mask = None
            return []
        torch = self.torch
        idx = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        lead = int(used[0]) if used.numel() else 0
        self.mask = mask[:, lead:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]
        return keep

    def _join(self, cache: Any, mask: Any) -> None:
        """Append prefilled rows to the running batch (left-padding the shorter side)."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        torch = self.torch
        old_t, new_t = self.mask.shape[1], mask.shape[1]
        pad_old, pad_new = max(0, new_t - old_t), max(0, old_t - new_t)
        pad = torch.nn.functional.pad
        self.mask = torch.cat([pad(self.mask, (pad_old, 0)), pad(mask, (pad_new, 0))], dim=0)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, (0, 0, pad_old, 0)), pad(theirs.keys, (0, 0, pad_new, 0))], 0)
            mine.values = torch.cat([pad(mine.values, (0, 0, pad_old, 0)), pad(theirs.values, (0, 0, pad_new, 0))], 0)
