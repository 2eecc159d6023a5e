"""Tiny models made on the spot, one folder each, in the formats users save.
Nothing comes from a model hub. Frameworks are imported inside each builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_FEATURES = 4
N_CLASSES = 3


def write_settings(folder: Path, **doc) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-settings.json").write_text(json.dumps(doc))
    return folder


def tiny_mlp(seed: int = 0, hidden: int = 16):
    import torch

    from tests.server.runtimes.torch_classes import TinyMLP

    torch.manual_seed(seed)
    return TinyMLP(N_FEATURES, hidden, N_CLASSES).eval()


def save_torchscript(folder: Path, module=None) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module or tiny_mlp()).save(str(folder / "model.pt"))
    return folder


def save_export(folder: Path, module=None) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(module or tiny_mlp(), (torch.randn(2, N_FEATURES),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, str(folder / "model.pt2"))
    return folder


def save_state_dict(folder: Path, module=None) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save((module or tiny_mlp()).state_dict(), str(folder / "weights.pt"))
    return folder


def save_onnx(folder: Path, module=None) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module or tiny_mlp(),
        (torch.randn(2, N_FEATURES),),
        str(folder / "model.onnx"),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    return folder


def training_data(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((n, N_FEATURES), dtype=np.float32)
    y = np.minimum((x[:, 0] * N_CLASSES).astype(np.int64), N_CLASSES - 1)
    return x, y


def save_xgboost(folder: Path, fname: str = "model.ubj", objective: str = "multi:softprob"):
    import xgboost as xgb

    folder.mkdir(parents=True, exist_ok=True)
    x, y = training_data()
    params = {"objective": objective, "max_depth": 3, "nthread": 1}
    if objective.startswith("multi:"):
        params["num_class"] = N_CLASSES
    else:
        y = (y > 0).astype(np.int64) if objective.startswith("binary:") else x[:, 1] * 2
    booster = xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=8)
    booster.save_model(str(folder / fname))
    return booster


def save_lightgbm(folder: Path, objective: str = "multiclass"):
    import lightgbm as lgb

    folder.mkdir(parents=True, exist_ok=True)
    x, y = training_data()
    params = {"objective": objective, "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5}
    if objective == "multiclass":
        params["num_class"] = N_CLASSES
    elif objective == "binary":
        y = (y > 0).astype(np.int64)
    booster = lgb.train(params, lgb.Dataset(x, label=y), num_boost_round=8)
    booster.save_model(str(folder / "model.txt"))
    return booster


SENTENCES = [
    "the cat sat on the mat",
    "paris is the capital of france",
    "berlin is a city in germany",
    "the quick brown fox jumps over the lazy dog",
    "models serve predictions over rest and grpc",
]
NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}


def save_tiny_bert(folder: Path, head: str, labels: dict[int, str] | None = None) -> Path:
    """A random 2-layer BERT with a WordPiece tokenizer trained here, saved with save_pretrained.
    ``head``: sequence, token, masked-lm or base."""
    import torch
    import transformers
    from tokenizers import BertWordPieceTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(SENTENCES * 4, vocab_size=200, min_frequency=1)
    tok = transformers.BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=True)
    tok.add_special_tokens({"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]"})
    tok.add_special_tokens({"cls_token": "[CLS]", "mask_token": "[MASK]"})
    labels = labels or {0: "NEGATIVE", 1: "POSITIVE"}
    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    cls = {
        "sequence": transformers.BertForSequenceClassification,
        "token": transformers.BertForTokenClassification,
        "masked-lm": transformers.BertForMaskedLM,
        "base": transformers.BertModel,
    }[head]
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
