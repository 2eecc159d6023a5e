"""PyTorch models in the three forms their users save: TorchScript (``torch.jit.save``),
``torch.export`` programs (``.pt2``) and a state dict with the model class named
by import path.

Parameters (all optional): ``file``; ``format`` (``torchscript``, ``export``,
``state_dict``; implied by the file and ``model_class``); ``model_class`` and
``model_kwargs``; ``device`` (``auto``, ``cpu``, ``cuda:N``); ``dtype``
(``float32``, ``float16``, ``bfloat16``); ``threads`` (intra-op threads, which
torch keeps per process); ``inference_mode`` (default true).

``torch`` is imported in ``load``: the server starts without it.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import numpy as np
from meshserve.protocol.errors import InvalidInput, ModelLoadError
from meshserve.protocol.types import InferenceRequest, ModelMetadata, Tensor, TensorMetadata
from meshserve.server.runtimes.base import Model, error_summary
from meshserve.server.runtimes.files import TORCH_SUFFIXES, find_model_file
from meshserve.server.runtimes.python import import_object

FORMATS = ("torchscript", "export", "state_dict")
# torch.export.load keeps its deserializer in a global: two loads at once (startup
# preloads several models on worker threads) break each other.
_EXPORT_LOAD_LOCK = threading.Lock()
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16"}
DTYPE_NAMES |= {"bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}


def oip_datatype(dtype: Any) -> str | None:
    """The OIP datatype of a torch dtype (None where the protocol has none)."""
    name = str(dtype).removeprefix("torch.")
    return {
        "float32": "FP32", "float16": "FP16", "float64": "FP64", "bool": "BOOL", "uint8": "UINT8",
        "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    }.get(name)  # fmt: skip


def pick_device(torch: Any, spec: str) -> Any:
    spec = str(spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ModelLoadError(f"bad device {spec!r}: {e}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(f"device {spec!r} is not available on this machine")
    return device


def tensor_bytes(tensors: Any) -> int:
    """Bytes held by distinct tensor storages (shared weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _export_signature(ep: Any) -> tuple[list[TensorMetadata], list[TensorMetadata]]:
    """Inputs and outputs (name, datatype, shape with -1 for dynamic dims) of an exported program."""

    def meta(name: str, node: Any) -> TensorMetadata | None:
        val = node.meta.get("val") if node is not None else None
        datatype = oip_datatype(getattr(val, "dtype", None))
        if datatype is None:
            return None
        return TensorMetadata(name, datatype, [d if type(d) is int else -1 for d in val.shape])

    nodes = {n.name: n for n in ep.graph.nodes}
    inputs = [meta(n, nodes.get(n)) for n in ep.graph_signature.user_inputs]
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    returned = list(out_node.args[0])[-len(ep.graph_signature.user_outputs) :]
    outputs = [meta(f"output{i}", n) for i, n in enumerate(returned)]
    if any(m is None for m in inputs) or any(m is None for m in outputs):
        return [], []
    return inputs, outputs  # type: ignore[return-value]


class TorchModel(Model):
    supports_batching = True

    def load(self) -> None:
        import torch

        assert self.path is not None
        p = self.parameters
        model_class = p.get("model_class")
        file = find_model_file(self.path, TORCH_SUFFIXES, p.get("file"))
        fmt = p.get("format") or ("export" if file.suffix == ".pt2" else "state_dict" if model_class else "torchscript")
        if fmt not in FORMATS:
            raise ModelLoadError(f"unknown torch format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self._torch = torch
        self._device = pick_device(torch, p.get("device", "auto"))
        dtype_name = p.get("dtype")
        if dtype_name is not None and str(dtype_name).lower() not in DTYPE_NAMES:
            raise ModelLoadError(f"unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPE_NAMES)}")
        self._dtype = getattr(torch, DTYPE_NAMES[str(dtype_name).lower()]) if dtype_name else None
        if p.get("threads"):
            torch.set_num_threads(int(p["threads"]))
        self._inference_mode = bool(p.get("inference_mode", True))
        self._inferred_inputs: list[TensorMetadata] = []
        self._inferred_outputs: list[TensorMetadata] = []
        self._constants: list[Any] = []
        self._platform = {"torchscript": "pytorch_libtorch", "export": "pytorch_export", "state_dict": "pytorch"}[fmt]
        if fmt == "torchscript":
            module = self._load_torchscript(file)
        elif fmt == "export":
            module = self._load_export(file)
        else:
            module = self._load_state_dict(file, model_class, p.get("model_kwargs") or {})
        if fmt != "export":
            module.eval()
        if self._dtype is not None:
            module = module.to(self._dtype)
        self._module = module.to(self._device)
        self._size = tensor_bytes([*module.parameters(), *module.buffers(), *self._constants])
        self._output_names = [o.name for o in self.metadata().outputs]

    def _load_torchscript(self, file: Any) -> Any:
        try:
            module = self._torch.jit.load(str(file), map_location=self._device)
        except Exception as e:
            raise ModelLoadError(
                f"{file.name} is not a TorchScript program ({error_summary(e)}); for a state dict set "
                "parameters.model_class, for a torch.export program use the .pt2 suffix or format 'export'"
            ) from None
        self._arg_names = [a.name for a in module.forward.schema.arguments][1:]
        return module

    def _load_export(self, file: Any) -> Any:
        try:
            with _EXPORT_LOAD_LOCK:
                ep = self._torch.export.load(str(file))
        except Exception as e:
            raise ModelLoadError(f"{file.name} is not a torch.export program ({error_summary(e)})") from None
        self._inferred_inputs, self._inferred_outputs = _export_signature(ep)
        self._arg_names = list(ep.graph_signature.user_inputs)
        self._constants = [v for v in ep.constants.values() if hasattr(v, "untyped_storage")]
        return ep.module()

    def _load_state_dict(self, file: Any, model_class: str | None, kwargs: dict[str, Any]) -> Any:
        if not model_class:
            raise ModelLoadError("a state dict needs parameters.model_class ('module:Class' or 'file.py:Class')")
        cls = import_object(model_class, self.path if self.path and self.path.is_dir() else None)
        if not (isinstance(cls, type) and issubclass(cls, self._torch.nn.Module)):
            raise ModelLoadError(f"{model_class!r} is not a torch.nn.Module subclass")
        try:
            module = cls(**kwargs)
        except Exception as e:
            raise ModelLoadError(f"{model_class}(**model_kwargs) failed: {type(e).__name__}: {e}") from None
        try:
            state = self._torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{file.name} is not a state dict torch.load can read ({error_summary(e)})") from None
        if not isinstance(state, dict):
            raise ModelLoadError(f"{file.name} holds a {type(state).__name__}, not a state dict")
        try:
            module.load_state_dict(state)
        except Exception as e:
            raise ModelLoadError(f"{file.name} does not fit {model_class}: {error_summary(e)}") from None
        params = inspect.signature(module.forward).parameters.values()
        self._arg_names = [a.name for a in params if a.kind in (a.POSITIONAL_ONLY, a.POSITIONAL_OR_KEYWORD)]
        return module

    def metadata(self) -> ModelMetadata:
        meta = self.settings.metadata()
        meta.platform = self.settings.platform or self._platform
        if not meta.inputs:
            meta.inputs = list(self._inferred_inputs)
        if not meta.outputs:
            meta.outputs = list(self._inferred_outputs)
        return meta

    def size_bytes(self) -> int:
        return self._size

    def _args(self, request: InferenceRequest) -> list[Any]:
        names = self._arg_names
        given = {t.name: t for t in request.inputs}
        if len(given) != len(request.inputs):
            raise InvalidInput(f"model {self.name!r}: input names repeat")
        if set(given) <= set(names) and len(given) == len(names):
            ordered = [given[n] for n in names]
        elif len(request.inputs) == len(names):
            ordered = list(request.inputs)  # Triton's INPUT__0, INPUT__1...: by position
        else:
            raise InvalidInput(
                f"model {self.name!r} takes {len(names)} input(s) ({', '.join(names)}), got {len(given)}"
            )
        args = []
        for t in ordered:
            if t.datatype == "BYTES":
                raise InvalidInput(f"model {self.name!r}: input {t.name!r} is BYTES; torch models take numbers")
            arr = t.data if t.data.flags.writeable else t.data.copy()
            x = self._torch.from_numpy(np.ascontiguousarray(arr))
            if self._dtype is not None and x.is_floating_point():
                x = x.to(self._dtype)
            args.append(x.to(self._device))
        return args

    def predict(self, request: InferenceRequest) -> list[Tensor]:
        args = self._args(request)
        if self._inference_mode:
            with self._torch.inference_mode():
                result = self._module(*args)
        else:
            with self._torch.no_grad():
                result = self._module(*args)
        return self._outputs(result)

    def _outputs(self, result: Any) -> list[Tensor]:
        declared = self._output_names
        if isinstance(result, dict):
            pairs = list(result.items())
        else:
            values = list(result) if isinstance(result, (tuple, list)) else [result]
            names = declared if len(declared) == len(values) else [f"output{i}" for i in range(len(values))]
            pairs = list(zip(names, values, strict=True))
        out = []
        for name, value in pairs:
            if not isinstance(value, self._torch.Tensor):
                raise TypeError(f"output {name!r} is a {type(value).__name__}, not a tensor")
            value = value.detach().cpu()
            if value.dtype == self._torch.bfloat16:
                value = value.float()
            out.append(Tensor.from_numpy(str(name), value.numpy()))
        return out

    def unload(self) -> None:
        on_gpu = getattr(self, "_device", None) is not None and self._device.type == "cuda"
        self._module = None
        self._constants = []
        if on_gpu:
            self._torch.cuda.empty_cache()
