"""Turn a GGUF checkpoint into a plain safetensors folder every loader reads.

transformers dequantizes a GGUF file on load; rebuilding the model from its config
without the quantization settings and saving it gives an ordinary Hugging Face
folder (config, weights, tokenizer) that the ``llm`` runtime and vLLM serve.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from meshserve.server.runtimes.hf_import import transformers_with


def convert(src: Path, gguf_file: str, target: Path) -> Path:
    """Write ``target`` (atomically: concurrent runs never see half a folder); a no-op if it exists."""
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch

    hf = transformers_with("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer")
    AutoConfig, AutoModelForCausalLM, AutoTokenizer = hf.AutoConfig, hf.AutoModelForCausalLM, hf.AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(str(src), gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        if target.is_dir():  # e.g. a folder holding only settings: move the files in
            for f in tmp.iterdir():
                os.replace(f, target / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
