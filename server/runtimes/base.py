"""The runtime SPI: the one class every runtime and every user model extends.

A runtime loads a model from a local directory, reports its size in bytes,
predicts on an ``InferenceRequest`` and unloads, freeing its memory. ``load``,
``predict``, ``preprocess``, ``postprocess`` and ``unload`` may each be plain
functions or coroutines: plain ``predict`` runs on a worker thread (CPU-bound
work never blocks the event loop), a coroutine runs on the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshserve.protocol.types import InferenceRequest, ModelMetadata

if TYPE_CHECKING:
    from meshserve.server.model_settings import ModelSettings


class Model:
    """Base class of runtimes and custom models (``from meshserve import Model``).

    Override ``load`` and ``predict``; optionally ``preprocess``/``postprocess``
    (as KServe's ``Model`` offers), ``unload``, ``size_bytes`` and ``metadata``.
    ``predict`` may return an ``InferenceResponse``, a list of ``Tensor``, a
    dict of name -> array, or one array (named after the first declared output,
    else ``output0``).

    ``supports_batching``: the model treats dim 0 of every input and output as
    the batch, row by row, so the data plane may merge concurrent requests into
    one call (``max_batch_size`` in the settings) and split the result back.
    """

    supports_batching: bool = False

    def __init__(self, settings: ModelSettings, path: Path | None = None) -> None:
        self.settings = settings
        self.path = path
        self.name = settings.name
        self.version = settings.version

    @property
    def parameters(self) -> dict[str, Any]:
        return self.settings.parameters

    def load(self) -> Any:
        """Read the model from ``self.path``. Raise to fail the load."""
        return None

    def predict(self, request: InferenceRequest) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement predict")

    def unload(self) -> Any:
        """Drop references to the model so its memory can be freed."""
        return None

    def size_bytes(self) -> int | None:
        """The model's size in memory; None lets the server measure what the loaded object holds."""
        return None

    def metadata(self) -> ModelMetadata:
        """Declared inputs and outputs; the data plane validates requests against them."""
        return self.settings.metadata()


def error_summary(e: BaseException) -> str:
    """A framework's exception as one line: its type and first line (tracebacks of C++ frames stay in logs)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
