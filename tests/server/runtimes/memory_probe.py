"""Load one model folder through its runtime in a fresh process and print resident
memory before, while loaded and after unload, as JSON. Run by test_memory.py.

A tiny model of the same runtime is loaded and unloaded first, so the framework's
one-time start-up (thread pools, kernels) is not counted as the model's memory.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
from meshserve.protocol.types import InferenceRequest, Tensor
from meshserve.server.memory import release_free_memory, rss_bytes, tune_allocator
from meshserve.server.model_settings import ModelSettings
from meshserve.server.runtimes.registry import resolve_runtime


def load_predict_unload(folder: Path, x: np.ndarray) -> tuple[int, int]:
    ms = ModelSettings(name=folder.name)
    model = resolve_runtime(ms, folder)(ms, folder)
    model.load()
    model.predict(InferenceRequest(folder.name, [Tensor.from_numpy("x", x)]))
    loaded, size = rss_bytes(), model.size_bytes()
    model.unload()
    del model
    gc.collect()
    release_free_memory()
    return loaded, size


def main() -> None:
    tiny, big, width = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    tune_allocator()  # as `meshserve serve` does
    load_predict_unload(tiny, np.ones((1, 4), np.float32))
    before = rss_bytes()
    loaded, size = load_predict_unload(big, np.ones((2, width), np.float32))
    print(json.dumps({"before": before, "loaded": loaded, "after": rss_bytes(), "size_bytes": size}))


if __name__ == "__main__":
    main()
