"""``meshserve generate``: a JSONL file through the engine, results as they finish,
a rerun resumes (skipping ids already written, dropping a truncated last line)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import orjson
import pytest

from tests.support.server import REPO

LINES = [
    {"id": 1, "prompt": "The capital of France is"},
    {"id": "two", "prompt": "Where is the Eiffel Tower?", "max_tokens": 3},
    {"id": 3, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4},
    {"id": 4, "prompt": "word " * 400},  # longer than the context: an error line, the rest goes on
    {"id": 5, "prompt": "Bonjour", "ignore_eos": True},
    {"id": 6, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"}]},
]


def meshserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.server.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=180)  # fmt: skip


def write_jsonl(path, rows) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "prompts.jsonl"
    write_jsonl(path, LINES)
    return path


def test_generate_then_resume(tiny_llama, prompts, tmp_path):
    """Three runs: from a file:// URI, then resumed from an oci:// modelcar, then all done."""
    from tests.loaders.conftest import start_registry

    # The model's settings give the default max_tokens (6) for lines that set none.
    model = tmp_path / "tiny-llama"
    shutil.copytree(tiny_llama, model)
    (model / "model-settings.json").write_text('{"parameters": {"generation": {"max_tokens": 6}}}')
    registry = start_registry(tmp_path / "registry")
    try:
        _generate_then_resume(model, prompts, tmp_path, registry.host)
    finally:
        registry.stop()


def _generate_then_resume(tiny_llama, prompts, tmp_path, registry: str) -> None:
    image = f"oci://{registry}/models/tiny-llama:1"
    remote = ["--insecure", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    pushed = meshserve("modelcar", "build", str(tiny_llama), "--tag", image, "--uncompressed", *remote)
    assert pushed.returncode == 0, pushed.stderr
    out = tmp_path / "results.jsonl"
    args = ["--input", str(prompts), "--output", str(out), "--temperature", "0"]
    first = meshserve("generate", "--model", tiny_llama.as_uri(), *args)
    assert first.returncode == 1, first.stderr  # one line failed
    assert "tok/s" in first.stderr and "6 written (1 errors)" in first.stderr
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {1, "two", 3, 4, 5, 6}
    assert "context" in rows[4]["error"]
    assert rows["two"]["completion_tokens"] <= 3 and rows[3]["completion_tokens"] <= 4
    assert rows[5]["completion_tokens"] == 6 and rows[5]["finish_reason"] == "length"
    for r in (rows[1], rows["two"], rows[3], rows[5], rows[6]):
        assert isinstance(r["text"], str) and r["prompt_tokens"] > 0
        assert r["finish_reason"] in ("stop", "length") and r["completion_tokens"] <= 6
    # a killed run: two whole lines and half of the third
    whole = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(whole[:2]) + whole[2][: len(whole[2]) // 2])
    again = meshserve("generate", "--model", image, *args, *remote)
    assert "4 written" in again.stderr and "2 already" in again.stderr, again.stderr
    redone = read_jsonl(out)
    assert out.read_bytes().startswith(b"".join(whole[:2]))
    assert sorted(map(str, (r["id"] for r in redone))) == sorted(map(str, rows))  # each id once
    for r in redone:  # greedy: the resumed lines equal the first run's
        assert r == rows[r["id"]]
    done = meshserve("generate", "--model", str(tiny_llama), *args, "--quiet")
    assert done.returncode == 0 and "0 written" in done.stderr and "6 already" in done.stderr
    assert read_jsonl(out) == redone


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"id": 1, "prompt": "hi", "mirostat": 1}', ["prompts.jsonl:2", "'mirostat'"]),
        ('{"prompt": "hi"}', ["prompts.jsonl:2", "'id'"]),
        ('{"id": 7, "prompt": "hi", "max_tokens": 0}', ["max_tokens"]),
        ('{"id": 7}', ["'prompt' or 'messages'"]),
        ('{"id": 0, "prompt": "hi"', ["not valid JSON"]),
    ],
)
def test_bad_input_lines_stop_before_loading(tmp_path, line, words):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": 0, "prompt": "ok"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    r = meshserve("generate", "--model", str(tmp_path / "no-such-model"), "--input", str(path), "--output", str(out))
    assert r.returncode == 2 and all(w in r.stderr for w in words), r.stderr
    assert not out.exists()


def test_bad_default_flags_stop_before_loading(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": 0, "prompt": "ok"}\n')
    out = tmp_path / "o.jsonl"
    base = ["generate", "--model", str(tmp_path / "no-such-model"), "--input", str(path), "--output", str(out)]
    r = meshserve(*base, "--max-tokens", "0")
    assert r.returncode == 2 and "max_tokens" in r.stderr and ">= 1" in r.stderr, r.stderr
    r = meshserve(*base, "--max-in-flight", "0")
    assert r.returncode == 2 and "--max-in-flight" in r.stderr, r.stderr
