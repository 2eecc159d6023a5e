"""ONNX models on ONNX Runtime. Inputs and outputs (names, datatypes, shapes) come
from the session, so requests are checked against the model's own signature.

Parameters (all optional): ``file``; ``providers`` (a list, default: CUDA when
this onnxruntime has it, then CPU); ``intra_op_threads``, ``inter_op_threads``;
``graph_optimization_level`` (``disable``, ``basic``, ``extended``, ``all``);
``enable_cpu_mem_arena`` (default true).

The size is the resident memory the session adds while it is created (weights,
pre-packed copies, arena), at least the file's size: ONNX Runtime has no API
that reports what a session holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from meshserve.protocol.errors import InvalidInput, ModelLoadError
from meshserve.protocol.types import InferenceRequest, ModelMetadata, Tensor, TensorMetadata
from meshserve.server.memory import measure_rss
from meshserve.server.runtimes.base import Model, error_summary
from meshserve.server.runtimes.files import ONNX_SUFFIXES, find_model_file

ONNX_TYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(string)": "BYTES",
}  # fmt: skip
OPT_LEVELS = ("disable", "basic", "extended", "all")


def _tensor_meta(arg: Any) -> TensorMetadata:
    datatype = ONNX_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"input/output {arg.name!r} has type {arg.type}, which the protocol cannot carry")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
    return TensorMetadata(arg.name, datatype, shape)


class OnnxModel(Model):
    supports_batching = True

    def load(self) -> None:
        import onnxruntime as ort

        assert self.path is not None
        p = self.parameters
        file = find_model_file(self.path, ONNX_SUFFIXES, p.get("file"))
        options = ort.SessionOptions()
        if p.get("intra_op_threads"):
            options.intra_op_num_threads = int(p["intra_op_threads"])
        if p.get("inter_op_threads"):
            options.inter_op_num_threads = int(p["inter_op_threads"])
        level = str(p.get("graph_optimization_level", "all")).lower()
        if level not in OPT_LEVELS:
            raise ModelLoadError(f"unknown graph_optimization_level {level!r}; expected one of {', '.join(OPT_LEVELS)}")
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, {"disable": "ORT_DISABLE_ALL", "all": "ORT_ENABLE_ALL"}.get(level, "")
            or f"ORT_ENABLE_{level.upper()}"
        )  # fmt: skip
        options.enable_cpu_mem_arena = bool(p.get("enable_cpu_mem_arena", True))
        providers = self._providers(ort, p.get("providers"))
        with measure_rss() as grown:
            try:
                self._session = ort.InferenceSession(str(file), sess_options=options, providers=providers)
            except Exception as e:
                raise ModelLoadError(
                    f"{file.name} is not an ONNX model ONNX Runtime can run: {error_summary(e)}"
                ) from None
        self._size = max(grown.bytes, file.stat().st_size)
        self._inputs = [_tensor_meta(a) for a in self._session.get_inputs()]
        self._outputs = [_tensor_meta(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]

    @staticmethod
    def _providers(ort: Any, wanted: Any) -> list[str]:
        available = ort.get_available_providers()
        if not wanted:
            return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ModelLoadError(f"execution provider(s) {', '.join(missing)} not available (have {available})")
        return wanted

    def metadata(self) -> ModelMetadata:
        """The session's signature, unless the settings declare one (say, to pin a dynamic dim)."""
        meta = self.settings.metadata()
        meta.platform = self.settings.platform or "onnxruntime_onnx"
        meta.inputs = meta.inputs or list(self._inputs)
        meta.outputs = meta.outputs or list(self._outputs)
        return meta

    def size_bytes(self) -> int:
        return self._size

    def predict(self, request: InferenceRequest) -> list[Tensor]:
        feed: dict[str, Any] = {}
        for t in request.inputs:
            data = t.data
            if t.datatype == "BYTES":  # ONNX strings are str
                data = np.array([x.decode("utf-8", "replace") for x in data.reshape(-1)], dtype=object).reshape(
                    data.shape
                )
            feed[t.name] = data
        missing = [i.name for i in self._inputs if i.name not in feed]
        if missing:
            raise InvalidInput(f"model {self.name!r} needs input(s) {', '.join(missing)}")
        wanted = [o.name for o in request.outputs] if request.outputs else self._output_names
        results = self._session.run(wanted, feed)
        return [Tensor.from_numpy(name, value) for name, value in zip(wanted, results, strict=True)]

    def unload(self) -> None:
        self._session = None
