"""Are tiny models accounted right without their help? Accounted bytes against RSS growth.

    python loadtests/mesh_memory.py --models 1000 --kib 64

Generates N numpy models that do not implement ``size_bytes`` (a ``model.py`` whose
``Model`` loads a ``.npy`` of about ``--kib`` KiB), then runs two real servers:

1. accounting: room for every model; each is loaded once by a request; the bytes the
   cache accounts (``meshserve_cache_bytes_used``) are compared with the server's RSS
   growth over the same loads (target: within +-30%);
2. pressure: room for a quarter of them, ``--min-churn-age`` 1 s, Zipf traffic from
   ``--concurrency`` clients; peak RSS is compared with capacity + the process's base
   (after every model was used once: what the server keeps per registered model is
   base) (target: under 10% over) and errors counted (target: none: loads wait for room).

``--capacity-mib`` fixes the pressure run's capacity and ``--no-accounting`` skips the first
run (issue #16's 10,000-model run: ``--models 10000 --capacity-mib 64 --duration 30
--no-accounting``). Prints one table. Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from loadtests.mesh_bench import Server, drive, metrics, rss, wait_registered  # noqa: E402

MODEL_PY = """import numpy as np
from meshserve import Model


class Tiny(Model):
    def load(self):
        self.w = np.load(self.path / "weights.npy")

    async def predict(self, request):
        x = request.inputs[0].data
        return {"y": x * self.w[0]}
"""


def make_models(root: Path, n: int, kib: int) -> Path:
    """N model directories, the weights hard-linked (each loads its own copy into memory)."""
    models = root / "models"
    models.mkdir(parents=True)
    shared = root / "weights.npy"
    np.save(shared, np.ones(kib * 1024 // 4, dtype=np.float32))
    code = root / "model.py"
    code.write_text(MODEL_PY)
    settings = json.dumps({"implementation": "model.py:Tiny"})
    for i in range(n):
        d = models / f"m{i:05d}"
        d.mkdir()
        os.link(shared, d / "weights.npy")
        os.link(code, d / "model.py")
        (d / "model-settings.json").write_text(settings)
    return models


async def accounting(session: aiohttp.ClientSession, models: Path, root: Path, n: int, kib: int) -> dict:
    srv = Server(models, root / "accounting.log", "--capacity-bytes", str(n * kib * 4096), "--no-preload")
    try:
        await wait_registered(session, srv, n, 120)
        await drive(session, srv.url, lambda rng: "m00000", 1, 1, 20)  # warm: numpy, the code paths
        used0, rss0 = (await metrics(session, srv.url))["meshserve_cache_bytes_used"], rss(srv.proc.pid)
        _, errors = await drive(session, srv.url, in_order_from(1, n), 600, 4, n - 1)
        used1, rss1 = (await metrics(session, srv.url))["meshserve_cache_bytes_used"], rss(srv.proc.pid)
        return {"accounted": used1 - used0, "grown": rss1 - rss0, "errors": len(errors), "per_model": used0}
    finally:
        srv.stop()


def in_order_from(first: int, n: int):
    counter = iter(range(first, n))
    return lambda rng: f"m{next(counter, first):05d}"  # clients still running past the end: hits


async def pressure(session, models: Path, root: Path, n: int, capacity: int, duration: float, clients: int) -> dict:
    args = ("--capacity-bytes", str(capacity), "--no-preload", "--min-churn-age", "1")
    srv = Server(models, root / "pressure.log", *args)
    try:
        await wait_registered(session, srv, n, 120)
        # Every model once first: what the server keeps per model whether loaded or not
        # (its metrics series, its entry) is part of the base, not of the capacity.
        await drive(session, srv.url, in_order_from(0, n), 600, 4, n)
        # RSS after the scrape: a /metrics answer over every model's series is part of the base.
        used = (await metrics(session, srv.url))["meshserve_cache_bytes_used"]
        base = rss(srv.proc.pid) - used
        p = np.arange(1, n + 1) ** -1.1
        p /= p.sum()
        order = np.random.default_rng(7).permutation(n)
        peak = [0]
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss(srv.proc.pid))
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        t = time.monotonic()
        lat, errors = await drive(
            session, srv.url, lambda rng: f"m{order[rng.choice(n, p=p)]:05d}", duration, clients, 10**9
        )
        elapsed = time.monotonic() - t
        stop.set()
        await watcher
        after = await metrics(session, srv.url)
        return {
            "base": base,
            "peak": peak[0],
            "rate": len(lat) / elapsed,
            "p50": np.percentile(lat, 50) * 1000 if len(lat) else float("nan"),
            "p99": np.percentile(lat, 99) * 1000 if len(lat) else float("nan"),
            "errors": errors,
            "evictions": after.get("meshserve_evictions_total", 0),
        }
    finally:
        srv.stop()


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="meshmemory-"))
    try:
        models = make_models(root, args.models, args.kib)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            a = await accounting(session, models, root, args.models, args.kib) if args.accounting else None
            if args.capacity_mib:
                capacity = args.capacity_mib * 2**20
            elif a is not None:
                capacity = int(a["per_model"] * args.models / 4)
            else:
                raise SystemExit("--no-accounting needs --capacity-mib")
            b = await pressure(session, models, root, args.models, capacity, args.duration, args.concurrency)
        n = args.models - 1
        over = (b["peak"] - b["base"]) / capacity - 1
        rows = [("models (no size_bytes)", f"{args.models} x {args.kib} KiB of numpy")]
        if a is not None:
            rows += [
                ("accounted per model", f"{a['per_model'] / 1024:.0f} KiB"),
                (
                    f"accounted vs RSS growth, {n} loads",
                    f"{a['accounted'] / 2**20:.1f} MiB vs {a['grown'] / 2**20:.1f} MiB "
                    f"({a['accounted'] / max(1, a['grown']) * 100 - 100:+.0f}%, {a['errors']} errors)",
                ),
            ]
        rows += [
            ("pressure: capacity", f"{capacity / 2**20:.1f} MiB, churn guard 1 s"),
            (
                "pressure: peak RSS above base vs capacity",
                f"{(b['peak'] - b['base']) / 2**20:.1f} MiB vs {capacity / 2**20:.1f} MiB ({over * 100:+.0f}%, "
                f"base {b['base'] / 2**20:.0f} MiB)",
            ),
            (
                f"pressure: Zipf 1.1, {args.concurrency} clients, {args.duration:.0f} s",
                f"{b['rate']:.0f} req/s, p50 / p99 {b['p50']:.1f} / {b['p99']:.1f} ms, {len(b['errors'])} errors, "
                f"{b['evictions']:.0f} evictions",
            ),
        ]
        print("\n| figure | value |\n|---|---|")
        for label, value in rows:
            print(f"| {label} | {value} |")
        if b["errors"]:
            print("first errors:", b["errors"][:3])
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--kib", type=int, default=64)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--capacity-mib", type=int, default=0, help="pressure run's capacity (default: a quarter of the models)"
    )
    ap.add_argument("--no-accounting", dest="accounting", action="store_false", help="only the pressure run")
    asyncio.run(main(ap.parse_args()))
