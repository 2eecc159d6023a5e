"""A lean forward for Llama-family models with a preallocated KV cache, as vLLM runs its own
model implementations instead of transformers' modules.

A 16-row decode step of a small model spends about half its time in transformers' Python
per layer (module calls, cache objects, mask building). This forward reads the loaded
``LlamaForCausalLM``'s weights (q/k/v and gate/up fused once at load; the HF modules are
re-pointed at views of the fused tensors, so nothing is held twice) and runs each layer in
a dozen tensor ops: RMSNorm, one qkv matmul, RoPE from a precomputed cos/sin table, an
in-place KV-cache write, SDPA with a length mask, o_proj, one gate_up matmul, silu*mul,
down.

The KV cache is one tensor per layer, ``[slots, 2 * kv_heads, capacity, head_dim]`` (keys
then values), grown by doubling (slots as rows join, capacity up to the model length), so
memory follows the batch actually run. The running batch holds slots ``0..rows-1`` in row
order, so a decode step reads one contiguous view; a row that leaves is replaced by the
last row (one slot copy), and a prompt prefilled in chunks fills a cache of its own until
it joins (one copy). Prefill runs the prompts' tokens flattened (no padding) through
the matmuls, with attention per prompt.

On the CPU in float32 the linear layers run on oneDNN with their weights packed once at load
(``packed_linear``, default on): PyTorch's float32 matmul goes to MKL, which on AMD CPUs
keeps to its AVX2 kernels; oneDNN's packed kernels use AVX-512 where the CPU has it (on the
benchmark's EPYC, a 16-row decode step 1.77 -> 1.20 ms, a 25-token prefill 2.15 -> 1.33 ms,
the same greedy tokens). The dense copies are freed once packed, so the weights are held
once: the transformers modules of a model on this path have empty linear weights (nothing
else runs them). A tied ``lm_head`` (the embedding's matrix) stays dense and runs on oneDNN
unpacked. The path is taken only after a probe agrees with ``F.linear``.

:func:`unsupported` says why a model cannot take this path (the engine then keeps the
transformers path): another architecture, a non-SiLU MLP, RoPE that changes with the length
(dynamic, longrope), sliding-window attention, per-head q/k norms.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only
INITIAL_SLOTS, INITIAL_CAPACITY = 4, 128
CHUNK = -1  # the slot argument naming the chunked prompt's own cache


def unsupported(model: Any, max_len: int) -> str | None:
    """Why ``model`` cannot run on :class:`FastLlama` (None: it can)."""
    config = model.config
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"architecture {name}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE:
        return f"rope type {rope_type}"
    window = getattr(config, "sliding_window", None)
    if window and window < max_len and getattr(config, "use_sliding_window", True):
        return f"sliding window {window}"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    attn = model.model.layers[0].self_attn
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "per-head q/k norms"
    import torch

    for layer in model.model.layers:  # fusing reads plain weights: not quantized or adapted layers
        for mod in (*layer.self_attn.children(), *layer.mlp.children()):
            if isinstance(mod, torch.nn.Module) and mod._parameters and type(mod) is not torch.nn.Linear:
                return f"{type(mod).__name__} layers"
            if type(mod) is torch.nn.Linear and not mod.weight.is_floating_point():
                return f"{mod.weight.dtype} weights"
    return None


class FastLlama:
    """The forward and its KV cache (see the module docstring). Not thread-safe: the core's."""

    def __init__(self, model: Any, max_len: int, packed_linear: bool = True) -> None:
        import torch

        self.torch = torch
        self.F = torch.nn.functional
        config = model.config
        inner = model.model
        attn0 = inner.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn0.head_dim
        self.groups = self.heads // self.kv_heads
        self.scale = float(attn0.scaling)
        self.max_len = max_len
        self.embed = inner.embed_tokens.weight
        self.norm_w, self.eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.lm_head_w, self.lm_head_b = model.lm_head.weight, model.lm_head.bias
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in inner.layers]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.linear = self.F.linear
        self.packed_bytes = 0  # the packed weights (their dense copies freed)
        self.packed = packed_linear and _onednn_works(torch, self.device, self.dtype)
        if self.packed:
            with torch.no_grad():
                self._pack(model)
        self._rotary = inner.rotary_emb
        self.cos = self.sin = self.embed.new_empty((0, self.head_dim))
        self._rope_table(min(INITIAL_CAPACITY, max_len))
        self.cache = self._grown([], INITIAL_SLOTS, min(INITIAL_CAPACITY, max_len))
        self.chunk: list[Any] = []  # the prompt being prefilled in chunks: [1, 2 * kv_heads, capacity, head_dim]
        self.rows = 0  # slots 0..rows-1: the running batch, in row order

    def _fuse(self, layer: Any) -> tuple[Any, ...]:
        """One layer's tensors; q/k/v and gate/up concatenated once, the HF modules re-pointed at views."""
        torch = self.torch
        a, m = layer.self_attn, layer.mlp
        qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        qkv_b = None
        if a.q_proj.bias is not None:
            qkv_b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        _repoint([a.q_proj, a.k_proj, a.v_proj], qkv_w, qkv_b)
        gu_w = torch.cat([m.gate_proj.weight, m.up_proj.weight])
        gu_b = torch.cat([m.gate_proj.bias, m.up_proj.bias]) if m.gate_proj.bias is not None else None
        _repoint([m.gate_proj, m.up_proj], gu_w, gu_b)
        return (layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon), qkv_w, qkv_b,
                a.o_proj.weight, a.o_proj.bias, layer.post_attention_layernorm.weight,
                float(layer.post_attention_layernorm.variance_epsilon), gu_w, gu_b, m.gate_proj.weight.shape[0],
                m.down_proj.weight, m.down_proj.bias)  # fmt: skip

    def _pack(self, model: Any) -> None:
        """Linear weights packed for oneDNN, their dense copies freed (see the module docstring)."""
        torch = self.torch
        pack, linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
        self.linear = lambda x, w, b: linear(x, w, b, "none", [], "")
        empty = self.embed.new_empty(0)
        for j, layer in enumerate(model.model.layers):  # a layer at a time: at most one layer held twice
            packed = list(self.layers[j])
            for i in (2, 4, 8, 11):  # qkv, o, gate_up, down
                dense = packed[i]
                packed[i] = pack(dense)
                self.packed_bytes += dense.numel() * dense.element_size()
            a, m = layer.self_attn, layer.mlp
            for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                mod.weight.data = empty
            self.layers[j] = tuple(packed)  # the fused dense tensors' last references go here
            del dense, packed
        if self.lm_head_w.data_ptr() != self.embed.data_ptr():  # untied: packed too
            dense = self.lm_head_w
            self.lm_head_w = pack(dense)
            self.packed_bytes += dense.numel() * dense.element_size()
            model.lm_head.weight.data = empty

    def _rope_table(self, length: int) -> None:
        """cos/sin ``[positions, head_dim]`` from HF's own rotary module (its scaling and dtype),
        for at least ``length`` positions: grown with the caches, not the whole context at once."""
        if length <= self.cos.shape[0]:
            return
        n = min(self.max_len, max(length, 2 * self.cos.shape[0]))
        with self.torch.no_grad():
            cos, sin = self._rotary(self.embed[:1], self.torch.arange(n, device=self.device).unsqueeze(0))
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()
        self.sin = self.torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()  # signed for roll

    @property
    def slots(self) -> int:
        return self.cache[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.cache[0].shape[2]

    def _grown(self, cache: list[Any], slots: int, length: int) -> list[Any]:
        """``cache`` with room for ``slots`` sequences of ``length`` tokens: itself when it has it,
        else a copy twice as big in what was short (the length at most the model's)."""
        if cache and slots <= cache[0].shape[0] and length <= cache[0].shape[2]:
            return cache
        old_slots, old_cap = (cache[0].shape[0], cache[0].shape[2]) if cache else (0, 0)
        new_slots = max(slots, 2 * old_slots) if slots > old_slots else old_slots
        new_cap = min(self.max_len, max(length, 2 * old_cap)) if length > old_cap else old_cap
        shape = (new_slots, 2 * self.kv_heads, new_cap, self.head_dim)
        grown = []
        for old in cache or [None] * len(self.layers):
            t = self.torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None:
                t[:old_slots, :, :old_cap].copy_(old)
            grown.append(t)
        return grown

    def size_bytes(self) -> int:
        """The KV caches held now, and the packed weights (the model's parameters no longer hold them)."""
        return self.packed_bytes + sum(t.numel() * t.element_size() for t in [*self.cache, *self.chunk])

    def reset(self) -> None:
        self.rows = 0

    # -- the batch's slots ----------------------------------------------------
    def drop(self, keep: list[int]) -> list[int]:
        """Keep these rows (indices, ascending); the last rows move into the holes. Returns the new
        row order as old row indices."""
        n = len(keep)
        order = list(range(n))
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        for hole, src in zip(holes, movers, strict=True):
            order[hole] = src
        if holes:
            torch = self.torch
            dst = torch.tensor(holes, device=self.device)
            src_t = torch.tensor(movers, device=self.device)
            for cache in self.cache:
                cache.index_copy_(0, dst, cache.index_select(0, src_t))
        self.rows = n
        return order

    def join_chunked(self, length: int) -> None:
        """The chunk-prefilled prompt (``length`` tokens) becomes the batch's last row."""
        dst = self.rows
        self.cache = self._grown(self.cache, dst + 1, length)
        for cache, chunk in zip(self.cache, self.chunk, strict=True):
            cache[dst, :, :length].copy_(chunk[0, :, :length])
        self.rows += 1

    def end_chunked(self) -> None:
        """The chunked prompt joined or was aborted (its cache is kept for the next one)."""

    # -- forwards -------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], keep_all: bool) -> tuple[Any, list[Any] | None]:
        """New prompts, one forward; they join the batch as its last rows (see :meth:`_prompts`)."""
        first = self.rows
        out = self._prompts([(ids, 0, first + i) for i, ids in enumerate(prompts)], keep_all)
        self.rows += len(prompts)
        return out

    def prefill_chunk(self, ids: list[int], start: int, keep_all: bool) -> tuple[Any, list[Any] | None]:
        """The next chunk of the prompt prefilled in chunks, in its own cache."""
        return self._prompts([(ids, start, CHUNK)], keep_all)

    def decode(self, tokens: list[int], positions: list[int]) -> Any:
        """One token for each running row (``len(tokens) == rows``); logits ``[rows, vocab]``."""
        torch, F, linear = self.torch, self.F, self.linear
        b = len(tokens)
        assert b == self.rows
        length = max(positions) + 1
        self.cache = self._grown(self.cache, b, length)
        self._rope_table(length)
        ids = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        # An additive mask (SDPA's CPU kernel takes it faster than a boolean one): -inf past each row's length.
        mask = self._additive(torch.arange(length, device=self.device) <= pos.unsqueeze(1)).view(b, 1, 1, length)
        rows = torch.arange(b, device=self.device)
        h, kv, d, g = self.heads, self.kv_heads, self.head_dim, self.groups
        x = F.embedding(ids, self.embed)
        for (n1, e1, qkv_w, qkv_b, o_w, o_b, n2, e2, gu_w, gu_b, inter, down_w, down_b), cache in zip(
            self.layers, self.cache, strict=True
        ):
            qkv = linear(self._norm(x, n1, e1), qkv_w, qkv_b).view(b, h + 2 * kv, d)
            self._rope(qkv[:, : h + kv], cos, sin)
            cache[rows, :, pos] = qkv[:, h:]
            q = qkv[:, :h].reshape(b, kv, g, d)
            view = cache[:b, :, :length]
            o = F.scaled_dot_product_attention(q, view[:, :kv], view[:, kv:], attn_mask=mask, scale=self.scale)
            x = x + linear(o.reshape(b, h * d), o_w, o_b)
            gu = linear(self._norm(x, n2, e2), gu_w, gu_b)
            x = x + linear(F.silu(gu[:, :inter]) * gu[:, inter:], down_w, down_b)
        return self._logits(x)

    def _prompts(self, prompts: list[tuple[list[int], int, int]], keep_all: bool) -> tuple[Any, list[Any] | None]:
        """Prompts (or a chunk of one), each ``(token ids, first position, slot or CHUNK)``, one forward.
        Returns the last position's logits ``[prompts, vocab]`` and, with ``keep_all``, each
        prompt's logits at every position it was given."""
        torch, F, linear = self.torch, self.F, self.linear
        flat = [t for ids, _, _ in prompts for t in ids]
        n = len(flat)
        pos_list = [start + i for ids, start, _ in prompts for i in range(len(ids))]
        length = max(pos_list) + 1
        if prompts[0][2] == CHUNK:
            self.chunk = self._grown(self.chunk, 1, length)
        else:
            self.cache = self._grown(self.cache, max(slot for _, _, slot in prompts) + 1, length)
        self._rope_table(length)
        ids = torch.tensor(flat, device=self.device)
        pos = torch.tensor(pos_list, device=self.device)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        spans, a = [], 0
        for toks, start, slot in prompts:
            b = a + len(toks)
            mask = None
            if start:  # a later chunk: its queries also see the cached prefix
                q_pos = torch.arange(start, start + len(toks), device=self.device).unsqueeze(1)
                mask = self._additive(torch.arange(start + len(toks), device=self.device) <= q_pos)
            spans.append((a, b, start, slot, mask))
            a = b
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)
        chunk = self.chunk if prompts[0][2] == CHUNK else [None] * len(self.layers)
        for (n1, e1, qkv_w, qkv_b, o_w, o_b, n2, e2, gu_w, gu_b, inter, down_w, down_b), cache, chunk_cache in zip(
            self.layers, self.cache, chunk, strict=True
        ):
            qkv = linear(self._norm(x, n1, e1), qkv_w, qkv_b).view(n, h + 2 * kv, d)
            self._rope(qkv[:, : h + kv], cos, sin)
            o = torch.empty((n, h, d), dtype=x.dtype, device=x.device)
            for a, b, start, slot, mask in spans:
                end = start + b - a
                dst = chunk_cache[0] if slot == CHUNK else cache[slot]
                dst[:, start:end] = qkv[a:b, h:].transpose(0, 1)
                k, v = dst[:kv, :end], dst[kv:, :end]
                o[a:b] = F.scaled_dot_product_attention(
                    qkv[a:b, :h].transpose(0, 1), k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                    enable_gqa=kv != h,
                ).transpose(0, 1)  # fmt: skip
            x = x + linear(o.view(n, h * d), o_w, o_b)
            gu = linear(self._norm(x, n2, e2), gu_w, gu_b)
            x = x + linear(F.silu(gu[:, :inter]) * gu[:, inter:], down_w, down_b)
        last = torch.tensor([b - 1 for _, b, _, _, _ in spans], device=self.device)
        if not keep_all:
            return self._logits(x.index_select(0, last)), None
        logits = self._logits(x)
        return logits.index_select(0, last), [logits[a:b] for a, b, _, _, _ in spans]

    # -- pieces -----------------------------------------------------------------
    def _additive(self, allowed: Any) -> Any:
        zero = self.torch.zeros((), dtype=self.dtype, device=self.device)
        return self.torch.where(allowed, zero, float("-inf"))

    def _norm(self, x: Any, weight: Any, eps: float) -> Any:
        """Llama's RMSNorm: in float32, scaled by the weight in the model's dtype."""
        if x.dtype == self.torch.float32:
            return self.F.rms_norm(x, (x.shape[-1],), weight, eps)
        return weight * self.F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)

    def _rope(self, x: Any, cos: Any, sin: Any) -> None:
        """Rotate q and k in place: ``x * cos + rotate_half(x) * sin`` (``sin`` carries rotate_half's sign)."""
        x.copy_(self.torch.addcmul(x * cos, x.roll(self.head_dim // 2, -1), sin))

    def _logits(self, x: Any) -> Any:
        return self.linear(self._norm(x, self.norm_w, self.eps), self.lm_head_w, self.lm_head_b)


def _onednn_works(torch: Any, device: Any, dtype: Any) -> bool:
    """Whether oneDNN's packed linear runs here and agrees with ``F.linear`` (float32 on the CPU:
    other dtypes already go to oneDNN, or to the GPU's own kernels)."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=gen) for shape in ((5, 64), (48, 64), (48,)))
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), b, "none", [], "")
        if torch.allclose(got, torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4):
            return True
        log.warning("oneDNN's packed linear disagrees with F.linear here: float32 linear layers stay on F.linear")
        return False
    except (RuntimeError, AttributeError) as e:  # a build without the ops, a CPU oneDNN refuses
        log.info("oneDNN's packed linear is not available (%s): float32 linear layers stay on F.linear", e)
        return False


def _repoint(modules: list[Any], weight: Any, bias: Any) -> None:
    """Make each module's weight (and bias) a view of its rows of the fused tensors."""
    at = 0
    for mod in modules:
        rows = mod.weight.shape[0]
        mod.weight.data = weight[at : at + rows]
        if bias is not None:
            mod.bias.data = bias[at : at + rows]
        at += rows
