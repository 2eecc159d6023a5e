"""The engine core in a process of its own: it serves, unload ends it, its death fails the
requests in flight with 503 and it comes back, and a server stopped with SIGTERM leaves no
engine process behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import orjson
import pytest
from meshserve.protocol.errors import ModelNotReady
from meshserve.server.llm.types import SamplingParams

from tests.server.llm.api_support import llm_server
from tests.server.llm.engine_support import Loop, collect, make_engine

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    """Unbatched greedy ``generate`` in this process: what the child must produce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return out[0, ids.input_ids.shape[1] :].tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def alive(pid: int) -> bool:
    """Running (a zombie has exited: only its exit status is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def engine_processes(pid: int) -> list[int]:
    """The engine cores among ``pid``'s children (multiprocessing's resource tracker is another)."""
    return [p for p in children_of(pid) if b"spawn_main" in _cmdline(p) and b"resource_tracker" not in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_the_core_serves_from_its_own_process_and_unload_ends_it(loop, tiny_llama, expected):
    eng = make_engine(loop, tiny_llama)
    try:
        pid = eng.core.pid
        assert pid is not None and pid != os.getpid() and alive(pid)
        assert pid in engine_processes(os.getpid())
        res = loop.run(collect(eng, PROMPT, greedy(12)))
        assert res["tokens"] == expected and res["finish"] == "length"
        params = sum(p.numel() * 4 for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
            tiny_llama).parameters())  # fmt: skip
        assert eng.size_bytes() > params + 50_000_000  # the child's RSS: weights, torch and the rest
    finally:
        loop.run(eng.stop())
    assert wait_gone(pid, 5), "the engine process outlived the unload"
    assert eng.size_bytes() == 0


def test_a_killed_core_fails_its_requests_with_503_and_restarts(loop, tiny_llama, expected):
    eng = make_engine(loop, tiny_llama, fast_forward=False)  # transformers' forward: 240 tokens take a while
    pid = eng.core.pid

    async def kill_mid_stream():
        stream = eng.generate(PROMPT, greedy(240), "doomed")
        await stream.__anext__()  # it is running in the child
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ModelNotReady, match="engine process died") as err:
            async for _ in stream:
                pass
        with pytest.raises(ModelNotReady, match="restarting"):
            eng.generate(PROMPT, greedy(4), "meanwhile")
        return err.value

    try:
        err = loop.run(kill_mid_stream())
        assert err.http_status == 503 and "signal 9" in err.message
        deadline = time.monotonic() + 60
        while (eng.core is None or eng._unavailable) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert eng.core is not None and eng.core.pid != pid and alive(eng.core.pid), eng._unavailable
        new_pid = eng.core.pid
        assert loop.run(collect(eng, PROMPT, greedy(12)))["tokens"] == expected
        assert eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0
    finally:
        loop.run(eng.stop())
    assert wait_gone(new_pid, 5)


def test_server_answers_503_while_its_core_restarts_and_sigterm_leaves_no_orphan(tiny_llama, tmp_path):
    body = orjson.dumps({"text_input": PROMPT, "parameters": {"max_tokens": 4, "temperature": 0}})
    url = "/v2/models/tiny-llama/generate"
    with llm_server(tmp_path, tiny_llama) as srv, httpx.Client(base_url=srv.http_url, timeout=60) as http:
        assert http.post(url, content=body).status_code == 200
        everything = children_of(srv.proc.pid)
        cores = engine_processes(srv.proc.pid)
        assert len(cores) == 1, cores  # the engine core of the one LLM
        os.kill(cores[0], signal.SIGKILL)
        assert wait_gone(cores[0], 5)
        time.sleep(0.2)  # the server sees the pipe close at once
        r = http.post(url, content=body)
        assert r.status_code == 503, r.text
        assert "engine process died" in r.json()["error"]
        deadline = time.monotonic() + 60
        while (r := http.post(url, content=body)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        restarted = engine_processes(srv.proc.pid)
        assert len(restarted) == 1 and restarted != cores
        assert srv.stop() is not None
    assert wait_gone(restarted[0], 10), "the engine process outlived the server"
    assert all(wait_gone(p, 5) for p in everything), "a helper process outlived the server"


def test_a_load_error_in_the_child_fails_the_load_clearly(loop, tmp_path, tiny_llama):
    import shutil

    from meshserve.protocol.errors import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    before = {p for p in engine_processes(os.getpid()) if alive(p)}
    with pytest.raises(ModelLoadError, match="cannot load a causal LM"):
        make_engine(loop, broken)
    time.sleep(0.5)
    assert {p for p in engine_processes(os.getpid()) if alive(p)} <= before  # the failed child is gone
