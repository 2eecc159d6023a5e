"""SIGTERM with requests in flight: not ready at once, everything accepted is answered,
new connections are refused, models unloaded, exit 0 within the grace period."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from tests.server.prod.conftest import grpc_infer_request, grpc_stub, infer_doc, scrape
from tests.support.server import start_server

N = 16  # per protocol
SLEEP = 5.0  # the burst outlives the 2 s drain by seconds, on any machine
GRACE = 12.0
DRAIN = 2.0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_a_burst_loses_nothing(prod_models, tmp_path, workers):
    """With 2 workers, half the connections land on the worker that does not own the model
    and are forwarded: those must survive the shutdown too."""
    srv = start_server(
        prod_models, tmp_path / "server.log", "--shutdown-grace", str(GRACE), "--drain-seconds", str(DRAIN),
        "--workers", str(workers), env={"MESHSERVE_PREDICT_THREADS": "64"},
    )  # fmt: skip
    try:

        def rest(i: int):
            with httpx.Client(timeout=30) as c:  # a connection of its own
                r = c.post(f"{srv.http_url}/v2/models/slow/infer", json=infer_doc([i], sleep=SLEEP))
                return r.status_code, r.json()["outputs"][0]["data"]

        def rpc(i: int):
            with grpc.insecure_channel(srv.grpc_address) as channel:
                out = grpc_stub(channel).ModelInfer(grpc_infer_request("slow", [i], sleep=SLEEP), timeout=30)
                return 200, list(out.outputs[0].contents.fp32_contents)

        with ThreadPoolExecutor(2 * N + 2) as pool, httpx.Client(base_url=srv.http_url, timeout=5) as probe:
            futures = [pool.submit(rest, i) for i in range(N)] + [pool.submit(rpc, i) for i in range(N)]
            deadline = time.monotonic() + 10
            while scrape(probe.get("/metrics").text, "meshserve_inference_requests_in_flight") < 2 * N:
                assert time.monotonic() < deadline, "the burst never got in flight"
                time.sleep(0.05)
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            # Draining: not ready, still answering on a new connection for --drain-seconds.
            with httpx.Client(timeout=5) as fresh:
                ready = fresh.get(f"{srv.http_url}/v2/health/ready").status_code
                while ready != 400 and time.monotonic() < signalled + DRAIN / 2:  # the signal has to land
                    time.sleep(0.02)
                    ready = fresh.get(f"{srv.http_url}/v2/health/ready").status_code
                assert ready == 400
                assert fresh.get(f"{srv.http_url}/v2/health/live").status_code == 200
            # Then the listeners close: new connections are refused, while the burst is still running.
            while True:
                try:
                    with httpx.Client(timeout=2) as late:
                        late.get(f"{srv.http_url}/v2/health/live")
                except httpx.ConnectError:
                    break
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    pass  # accepted into a listener's backlog as it closed: reset, then refused next
                assert time.monotonic() < signalled + DRAIN + 2, "the listeners stayed open past the drain"
                time.sleep(0.05)
            assert time.monotonic() >= signalled + DRAIN - 0.1  # not before the drain ended
            assert not all(f.done() for f in futures)
            with grpc.insecure_channel(srv.grpc_address) as channel, pytest.raises(grpc.RpcError) as e:
                grpc_stub(channel).ModelInfer(grpc_infer_request("slow", [0]), timeout=2)
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            results = [f.result() for f in futures]
        assert results == [(200, [2.0 * i]) for i in range(N)] * 2
        rc = srv.proc.wait(GRACE)
        assert rc == 0
        assert time.monotonic() - signalled < GRACE
        log = srv.log()
        assert log.count("draining") == workers and "Traceback" not in log
    finally:
        srv.stop()
