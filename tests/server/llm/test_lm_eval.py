"""lm-evaluation-harness as the client: ``lm_eval`` with its ``local-completions`` model
against a real server's OpenAI completions API, on the tiny Llama and two tasks written
here (a multiple-choice loglikelihood task and a generate-until task, a few local docs
each). It must complete, and every loglikelihood it got must equal the one transformers
computes in this process on the same token ids.

lm-eval runs as its own process (its CLI), offline: the tokenizer is the model's folder and
the data a local JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.llm.api_support import llm_server

pytest.importorskip("lm_eval")

LL_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " a tower"], "answer": 0},
    {"question": "Where is the Eiffel Tower? It stands", "choices": [" in Paris", " on the moon"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " fence"], "answer": 0},
]
GEN_DOCS = [
    {"question": "Continuous batching lets", "answer": "many requests"},
    {"question": "Bonjour, ça va ?", "answer": "Très bien"},
    {"question": "0 1 2 3 4 5", "answer": "6 7"},
]
MAX_GEN = 8


def write_tasks(folder: Path) -> None:
    for name, docs in (("ll", LL_DOCS), ("gen", GEN_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = (
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        'doc_to_text: "{{{{question}}}}"\n'
    )
    (folder / "meshserve_ll.yaml").write_text(
        "task: meshserve_ll\n" + common.format(data=folder / "ll.jsonl") + "output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "meshserve_gen.yaml").write_text(
        "task: meshserve_gen\n" + common.format(data=folder / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_target: "{{answer}}"\n'
        f'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n'
        "  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with llm_server(tmp_path_factory.mktemp("lm-eval"), tiny_llama) as srv:
        yield srv


def test_lm_eval_local_completions(server, tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_tasks(tmp_path)
    out = tmp_path / "out"
    model_args = (
        f"model=tiny-llama,base_url={server.http_url}/v1/completions,tokenizer={tiny_llama},"
        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,timeout=60"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HOME": str(tmp_path / "hf")}  # fmt: skip
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "meshserve_ll,meshserve_gen", "--include_path", str(tmp_path), "--batch_size", "4",
           "--output_path", str(out), "--log_samples"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (results,) = out.rglob("results_*.json")
    doc = json.loads(results.read_text())
    assert doc["results"]["meshserve_ll"]["acc,none"] >= 0 and "exact_match,none" in doc["results"]["meshserve_gen"]

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()

    def loglikelihood(context: str, continuation: str) -> float:
        """As lm-eval encodes a pair (whole sequence, then split) and sums the continuation's logprobs."""
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tok(context, add_special_tokens=False)["input_ids"])
        with torch.inference_mode():
            lp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        return sum(float(lp[i - 1, whole[i]]) for i in range(n, len(whole)))

    (ll_samples,) = out.rglob("samples_meshserve_ll_*.jsonl")
    samples = [json.loads(line) for line in ll_samples.read_text().splitlines()]
    assert len(samples) == len(LL_DOCS)
    checked = 0
    for s in samples:
        for args, resp in zip(s["arguments"].values(), s["resps"], strict=True):
            got = float(resp[0][0])
            assert got == pytest.approx(loglikelihood(args["arg_0"], args["arg_1"]), abs=1e-4)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in LL_DOCS)

    (gen_samples,) = out.rglob("samples_meshserve_gen_*.jsonl")
    gens = [json.loads(line) for line in gen_samples.read_text().splitlines()]
    assert len(gens) == len(GEN_DOCS)
    for s in gens:
        context = s["arguments"]["gen_args_0"]["arg_0"]
        ids = tok(context, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=MAX_GEN, do_sample=False)[0][len(ids) :]
        want = tok.decode(greedy, skip_special_tokens=True).split("\n\n")[0]
        assert s["resps"][0][0] == want
