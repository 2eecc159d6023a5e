"""The mesh across pods under load: three pods on one etcd, many models, Zipf traffic.

    python loadtests/fleet_bench.py --models 10000 --resident 500 --duration 60

Generates N python models (as mesh_bench.py does), starts a loopback etcd and three
meshserve pods joined through it, each with room for about ``--resident`` models, and
sends Zipf traffic round-robin to all pods (closed-loop clients). Reports throughput and
p50/p99 by how each request was served (the ``meshserve-route`` header: a hit on the
receiving pod, a hit forwarded to another pod, a miss), the forwarded-hit overhead and
errors. Then, with traffic running, kill -9 one pod (requests lost, requests the client
retried because their connection died with the pod, time until the models only that pod
held serve again), then SIGTERM another (failed requests). A client that finds a pod's
port closed sends to the next pod, as a Service does once the endpoint is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
sys.path.insert(0, str(REPO / "loadtests"))
from mesh_bench import body, make_models, ms  # noqa: E402

from tests.support.etcd import start_etcd  # noqa: E402
from tests.support.server import free_port, meshserve_command  # noqa: E402

OVERHEAD = 64 * 1024  # the server's default per-model overhead


class Pod:
    def __init__(self, i: int, model_dir: Path, log: Path, store: str, capacity: int, lease: int) -> None:
        self.id = f"pod-{i}"
        self.http, self.grpc = free_port(), free_port()
        cmd = [*meshserve_command(), "serve", "--host", "127.0.0.1", "--http-port", str(self.http)]
        cmd += ["--grpc-port", str(self.grpc), "--model-dir", str(model_dir), "--log-level", "warning"]
        cmd += ["--store", store, "--capacity-bytes", str(capacity), "--min-churn-age", "0", "--no-preload"]
        env = {**os.environ, "MESHSERVE_POD_ID": self.id, "MESHSERVE_FLEET_LEASE_SECONDS": str(lease)}
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.url = f"http://127.0.0.1:{self.http}"
        self.up = True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def wait_ready(session: aiohttp.ClientSession, pods: list[Pod], timeout: float) -> float:
    started = time.monotonic()
    for pod in pods:
        while True:
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{pod.id} not ready in {timeout}s")
            if pod.proc.poll() is not None:
                raise RuntimeError(f"{pod.id} exited with {pod.proc.returncode}")
            try:
                async with session.get(pod.url + "/v2/fleet/pods") as r:
                    if r.status == 200 and sum(p["alive"] for p in await r.json()) == len(pods):
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    return time.monotonic() - started


class Traffic:
    """Closed-loop clients sending Zipf-chosen models round-robin over the pods that are up."""

    def __init__(self, session, pods: list[Pod], pick, concurrency: int) -> None:
        self.session, self.pods, self.pick, self.concurrency = session, pods, pick, concurrency
        self.lat: dict[str, list[float]] = {"local": [], "forwarded": [], "miss": []}
        self.errors: list[str] = []
        self.client_retried = 0  # the connection died with its pod: sent again to the next pod
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self._rr = 0

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._client(i)) for i in range(self.concurrency)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    def _next_pod(self) -> Pod:
        up = [p for p in self.pods if p.up]
        self._rr += 1
        return up[self._rr % len(up)]

    async def _client(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            model = self.pick(rng)
            for _attempt in range(3):
                pod = self._next_pod()
                t = time.perf_counter()
                try:
                    async with self.session.post(f"{pod.url}/v2/models/{model}/infer", data=body(1.0)) as r:
                        payload = await r.read()
                        route = r.headers.get("meshserve-route", "?")
                except aiohttp.ClientConnectorError:
                    pod.up = False  # port closed: the endpoint is gone
                    continue
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    self.client_retried += 1  # the pod died under this request
                    if pod.proc.poll() is not None:
                        pod.up = False
                    continue
                if r.status == 200:
                    self.lat.setdefault(route, []).append(time.perf_counter() - t)
                else:
                    self.errors.append(f"{pod.id} {r.status} {payload[:160]!r}")
                break
            else:
                self.errors.append(f"{model}: no pod answered")

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.lat.values())


async def etcd_put(etcd, key: bytes, value: bytes) -> None:
    import aetcd

    client = aetcd.Client(host="127.0.0.1", port=etcd.client_port, timeout=3)
    try:
        await client.put(key, value)
    finally:
        await client.close()


async def etcd_delete(etcd, key: bytes) -> None:
    import aetcd

    client = aetcd.Client(host="127.0.0.1", port=etcd.client_port, timeout=3)
    try:
        await client.delete(key)
    finally:
        await client.close()


async def index(session: aiohttp.ClientSession, pod: Pod) -> list[dict]:
    async with session.post(pod.url + "/v2/repository/index", json={}) as r:
        return await r.json()


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="fleetbench-"))
    etcd = None
    pods: list[Pod] = []
    try:
        t = time.monotonic()
        models = make_models(root, args.models, args.model_kib * 1024)
        print(f"generated {args.models} models in {time.monotonic() - t:.1f}s", flush=True)
        etcd = start_etcd(root / "etcd")
        capacity = args.resident * (args.model_kib * 1024 + OVERHEAD)
        store = etcd.store_url("bench")
        pods = [Pod(i, models, root / f"pod-{i}.log", store, capacity, args.lease) for i in range(3)]
        ranks = np.arange(1, args.models + 1)
        p = ranks**-args.zipf
        p /= p.sum()
        order = np.random.default_rng(42).permutation(args.models)

        draws = np.random.default_rng(7).choice(args.models, size=200_000, p=p)  # cheap picks: cumsum once
        names = [f"m{order[i]:05d}" for i in draws]

        def pick(rng: np.random.Generator) -> str:
            return names[int(rng.integers(len(names)))]

        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
            ready = await wait_ready(session, pods, 300)
            print(f"3 pods ready and joined {ready:.1f}s after start", flush=True)

            # Warm-up, then the measured steady phase.
            warm = Traffic(session, pods, pick, args.concurrency)
            warm.start()
            await asyncio.sleep(args.warmup)
            await warm.finish()
            steady = Traffic(session, pods, pick, args.concurrency)
            t = time.monotonic()
            steady.start()
            await asyncio.sleep(args.duration)
            await steady.finish()
            elapsed = time.monotonic() - t

            # Hit latency without queueing: one client, one model with one copy, sent to its
            # holder and to another pod in turn (copies for rate are off meanwhile).
            await etcd_put(etcd, b"bench/settings/copy_rate_per_minute", b"1e12")
            probe_model = "probe"
            for r in await index(session, pods[0]):
                if len(r["copies"]) == 1 and r["copies"][0]["state"] == "READY":
                    probe_model = r["name"]
                    break
            if probe_model == "probe":  # no model with one copy: make one
                async with session.post(f"{pods[0].url}/v2/models/{names[-1]}/infer", data=body(1.0)) as r:
                    await r.read()
                probe_model = names[-1]
                await asyncio.sleep(0.5)
            rows = {r["name"]: r for r in await index(session, pods[0])}
            holder_id = rows[probe_model]["copies"][0]["pod"]
            holder = next(p for p in pods if p.id == holder_id)
            other = next(p for p in pods if p.id != holder_id)
            quiet: dict[str, list[float]] = {"local": [], "forwarded": []}
            for _ in range(args.probe_rounds):
                for pod in (holder, other):
                    t0 = time.perf_counter()
                    async with session.post(f"{pod.url}/v2/models/{probe_model}/infer", data=body(1.0)) as r:
                        await r.read()
                        route = r.headers.get("meshserve-route")
                    if route in quiet and r.status == 200:
                        quiet[route].append(time.perf_counter() - t0)
            await etcd_delete(etcd, b"bench/settings/copy_rate_per_minute")

            # kill -9 of one pod under traffic.
            victim = pods[2]
            rows = await index(session, pods[0])
            only_there = [r["name"] for r in rows if [c["pod"] for c in r["copies"]] == [victim.id]]
            kill = Traffic(session, pods, pick, args.concurrency)
            kill.start()
            await asyncio.sleep(args.fault_duration / 3)
            victim.proc.kill()
            killed = time.monotonic()
            probe = only_there[: args.probe]
            served_again = []

            async def probe_one(name: str) -> None:
                while True:
                    async with session.post(f"{pods[0].url}/v2/models/{name}/infer", data=body(1.0)) as r:
                        await r.read()
                        if r.status == 200:
                            served_again.append(time.monotonic() - killed)
                            return
                    await asyncio.sleep(0.05)

            await asyncio.gather(*(probe_one(n) for n in probe))
            await asyncio.sleep(max(0.0, args.fault_duration * 2 / 3 - (time.monotonic() - killed)))
            await kill.finish()
            victim.up = False

            # SIGTERM of another pod under traffic.
            leaving = pods[1]
            term = Traffic(session, pods, pick, args.concurrency)
            term.start()
            await asyncio.sleep(args.fault_duration / 3)
            leaving.proc.send_signal(signal.SIGTERM)
            termed = time.monotonic()
            while leaving.proc.poll() is None:
                await asyncio.sleep(0.05)
            left_after = time.monotonic() - termed
            await asyncio.sleep(args.fault_duration / 3)
            await term.finish()
            rc = leaving.proc.returncode

        lat = {k: np.array(v) for k, v in steady.lat.items()}
        both = len(lat.get("forwarded", ())) and len(lat.get("local", ()))
        overhead = (np.percentile(lat["forwarded"], 50) - np.percentile(lat["local"], 50)) * 1000 if both else np.nan
        q_local, q_fwd = np.array(quiet["local"]), np.array(quiet["forwarded"])
        q_over = (
            (np.percentile(q_fwd, 50) - np.percentile(q_local, 50)) * 1000
            if len(q_fwd) and len(q_local)
            else float("nan")
        )
        rows_out = [
            ("pods / models registered / room per pod", f"3 / {args.models} / ~{args.resident} models"),
            (
                f"Zipf(s={args.zipf}), {args.concurrency} clients, {elapsed:.0f} s",
                f"{steady.count / elapsed:.0f} req/s",
            ),
        ]
        for kind in ("local", "forwarded", "miss"):
            a = lat.get(kind, np.array([]))
            share = len(a) / max(1, steady.count)
            rows_out.append((f"{kind} p50 / p99 ({share:.1%} of requests)", f"{ms(a, 50)} / {ms(a, 99)} ms"))
        rows_out += [
            ("forwarded-hit overhead over a local hit, under load (p50)", f"{overhead:+.2f} ms"),
            ("one client: local hit p50 / p99", f"{ms(q_local, 50)} / {ms(q_local, 99)} ms"),
            ("one client: forwarded hit p50 / p99", f"{ms(q_fwd, 50)} / {ms(q_fwd, 99)} ms"),
            ("one client: forwarded-hit overhead (p50)", f"{q_over:+.2f} ms"),
            ("errors", str(len(steady.errors))),
            ("kill -9: requests failed", str(len(kill.errors))),
            ("kill -9: requests the client re-sent (connection died with the pod)", str(kill.client_retried)),
            (
                f"kill -9: time until {len(probe)} models only it held serve again (max)",
                f"{max(served_again):.2f} s" if served_again else "-",
            ),
            ("SIGTERM: requests failed", str(len(term.errors))),
            ("SIGTERM: requests the client re-sent", str(term.client_retried)),
            ("SIGTERM: exit code / seconds to leave", f"{rc} / {left_after:.2f} s"),
        ]
        print("\n| figure | value |\n|---|---|")
        for label, value in rows_out:
            print(f"| {label} | {value} |")
        for name, tr in (("steady", steady), ("kill", kill), ("term", term)):
            if tr.errors:
                print(f"first {name} errors:", tr.errors[:3])
    finally:
        for pod in pods:
            pod.stop()
        if etcd is not None:
            etcd.stop()
        if args.keep:
            print("kept", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--resident", type=int, default=500)
    ap.add_argument("--model-kib", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--fault-duration", type=float, default=15)
    ap.add_argument("--probe", type=int, default=50, help="models only the killed pod held, timed until they serve")
    ap.add_argument("--probe-rounds", type=int, default=300, help="one-client local/forwarded pairs")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--lease", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the models and logs")
    asyncio.run(main(ap.parse_args()))
