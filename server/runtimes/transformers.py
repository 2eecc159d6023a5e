"""Hugging Face transformers models from a local folder (``save_pretrained``).

Tasks: ``text-classification``, ``token-classification``, ``fill-mask``,
``zero-shot-classification`` (pipelines) and ``feature-extraction`` (sentence
embeddings pooled here: ``mean``, ``cls`` or ``max``, optionally normalised).
Texts come in as a BYTES tensor ``text``; results go out as typed tensors
(labels BYTES, scores FP32, offsets INT64), one row per text, so clients read
them like any other tensor rather than parse JSON out of a string.

Parameters: ``task`` (else implied by the model's architecture), ``device``,
``dtype``, ``batch_size`` (texts per forward pass, default 8), ``top_k``,
``aggregation_strategy`` (token-classification, default ``simple``),
``candidate_labels`` and ``hypothesis_template`` (zero-shot), ``pooling`` and
``normalize`` (feature-extraction), ``max_length``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from meshserve.protocol.datatypes import bytes_array
from meshserve.protocol.errors import InvalidInput, ModelLoadError
from meshserve.protocol.types import InferenceRequest, ModelMetadata, Tensor, TensorMetadata
from meshserve.server.runtimes.base import Model, error_summary
from meshserve.server.runtimes.hf_import import transformers_with
from meshserve.server.runtimes.torch import DTYPE_NAMES, pick_device, tensor_bytes

TASKS = ("text-classification", "token-classification", "fill-mask", "zero-shot-classification", "feature-extraction")
ALIASES = {
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
    "embeddings": "feature-extraction",
}
ALIASES["sentence-embeddings"] = "feature-extraction"
# Tasks whose every output has one row per input text: safe to merge requests along dim 0.
BATCHABLE = ("text-classification", "fill-mask", "feature-extraction")
POOLINGS = ("mean", "cls", "max")


def _task_from_config(config: Any) -> str:
    arch = " ".join(getattr(config, "architectures", None) or [])
    if "ForSequenceClassification" in arch:
        return "text-classification"
    if "ForTokenClassification" in arch:
        return "token-classification"
    if "ForMaskedLM" in arch:
        return "fill-mask"
    return "feature-extraction"


def _texts(request: InferenceRequest, name: str, model: str) -> list[str]:
    t = request.input(name)
    if t.datatype != "BYTES":
        raise InvalidInput(f"model {model!r}: input {name!r} must be BYTES (UTF-8 text), got {t.datatype}")
    try:
        return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in t.data.reshape(-1)]
    except UnicodeDecodeError as e:
        raise InvalidInput(f"model {model!r}: input {name!r} is not UTF-8: {e}") from None


def _padded(rows: list[list[Any]], fill: Any, dtype: Any) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    if dtype is object:
        return bytes_array(
            [str(v).encode() for r in rows for v in [*r, *[fill] * (width - len(r))]], (len(rows), width)
        )
    return np.array([[*r, *[fill] * (width - len(r))] for r in rows], dtype=dtype).reshape(len(rows), width)


class TransformersModel(Model):
    def load(self) -> None:
        import torch

        transformers = transformers_with("AutoConfig", "AutoTokenizer", "AutoModel")
        assert self.path is not None
        p = self.parameters
        if not (self.path / "config.json").is_file():
            raise ModelLoadError(f"{self.path.name} has no config.json; save the model with save_pretrained")
        try:
            config = transformers.AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"cannot read config.json: {error_summary(e)}") from None
        task = p.get("task") or _task_from_config(config)
        self.task = ALIASES.get(task, task)
        if self.task not in TASKS:
            raise ModelLoadError(f"unsupported task {task!r}; supported: {', '.join(TASKS)}")
        self.supports_batching = self.task in BATCHABLE
        self._torch = torch
        self._device = pick_device(torch, p.get("device", "auto"))
        dtype = p.get("dtype")
        if dtype is not None and str(dtype).lower() not in DTYPE_NAMES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
        kwargs: dict[str, Any] = {}
        if dtype:
            kwargs["dtype"] = getattr(torch, DTYPE_NAMES[str(dtype).lower()])
        self._batch_size = int(p.get("batch_size", 8))
        self._max_length = int(p["max_length"]) if p.get("max_length") else None
        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            if self.task == "feature-extraction":
                self._model = (
                    transformers.AutoModel.from_pretrained(str(self.path), local_files_only=True, **kwargs)
                    .to(self._device)
                    .eval()
                )
                self._pipeline = None
            else:
                self._pipeline = transformers_with("pipeline").pipeline(
                    self.task, model=str(self.path), tokenizer=self._tokenizer, device=self._device, model_kwargs=kwargs
                )
                self._model = self._pipeline.model
        except Exception as e:
            raise ModelLoadError(f"cannot load a {self.task} model from {self.path.name}: {error_summary(e)}") from None
        self._pooling = p.get("pooling", "mean")
        if self._pooling not in POOLINGS:
            raise ModelLoadError(f"unknown pooling {self._pooling!r}; expected one of {', '.join(POOLINGS)}")
        self._size = tensor_bytes([*self._model.parameters(), *self._model.buffers()])
        self._hidden = int(getattr(config, "hidden_size", -1) or -1)

    def metadata(self) -> ModelMetadata:
        meta = self.settings.metadata()
        meta.platform = self.settings.platform or f"transformers:{self.task}"
        meta.parameters = {"task": self.task}
        if not meta.inputs:
            meta.inputs = [TensorMetadata("text", "BYTES", [-1])]
            if self.task == "zero-shot-classification" and not self.parameters.get("candidate_labels"):
                meta.inputs.append(TensorMetadata("candidate_labels", "BYTES", [-1]))
        if not meta.outputs:
            meta.outputs = self._output_specs()
        return meta

    def _output_specs(self) -> list[TensorMetadata]:
        k = int(self.parameters.get("top_k", 1 if self.task == "text-classification" else 5))
        row = [-1] if self.task == "text-classification" and k == 1 else [-1, -1]
        specs = {
            "text-classification": [("label", "BYTES"), ("score", "FP32")],
            "token-classification": [("entity", "BYTES"), ("score", "FP32"), ("word", "BYTES")]
            + [("start", "INT64"), ("end", "INT64")],
            "fill-mask": [("token_str", "BYTES"), ("score", "FP32"), ("token", "INT64"), ("sequence", "BYTES")],
            "zero-shot-classification": [("labels", "BYTES"), ("scores", "FP32")],
            "feature-extraction": [("embedding", "FP32")],
        }[self.task]
        out = [TensorMetadata(n, d, list(row)) for n, d in specs]
        if self.task == "token-classification":
            out.append(TensorMetadata("count", "INT64", [-1]))
        if self.task == "feature-extraction":
            out[0].shape = [-1, self._hidden]
        return out

    def size_bytes(self) -> int:
        return self._size

    def predict(self, request: InferenceRequest) -> list[Tensor]:
        texts = _texts(request, "text", self.name)
        if not texts:
            raise InvalidInput(f"model {self.name!r}: input 'text' is empty")
        run = {
            "text-classification": self._classify,
            "token-classification": self._tokens,
            "fill-mask": self._fill_mask,
            "zero-shot-classification": self._zero_shot,
            "feature-extraction": self._embed,
        }[self.task]
        return run(texts, request)

    def _call(self, texts: list[str], **kwargs: Any) -> list[Any]:
        try:
            out = self._pipeline(texts, batch_size=self._batch_size, **kwargs)
        except Exception as e:
            if type(e).__name__ == "PipelineException":  # the texts do not fit the task
                raise InvalidInput(f"model {self.name!r}: {e}") from None
            raise
        return out if isinstance(out, list) else [out]

    def _classify(self, texts: list[str], request: InferenceRequest) -> list[Tensor]:
        k = int(self.parameters.get("top_k", 1))
        rows = self._call(texts, top_k=k, truncation=True)
        rows = [r if isinstance(r, list) else [r] for r in rows]
        labels = bytes_array([d["label"].encode() for r in rows for d in r], (len(rows), k))
        scores = np.array([[d["score"] for d in r] for r in rows], dtype=np.float32)
        if k == 1:
            labels, scores = labels.reshape(-1), scores.reshape(-1)
        return [Tensor("label", "BYTES", labels), Tensor("score", "FP32", scores)]

    def _tokens(self, texts: list[str], request: InferenceRequest) -> list[Tensor]:
        strategy = self.parameters.get("aggregation_strategy", "simple")
        rows = self._call(texts, aggregation_strategy=strategy)
        rows = [r if isinstance(r, list) else [r] for r in rows]
        get = lambda key: [[d.get(key) for d in r] for r in rows]  # noqa: E731
        entity = [[d.get("entity_group", d.get("entity")) for d in r] for r in rows]
        return [
            Tensor("entity", "BYTES", _padded(entity, "", object)),
            Tensor("score", "FP32", _padded(get("score"), 0.0, np.float32)),
            Tensor("word", "BYTES", _padded(get("word"), "", object)),
            Tensor(
                "start", "INT64", _padded([[-1 if v is None else v for v in r] for r in get("start")], -1, np.int64)
            ),
            Tensor("end", "INT64", _padded([[-1 if v is None else v for v in r] for r in get("end")], -1, np.int64)),
            Tensor("count", "INT64", np.array([len(r) for r in rows], dtype=np.int64)),
        ]

    def _fill_mask(self, texts: list[str], request: InferenceRequest) -> list[Tensor]:
        mask = self._tokenizer.mask_token
        for t in texts:
            if t.count(mask) != 1:
                raise InvalidInput(f"model {self.name!r}: each text needs exactly one {mask}, got {t!r}")
        k = int(self.parameters.get("top_k", 5))
        rows = self._call(texts, top_k=k)
        if len(texts) == 1 and rows and isinstance(rows[0], dict):
            rows = [rows]
        return [
            Tensor("token_str", "BYTES", _padded([[d["token_str"] for d in r] for r in rows], "", object)),
            Tensor("score", "FP32", _padded([[d["score"] for d in r] for r in rows], 0.0, np.float32)),
            Tensor("token", "INT64", _padded([[d["token"] for d in r] for r in rows], -1, np.int64)),
            Tensor("sequence", "BYTES", _padded([[d["sequence"] for d in r] for r in rows], "", object)),
        ]

    def _zero_shot(self, texts: list[str], request: InferenceRequest) -> list[Tensor]:
        labels = self.parameters.get("candidate_labels") or _texts(request, "candidate_labels", self.name)
        if not labels:
            raise InvalidInput(f"model {self.name!r}: candidate_labels is empty")
        kwargs = {"candidate_labels": list(labels)}
        if self.parameters.get("hypothesis_template"):
            kwargs["hypothesis_template"] = self.parameters["hypothesis_template"]
        rows = self._call(texts, **kwargs)
        return [
            Tensor("labels", "BYTES", _padded([r["labels"] for r in rows], "", object)),
            Tensor("scores", "FP32", _padded([r["scores"] for r in rows], 0.0, np.float32)),
        ]

    def _embed(self, texts: list[str], request: InferenceRequest) -> list[Tensor]:
        torch = self._torch
        chunks = []
        for i in range(0, len(texts), self._batch_size):
            enc = self._tokenizer(
                texts[i : i + self._batch_size], padding=True, truncation=True,
                max_length=self._max_length, return_tensors="pt",
            ).to(self._device)  # fmt: skip
            with torch.inference_mode():
                hidden = self._model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self._pooling == "cls":
                pooled = hidden[:, 0]
            elif self._pooling == "max":
                pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
            else:
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            if self.parameters.get("normalize"):
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            chunks.append(pooled.float().cpu().numpy())
        return [Tensor("embedding", "FP32", np.concatenate(chunks).astype(np.float32))]

    def unload(self) -> None:
        on_gpu = getattr(self, "_device", None) is not None and self._device.type == "cuda"
        self._pipeline = self._model = self._tokenizer = None
        if on_gpu:
            self._torch.cuda.empty_cache()
