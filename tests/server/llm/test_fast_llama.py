"""The fast Llama forward against transformers' own: logits of prefill (batched, flattened),
chunked prefill and batched decode at mixed lengths, rows leaving mid-run, on oneDNN's packed
linear and on ``F.linear``; the weights held once either way; and the models it declines (the
engine keeps transformers' path for those)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from meshserve.server.llm.fast_llama import FastLlama, unsupported  # noqa: E402

TOL = dict(atol=2e-4, rtol=1e-4)
PROMPTS = [[1, 17, 42, 99, 7, 300, 12], [1, 5], [1, *range(250, 261), 8], [1, 9, 9]]


def hf_logits(model, ids: list[int]):
    """Every position's logits of one unpadded sequence, by transformers."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


def fast(model, packed: bool = True) -> FastLlama:
    """On a copy: packing frees the model's dense linear weights, and ``model`` is the reference."""
    return FastLlama(copy.deepcopy(model), max_len=model.config.max_position_embeddings, packed_linear=packed)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_prefill_logits_equal_transformers(model, packed):
    fl = fast(model, packed)
    assert fl.packed is packed  # float32 on the CPU: oneDNN's packed linear is taken when asked for
    with torch.inference_mode():
        last, every = fl.prefill(PROMPTS, keep_all=True)
    assert fl.rows == len(PROMPTS)
    for i, ids in enumerate(PROMPTS):
        ref = hf_logits(model, ids)
        torch.testing.assert_close(every[i], ref, **TOL)
        torch.testing.assert_close(last[i], ref[-1], **TOL)


def test_chunked_prefill_then_decode_equals_transformers(model):
    """A long prompt in chunks of 5 (in its own slot, while two rows run), then it joins and decodes."""
    fl = fast(model)
    long_ids = PROMPTS[2] + PROMPTS[0] + PROMPTS[3]
    with torch.inference_mode():
        fl.prefill(PROMPTS[:2], keep_all=False)
        got = []
        for start in range(0, len(long_ids), 5):
            last, every = fl.prefill_chunk(long_ids[start : start + 5], start, keep_all=True)
            got.append(every[0])
        ref = hf_logits(model, long_ids)
        torch.testing.assert_close(torch.cat(got), ref, **TOL)
        torch.testing.assert_close(last[0], ref[-1], **TOL)
        fl.join_chunked(len(long_ids))
        assert fl.rows == 3
        seqs = [PROMPTS[0] + [3], PROMPTS[1] + [4], long_ids + [5]]
        logits = fl.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs])
    for row, ids in zip(logits, seqs, strict=True):
        torch.testing.assert_close(row, hf_logits(model, ids)[-1], **TOL)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_batched_decode_at_mixed_lengths_with_rows_leaving(model, packed):
    """Greedy decoding of four rows of different lengths; a middle row leaves (the last row takes
    its slot) and a new prompt joins mid-run; every row's logits stay transformers'."""
    fl = fast(model, packed)
    seqs = [list(p) for p in PROMPTS]
    with torch.inference_mode():
        last, _ = fl.prefill(seqs, keep_all=False)
        for s, row in zip(seqs, last, strict=True):
            s.append(int(row.argmax()))
        for step in range(6):
            if step == 2:
                order = fl.drop([0, 2, 3])  # row 1 leaves: row 3 moves into its slot
                assert order == [0, 3, 2]
                seqs = [seqs[i] for i in order]
            if step == 3:
                joined = [1, 77, 78]
                last, _ = fl.prefill([joined], keep_all=False)
                seqs.append(joined + [int(last[0].argmax())])
            logits = fl.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs])
            for s, row in zip(seqs, logits, strict=True):
                torch.testing.assert_close(row, hf_logits(model, s)[-1], **TOL)
                s.append(int(row.argmax()))


def test_the_cache_grows_past_its_first_slots_and_capacity(model):
    fl = fast(model)
    start_capacity, start_slots = fl.capacity, fl.slots
    ids = [(7 * i) % 500 + 4 for i in range(start_capacity + 20)]
    with torch.inference_mode():
        last, _ = fl.prefill([ids], keep_all=False)
        grown = [[(5 * i + j) % 400 + 4 for j in range(3 + i)] for i in range(start_slots + 2)]
        more, _ = fl.prefill(grown, keep_all=False)  # rows past the first slots: the cache doubles them
    assert fl.capacity > start_capacity and fl.slots > start_slots and fl.rows == len(grown) + 1
    layers, kv, d = len(fl.layers), model.config.num_key_value_heads, fl.head_dim
    assert fl.size_bytes() - fl.packed_bytes == layers * fl.slots * 2 * kv * fl.capacity * d * 4  # float32
    torch.testing.assert_close(last[0], hf_logits(model, ids)[-1], **TOL)
    for row, g in zip(more, grown, strict=True):
        torch.testing.assert_close(row, hf_logits(model, g)[-1], **TOL)


def test_fused_weights_are_shared_with_the_model(model):
    """Fusing q/k/v and gate/up holds no second copy: the HF modules point into the fused tensors."""
    own = copy.deepcopy(model)
    fl = FastLlama(own, max_len=256, packed_linear=False)
    attn = own.model.layers[0].self_attn
    qkv = fl.layers[0][2]
    assert not fl.packed and fl.packed_bytes == 0
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()


def linear_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear)


def test_packed_weights_are_held_once(model):
    """Packed for oneDNN, the dense linear weights are freed: the model's parameters lose exactly
    what the packed copies hold, so the engine's size (parameters + the forward's bytes) is the same."""
    own = copy.deepcopy(model)
    before = sum(t.numel() * t.element_size() for t in own.parameters())
    dense = linear_bytes(own)
    fl = FastLlama(own, max_len=256)
    assert fl.packed and fl.packed_bytes == dense > 0
    assert linear_bytes(own) == 0  # every projection and the (untied) lm_head
    after = sum(t.numel() * t.element_size() for t in own.parameters())
    assert after + fl.packed_bytes == before
    assert all(t.is_mkldnn for layer in fl.layers for t in (layer[2], layer[4], layer[8], layer[11]))


def test_a_tied_lm_head_stays_the_embedding():
    """A tied lm_head is the embedding matrix (the lookup needs it dense): it is not packed (no
    second copy) and the logits still equal transformers'."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    tied = transformers.LlamaForCausalLM(config).eval()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    own = copy.deepcopy(tied)
    fl = FastLlama(own, max_len=128)
    assert fl.packed and not fl.lm_head_w.is_mkldnn
    assert fl.lm_head_w.data_ptr() == own.model.embed_tokens.weight.data_ptr()
    assert fl.packed_bytes == linear_bytes(tied) - 300 * 64 * 4  # the projections only
    with torch.inference_mode():
        last, _ = fl.prefill([[1, 2, 3, 4]], keep_all=False)
        logits = fl.decode([5], [4])
    torch.testing.assert_close(last[0], hf_logits(tied, [1, 2, 3, 4])[-1], **TOL)
    torch.testing.assert_close(logits[0], hf_logits(tied, [1, 2, 3, 4, 5])[-1], **TOL)


def test_qwen2_with_qkv_bias_equals_transformers():
    config = transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(config).eval()
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    assert unsupported(qwen, 128) is None
    fl = FastLlama(copy.deepcopy(qwen), max_len=128)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    with torch.inference_mode():
        last, _ = fl.prefill(prompts, keep_all=False)
        logits = fl.decode([6, 7], [5, 2])
    for i, ids in enumerate(prompts):
        torch.testing.assert_close(last[i], hf_logits(qwen, ids)[-1], **TOL)
    torch.testing.assert_close(logits[0], hf_logits(qwen, [*prompts[0], 6])[-1], **TOL)
    torch.testing.assert_close(logits[1], hf_logits(qwen, [*prompts[1], 7])[-1], **TOL)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope type dynamic"),
        ({"hidden_act": "gelu"}, "activation gelu"),
    ],
)
def test_models_it_cannot_run_are_declined(change, reason):
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64)  # fmt: skip
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base, **change))
    assert unsupported(llama, 64) == reason
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert unsupported(gpt2, 64) == "architecture GPT2LMHeadModel"


def test_layers_it_cannot_fuse_are_declined(model):
    """A quantized or adapted projection (any Linear subclass) keeps the model on transformers' path."""

    class Adapted(torch.nn.Linear):
        pass

    assert unsupported(model, 256) is None
    attn = model.model.layers[-1].self_attn
    plain = attn.v_proj
    attn.v_proj = Adapted(plain.in_features, plain.out_features, bias=False)
    try:
        assert unsupported(model, 256) == "Adapted layers"
    finally:
        attn.v_proj = plain
