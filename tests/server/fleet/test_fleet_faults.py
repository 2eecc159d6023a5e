"""Faults: a pod killed, a pod leaving, etcd lost and back, etcd absent at start, a stale pod record."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import orjson

from tests.server.fleet.conftest import (
    LEASE,
    etcd_call,
    holders,
    index,
    infer,
    pod_index,
    start_pods,
    wait_for,
    wait_pods,
)
from tests.support.etcd import start_etcd
from tests.support.server import free_port, start_server


def _hammer(targets, models, stop: threading.Event, failures: list, count: list) -> None:
    with httpx.Client(timeout=30) as client:
        i = 0
        while not stop.is_set():
            pod, model = targets[i % len(targets)], models[i % len(models)]
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
            try:
                r = client.post(f"{pod.http_url}/v2/models/{model}/infer", json=body)
                if r.status_code != 200:
                    failures.append((model, r.status_code, r.text))
            except httpx.HTTPError as e:
                failures.append((model, "transport", repr(e)))
            count[0] += 1
            i += 1


def test_kill9_holder_requests_are_retried_elsewhere(etcd, fleet_models, tmp_path):
    pods = start_pods(etcd, fleet_models, tmp_path / "logs", prefix="kill")
    try:
        wait_pods(pods[0], 3)
        assert infer(pods[0], "m1").status_code == 200
        owner = wait_for(lambda: holders(pods[0], "m1"), what="m1 placed")[0]
        victim = pod_index(pods, owner)
        survivors = [p for p in pods if p is not victim]
        assert httpx.post(f"{victim.http_url}/v2/repository/models/slow/load", timeout=30).status_code == 200
        wait_for(lambda: holders(pods[0], "slow") == [owner], what="slow on the same pod")
        stop, failures, count = threading.Event(), [], [0]
        # One client on m1, eight on "slow" (0.2 s each): many calls in flight when the pod dies.
        workers = [threading.Thread(target=_hammer, args=(survivors, ["m1"], stop, failures, count))]
        workers += [
            threading.Thread(target=_hammer, args=(survivors, ["slow"], stop, failures, count)) for _ in range(8)
        ]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        victim.proc.kill()  # kill -9: no goodbye, its records stay until the lease lapses
        killed = time.monotonic()

        def served_elsewhere():
            copies = holders(survivors[0], "m1")
            return copies and owner not in copies

        wait_for(served_elsewhere, 10, "m1 loaded on a live pod")
        moved = time.monotonic() - killed
        time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join()
        assert failures == [], failures[:3]
        assert count[0] > 10
        assert moved < 5
        # The dead pod's lease lapses: it leaves the fleet view.
        wait_for(
            lambda: owner not in [p["id"] for p in httpx.get(f"{survivors[0].http_url}/v2/fleet/pods").json()],
            float(LEASE) + 5,
            "the dead pod's record to lapse",
        )
    finally:
        for p in pods:
            p.stop()


def test_sigterm_hands_models_off_without_failed_requests(etcd, fleet_models, tmp_path):
    pods = start_pods(etcd, fleet_models, tmp_path / "logs", prefix="term")
    try:
        wait_pods(pods[0], 3)
        leaving = pods[0]
        models = ["m2", "m3", "m4"]
        for m in models:
            r = httpx.post(f"{leaving.http_url}/v2/repository/models/{m}/load", timeout=30)
            assert r.status_code == 200
        wait_for(lambda: all(holders(pods[1], m) == ["pod-0"] for m in models), what="pod-0 holding the models")
        stop, failures, count = threading.Event(), [], [0]
        worker = threading.Thread(target=_hammer, args=(pods[1:], models, stop, failures, count))
        worker.start()
        time.sleep(0.3)
        leaving.proc.send_signal(signal.SIGTERM)
        assert leaving.proc.wait(20) == 0
        time.sleep(0.3)
        stop.set()
        worker.join()
        assert failures == [], failures[:3]
        assert count[0] > 10
        for m in models:  # handed off before it left
            copies = holders(pods[1], m)
            assert copies and "pod-0" not in copies, (m, copies)
        assert "pod-0" not in [p["id"] for p in httpx.get(f"{pods[1].http_url}/v2/fleet/pods").json()]
        assert "handed off 3 of 3" in leaving.log()
    finally:
        for p in pods:
            p.stop()


def test_etcd_lost_keeps_serving_and_recovers(fleet_models, tmp_path):
    etcd = start_etcd(tmp_path / "etcd")
    pods = start_pods(etcd, fleet_models, tmp_path / "logs", n=2, prefix="lost")
    try:
        wait_pods(pods[0], 2)
        assert infer(pods[0], "m1").status_code == 200
        owner = wait_for(lambda: holders(pods[1], "m1"), what="m1 placed")[0]
        etcd.stop()
        time.sleep(float(LEASE))
        for pod in pods:  # held models keep serving, here and forwarded
            r = infer(pod, "m1", 5.0)
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == [5.0]
        cold = infer(pods[0], "m6")  # no new placements while the store is away
        assert cold.status_code == 503
        assert "fleet store is unreachable" in cold.json()["error"]
        etcd.start()

        def placed_again():
            return infer(pods[1], "m6").status_code == 200

        wait_for(placed_again, 20, "placements after etcd returned")
        wait_for(lambda: holders(pods[0], "m1") == [owner], 10, "holder records published again")
        # The copy's holder record reaches this pod through the store's watch, just back: soon, not at once.
        wait_for(lambda: index(pods[1])["m6"]["state"] == "READY", 10, "m6 READY in pod-1's index")
    finally:
        for p in pods:
            p.stop()
        etcd.stop()


def test_etcd_unreachable_at_start(fleet_models, tmp_path):
    store = f"etcd://127.0.0.1:{free_port()}/nothing"
    try:
        srv = start_server(fleet_models, tmp_path / "a.log", "--store", store, env={"MESHSERVE_POD_ID": "lonely"})
        srv.stop()
        raise AssertionError("a pod must not start without its store")
    except RuntimeError as e:
        assert "exited with 1" in str(e)
        assert "cannot reach etcd at 127.0.0.1" in str(e)
    # Configured to fall back: one pod, serving on its own.
    srv = start_server(
        fleet_models, tmp_path / "b.log", "--store", store, "--no-preload", env={"MESHSERVE_STORE_FALLBACK_LOCAL": "1"}
    )
    try:
        assert infer(srv, "m3", 1.0).json()["outputs"][0]["data"] == [3.0]
        assert "serving as a single pod" in srv.log()
        assert httpx.get(f"{srv.http_url}/v2/fleet/pods").status_code == 404
    finally:
        srv.stop()


def test_stale_record_of_a_dead_pod(etcd, fleet_models, tmp_path):
    pods = start_pods(etcd, fleet_models, tmp_path / "logs", n=2, prefix="stale")
    try:
        wait_pods(pods[0], 2)
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there

        async def ghost(client):
            lease = await client.lease(30)
            record = {"id": "ghost", "http": dead, "grpc": dead, "capacity": 1 << 30, "lease": lease.id}
            await client.put(b"stale/pods/ghost", orjson.dumps(record), lease=lease)
            await client.put(b"stale/holders/m5/ghost", b"{}", lease=lease)
            return lease.id

        lease_id = etcd_call(etcd, ghost)
        wait_for(lambda: holders(pods[0], "m5") == ["ghost"], what="the ghost's holder record")
        r = infer(pods[0], "m5", 2.0)  # forwarded to the ghost, refused, loaded on a live pod
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [10.0]
        copies = wait_for(lambda: [c for c in holders(pods[1], "m5") if c != "ghost"], what="a live copy")
        assert copies[0] in ("pod-0", "pod-1")
        assert infer(pods[1], "m5").status_code == 200
        ghost_row = [c for c in index(pods[0])["m5"]["copies"] if c["pod"] == "ghost"]
        assert ghost_row and ghost_row[0]["state"] == "UNREACHABLE"
        etcd_call(etcd, lambda c: c.revoke_lease(lease_id))
        wait_for(lambda: "ghost" not in holders(pods[0], "m5"), what="the ghost gone")
    finally:
        for p in pods:
            p.stop()


def test_bad_store_url_is_a_settings_error(fleet_models, tmp_path):
    for url in ("http://127.0.0.1:2379/x", "etcd://127.0.0.1:port/x"):
        try:
            start_server(fleet_models, tmp_path / "bad.log", "--store", url)
            raise AssertionError("a bad store URL must stop the server")
        except RuntimeError as e:
            assert "exited with 2" in str(e)
            assert "invalid settings" in str(e) and "store" in str(e)


def test_fleet_bench_runs(tmp_path):
    """A tiny run of loadtests/fleet_bench.py: every phase, no errors."""
    import subprocess
    import sys

    from tests.support.server import REPO

    out = subprocess.run(
        [
            sys.executable, "loadtests/fleet_bench.py", "--models", "60", "--resident", "10", "--duration", "2",
            "--warmup", "1", "--fault-duration", "3", "--probe", "3", "--probe-rounds", "10", "--concurrency", "4",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| errors | 0 |" in out.stdout, out.stdout
    assert "| kill -9: requests failed | 0 |" in out.stdout, out.stdout
    assert "| SIGTERM: requests failed | 0 |" in out.stdout, out.stdout
