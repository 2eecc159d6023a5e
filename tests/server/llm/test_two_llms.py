"""Two transformers models loading at once in a fresh process: transformers resolves its
names lazily and not thread-safely, so the runtimes take the module from
``transformers_with`` (names resolved under a lock)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx

from tests.server.llm.api_support import llm_models
from tests.support.server import start_server

RACE = """
import sys, threading
from meshserve.server.runtimes.hf_import import transformers_with
errors = []
def load(tokenizer):
    try:
        if tokenizer:
            transformers_with("AutoTokenizer").AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
        else:
            hf = transformers_with("AutoModelForCausalLM")
            hf.AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=load, args=(k,)) for k in (True, True, False, False)]
for t in threads: t.start()
for t in threads: t.join()
print(errors)
"""


def test_four_threads_load_tokenizers_and_models_at_once_in_a_fresh_process(tiny_llama):
    # Without the lock, this fails 3 runs in 3 with "module 'transformers' has no attribute ...".
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", RACE, str(tiny_llama)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_a_server_with_two_llms_loads_both_at_start_up(tiny_llama, tmp_path):
    models = llm_models(tmp_path, tiny_llama)
    second = shutil.copytree(tiny_llama, models / "second-llama")
    (second / "model-settings.json").write_text(json.dumps({"name": "second-llama", "runtime": "llm"}))
    srv = start_server(models, tmp_path / "server.log")
    try:
        body = {"text_input": "hi", "parameters": {"max_tokens": 4, "temperature": 0, "ignore_eos": True}}
        with httpx.Client(base_url=srv.http_url, timeout=60) as http:
            answers = [http.post(f"/v2/models/{m}/generate", json=body) for m in ("tiny-llama", "second-llama")]
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        assert answers[0].json()["text_output"] == answers[1].json()["text_output"]  # the same weights
        assert "has no attribute" not in srv.log()
    finally:
        srv.stop()
