"""Dynamic batching on a small torch model: throughput at 16 concurrent clients,
with and without batching, in one server and one run.

    python loadtests/batching_bench.py --clients 16 --duration 15

Exports an MLP (``--width`` wide, 3 layers, torch.export ``.pt2``) into two model
folders, ``mlp`` (no batching) and ``mlp_batched`` (``max_batch_size``,
``max_batch_latency``), starts meshserve and drives each with the same closed
loop of ``--clients`` REST clients sending one row each. Reports requests/s and
p50/p99 latency. Client and server share the
machine's cores: compare the ratio, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.support.server import start_server  # noqa: E402


def make_models(root: Path, width: int, max_batch_size: int, latency_ms: float) -> Path:
    import torch

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, 16),
    ).eval()  # fmt: skip
    ep = torch.export.export(mlp, (torch.randn(2, width),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    models = root / "models"
    for name, extra in [
        ("mlp", {}),
        ("mlp_batched", {"max_batch_size": max_batch_size, "max_batch_latency": latency_ms}),
    ]:
        (models / name).mkdir(parents=True)
        torch.export.save(ep, str(models / name / "model.pt2"))
        (models / name / "model-settings.json").write_text(json.dumps({"runtime": "torch", **extra}))
    return models


async def drive(url: str, model: str, width: int, clients: int, duration: float) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v2/models/{model}") as r:
        name = (await r.json())["inputs"][0]["name"]  # the exported forward's argument name
    body = json.dumps(
        {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, width], "data": [0.5] * width}]}
    ).encode()
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + duration

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < stop:
            start = time.monotonic()
            async with session.post(f"{url}/v2/models/{model}/infer", data=body,
                                    headers={"content-type": "application/json"}) as r:  # fmt: skip
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append(time.monotonic() - start)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(20):  # warm up
            async with session.post(f"{url}/v2/models/{model}/infer", data=body) as r:
                if r.status != 200:
                    raise SystemExit(f"{model}: {r.status} {await r.text()}")
        began = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.monotonic() - began
    lat = np.array(latencies) * 1000
    return {
        "rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)), "errors": errors,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-batch-latency", type=float, default=2.0, help="ms")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = make_models(root, args.width, args.max_batch_size, args.max_batch_latency)
        server = start_server(models, root / "server.log", timeout=120)
        try:
            results = {}
            for model in ("mlp", "mlp_batched"):
                results[model] = asyncio.run(drive(server.http_url, model, args.width, args.clients, args.duration))
        finally:
            server.stop()
    params = args.width * args.width * 2 + args.width * 16
    print(
        f"torch MLP width {args.width} (~{params / 1e6:.1f} M parameters), {args.clients} clients, {args.duration:g}s"
    )
    print(f"  batched: max_batch_size {args.max_batch_size}, max_batch_latency {args.max_batch_latency} ms")
    for model, r in results.items():
        print(f"  {model:12s} {r['rps']:8.0f} req/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms   "
              f"errors {r['errors']}")  # fmt: skip
    print(f"  throughput gain with batching: x{results['mlp_batched']['rps'] / results['mlp']['rps']:.2f}")


if __name__ == "__main__":
    main()
