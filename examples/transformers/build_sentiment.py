"""A tiny sentiment classifier, trained here in seconds, saved as a transformers folder
(``save_pretrained``: model and tokenizer) for the transformers example of docs/features/models-and-runtimes.md.

    .venv/bin/python examples/transformers/build_sentiment.py models/sentiment

Not a useful model: a one-layer BERT over a few dozen words, so the example runs offline."""

from __future__ import annotations

import sys
from pathlib import Path

POSITIVE = ["good", "great", "nice", "lovely", "happy", "fine", "wonderful", "what a good day", "a great film"]
NEGATIVE = ["awful", "bad", "terrible", "sad", "horrible", "poor", "dreadful", "what a bad day", "an awful film"]


def build(out: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(0)
    words = sorted({w for text in POSITIVE + NEGATIVE for w in text.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tokenizer = BertTokenizerFast(vocab=vocab)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    texts = POSITIVE + NEGATIVE
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved {out} (training loss {loss.item():.3f})")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "models/sentiment"))
