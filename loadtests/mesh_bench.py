"""The in-pod mesh under load: many registered models, room for a few hundred, Zipf traffic.

    python loadtests/mesh_bench.py --models 10000 --resident 500 --duration 60

Generates N python models (each loads its own weights file into memory, a few
hundred KB), starts meshserve with capacity for about ``--resident`` of them and
reports: registration time and health latency while it runs, cold-load (miss)
latency, hit latency against a one-model server in the same run, then Zipf
traffic over REST: throughput, hit ratio, errors, evictions and the server's
peak RSS against capacity + its base. Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.support.server import free_port, meshserve_command  # noqa: E402

MODEL_PY = """import numpy as np
from meshserve import Model


class Weighted(Model):
    def load(self):
        self.w = np.fromfile(self.path / "weights.bin", dtype=np.float32)

    def size_bytes(self):
        return self.w.nbytes

    async def predict(self, request):
        x = request.inputs[0].data
        return {"y": x * self.w[0]}
"""


def make_models(root: Path, n: int, weights_bytes: int) -> Path:
    """N model directories; the weights files are hard links to one file (N x size for
    the loader and the size prediction, 1 x size on disk)."""
    models = root / "models"
    models.mkdir(parents=True)
    shared = root / "weights.bin"
    np.ones(weights_bytes // 4, dtype=np.float32).tofile(shared)
    code = root / "model.py"
    code.write_text(MODEL_PY)
    settings = json.dumps({"implementation": "model.py:Weighted"})
    for i in range(n):
        d = models / f"m{i:05d}"
        d.mkdir()
        os.link(shared, d / "weights.bin")
        os.link(code, d / "model.py")
        (d / "model-settings.json").write_text(settings)
    return models


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024


class Server:
    def __init__(self, model_dir: Path, log: Path, *args: str) -> None:
        self.http = free_port()
        cmd = [*meshserve_command(), "serve", "--host", "127.0.0.1", "--http-port", str(self.http)]
        cmd += ["--grpc-port", str(free_port()), "--model-dir", str(model_dir), "--log-level", "warning", *args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
        self.url = f"http://127.0.0.1:{self.http}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def body(value: float) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [value]}]}).encode()


async def wait_registered(session: aiohttp.ClientSession, srv: Server, n: int, timeout: float) -> tuple[float, float]:
    """Seconds until all N models are registered, and the worst /v2/health/live latency meanwhile."""
    worst = 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = time.monotonic()
        try:
            async with session.get(srv.url + "/v2/health/live") as r:
                await r.read()
            worst = max(worst, time.monotonic() - t)
            async with session.get(srv.url + "/metrics") as r:
                m = re.search(r"^meshserve_models_registered (\S+)$", await r.text(), re.M)
            if m and int(float(m.group(1))) >= n:
                return time.monotonic() - srv.started, worst
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("models were not registered in time")


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return {k: float(v) for k, v in re.findall(r"^(meshserve_[a-z_]+) (\S+)$", text, re.M)}


async def drive(session, url, pick, duration: float, concurrency: int, max_requests: int):
    """Closed-loop clients: each sends its next request when the last one answers."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + duration

    async def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < deadline and len(latencies) + len(errors) < max_requests:
            model = pick(rng)
            t = time.perf_counter()
            async with session.post(f"{url}/v2/models/{model}/infer", data=body(1.0)) as r:
                payload = await r.read()
            if r.status == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors.append(f"{r.status} {payload[:120]!r}")

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return np.array(latencies), errors


def ms(a: np.ndarray, q: float) -> str:
    return f"{np.percentile(a, q) * 1000:.2f}" if len(a) else "-"


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="meshbench-"))
    try:
        t = time.monotonic()
        models = make_models(root, args.models, args.model_kib * 1024)
        print(f"generated {args.models} models in {time.monotonic() - t:.1f}s")
        single = make_models(root / "single", 1, args.model_kib * 1024)
        capacity = args.resident * args.model_kib * 1024
        mesh_args = ("--capacity-bytes", str(capacity), "--min-churn-age", "0", "--no-preload")
        mesh = Server(models, root / "mesh.log", *mesh_args)
        one = Server(single, root / "one.log")
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            reg_time, worst_live = await wait_registered(session, mesh, args.models, 120)
            await wait_registered(session, one, 1, 60)
            print(f"registered {args.models} models: ready to serve {reg_time:.2f}s after start; "
                  f"worst /v2/health/live meanwhile {worst_live * 1000:.1f} ms")  # fmt: skip

            # Cold loads: models never used before, one at a time.
            cold, cold_err = await drive(session, mesh.url, iter_picker(args.models), 10, 1, 300)
            # Hits: one resident model, against a server with just that model, interleaved.
            hot = "m00000"
            await drive(session, mesh.url, lambda rng: hot, 1, 1, 10)
            hit_m, hit_o = [], []
            for _ in range(args.hit_rounds):
                a, _ = await drive(session, mesh.url, lambda rng: hot, 1.0, args.concurrency, 10**9)
                b, _ = await drive(session, one.url, lambda rng: "m00000", 1.0, args.concurrency, 10**9)
                hit_m.append(a)
                hit_o.append(b)
            hit_mesh, hit_one = np.concatenate(hit_m), np.concatenate(hit_o)
            # The process's base: what it holds after serving traffic (and answering a /metrics
            # scrape, which over thousands of models' series holds megabytes), less the models.
            before = await metrics(session, mesh.url)
            base = rss(mesh.proc.pid) - before["meshserve_cache_bytes_used"]

            # Zipf traffic.
            ranks = np.arange(1, args.models + 1)
            p = ranks**-args.zipf
            p /= p.sum()
            order = np.random.default_rng(42).permutation(args.models)
            peak = [base]
            stop = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss(mesh.proc.pid))
                    await asyncio.sleep(0.1)

            watcher = asyncio.ensure_future(watch())
            t = time.monotonic()
            lat, errors = await drive(
                session, mesh.url, lambda rng: f"m{order[rng.choice(args.models, p=p)]:05d}",
                args.duration, args.concurrency, 10**9,
            )  # fmt: skip
            elapsed = time.monotonic() - t
            stop.set()
            await watcher
            after = await metrics(session, mesh.url)
        mesh.stop()
        one.stop()
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        hits, misses = d["meshserve_cache_hits_total"], d["meshserve_cache_misses_total"]
        overhead = np.percentile(hit_mesh, 50) / np.percentile(hit_one, 50) - 1
        rows = [
            ("models registered / capacity", f"{args.models} / {args.resident} models ({capacity / 2**20:.1f} MiB)"),
            ("start to all registered", f"{reg_time:.2f} s (worst health latency {worst_live * 1000:.1f} ms)"),
            ("cold load (miss) latency p50 / p99", f"{ms(cold, 50)} / {ms(cold, 99)} ms ({len(cold_err)} errors)"),
            ("hit latency p50 / p99, mesh", f"{ms(hit_mesh, 50)} / {ms(hit_mesh, 99)} ms"),
            ("hit latency p50 / p99, one-model server", f"{ms(hit_one, 50)} / {ms(hit_one, 99)} ms"),
            ("hit-path overhead (p50)", f"{overhead * 100:+.1f}%"),
            (f"Zipf(s={args.zipf}), {args.concurrency} clients, {elapsed:.0f} s", f"{len(lat) / elapsed:.0f} req/s"),
            ("hit ratio", f"{hits / max(1, hits + misses):.3f} ({hits:.0f} hits, {misses:.0f} misses)"),
            ("Zipf latency p50 / p99", f"{ms(lat, 50)} / {ms(lat, 99)} ms"),
            ("errors", str(len(errors))),
            ("evictions", f"{d['meshserve_evictions_total']:.0f}"),
            (
                "peak RSS above base vs capacity",
                f"{(peak[0] - base) / 2**20:.1f} MiB vs {capacity / 2**20:.1f} MiB (base {base / 2**20:.0f} MiB)",
            ),
        ]
        print("\n| figure | value |\n|---|---|")
        for label, value in rows:
            print(f"| {label} | {value} |")
        if errors:
            print("first errors:", errors[:3])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def iter_picker(n: int):
    counter = iter(range(n - 1, -1, -1))  # from the end: never touched by the other phases
    return lambda rng: f"m{next(counter):05d}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--resident", type=int, default=500)
    ap.add_argument("--model-kib", type=int, default=256)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--hit-rounds", type=int, default=3)
    asyncio.run(main(ap.parse_args()))
