"""Three pods, one etcd: any pod serves any model, one copy per placement, copies that follow load."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import numpy as np
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc

from tests.server.fleet.conftest import etcd_call, holders, index, infer, pod_index, wait_for


def test_any_pod_serves_any_model_with_one_copy(pods):
    first = infer(pods[0], "m1", 2.0)
    assert first.status_code == 200, first.text
    assert first.json()["outputs"][0]["data"] == [2.0]
    assert first.headers["meshserve-route"] == "miss"
    owner = wait_for(lambda: holders(pods[1], "m1"), what="a holder record")
    assert len(owner) == 1
    for pod in pods:
        r = infer(pod, "m1", 3.0, request_id=f"req-{pod.http_port}")
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [3.0]
        assert r.json()["id"] == f"req-{pod.http_port}"  # the id survives forwarding
        expected = "local" if pod is pod_index(pods, owner[0]) else "forwarded"
        assert r.headers["meshserve-route"] == expected
    for pod in pods:  # ready through any pod, and every pod shows the same fleet view
        assert httpx.get(f"{pod.http_url}/v2/models/m1/ready").status_code == 200
        row = index(pod)["m1"]
        assert row["state"] == "READY"
        assert [c["pod"] for c in row["copies"]] == owner


def test_grpc_forwarding_keeps_the_message(pods):
    infer(pods[0], "m2")
    owner = wait_for(lambda: holders(pods[0], "m2"), what="a holder of m2")[0]
    other = next(p for p in pods if p is not pod_index(pods, owner))
    with grpc.insecure_channel(other.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="m2", id="grpc-7")
        req.inputs.add(name="x", datatype="FP32", shape=[3])
        req.raw_input_contents.append(np.array([1, 2, 3], dtype=np.float32).tobytes())
        reply = stub.ModelInfer(req, timeout=10)
        assert reply.id == "grpc-7"
        assert np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).tolist() == [2.0, 4.0, 6.0]
        bad = pb.ModelInferRequest(model_name="m2")
        bad.inputs.add(name="x", datatype="FP32", shape=[3])
        bad.raw_input_contents.append(b"\0" * 5)  # not whole FP32 elements: the holder says so
        try:
            stub.ModelInfer(bad, timeout=10)
            raise AssertionError("a bad request must fail")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "whole number" in e.details()
    assert holders(pods[0], "m2") == [owner]  # a bad request moved nothing


def test_unknown_model_is_404_everywhere(pods):
    for pod in pods:
        assert httpx.get(f"{pod.http_url}/v2/models/m11/ready").status_code == 400  # held nowhere yet
        r = infer(pod, "nope")
        assert r.status_code == 404
        assert "nope" in r.json()["error"]


def test_racing_pods_load_one_copy(pods):
    results: list[int] = []

    def hit(pod):
        results.append(infer(pod, "m3").status_code)

    threads = [threading.Thread(target=hit, args=(pods[i % 3],)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 24
    copies = wait_for(lambda: holders(pods[2], "m3"), what="a holder of m3")
    assert len(copies) == 1, copies


def test_load_failure_moves_on_and_is_recorded(pods):
    # pod-2 gets the most models, so placement tries pod-0 and pod-1 first; both fail "flaky".
    for m in ("m7", "m8", "m9"):
        r = httpx.post(f"{pods[2].http_url}/v2/repository/models/{m}/load", timeout=30)
        assert r.status_code == 200, r.text
    wait_for(
        lambda: all(
            p["models"] >= 3 for p in httpx.get(f"{pods[0].http_url}/v2/fleet/pods").json() if p["id"] == "pod-2"
        ),
        what="pod-2's record to count its models",
    )
    r = infer(pods[0], "flaky", 1.0)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [12.0]
    row = wait_for(lambda: index(pods[1])["flaky"]["copies"] and index(pods[1])["flaky"], what="flaky placed")
    assert [c["pod"] for c in row["copies"]] == ["pod-2"]
    assert set(row["failures"]) == {"pod-0", "pod-1"}
    assert "cannot load flaky" in row["failures"]["pod-0"]


def test_copies_follow_use_and_rate(pods, etcd):
    async def set_setting(client, name, value):
        await client.put(f"fleet/settings/{name}".encode(), str(value).encode())

    # Used again after a while (1 s here, ModelMesh ~7 min): a second copy.
    etcd_call(etcd, lambda c: set_setting(c, "second_copy_after_seconds", 1))
    try:
        assert infer(pods[0], "m4").status_code == 200
        wait_for(lambda: holders(pods[0], "m4"), what="m4 loaded")

        def two_copies():
            assert infer(pods[1], "m4").status_code == 200
            return len(holders(pods[1], "m4")) >= 2

        wait_for(two_copies, 15, "a second copy of m4")
        # Each holder knows whether its copy is the extra one: exactly one is.
        owners = holders(pods[0], "m4")
        extra = [c["extra"] for o in owners for c in index(pod_index(pods, o))["m4"]["copies"] if c["pod"] == o]
        assert sorted(extra) == [False, True]
    finally:
        etcd_call(etcd, lambda c: c.delete(b"fleet/settings/second_copy_after_seconds"))
    # A copy serving more than copy_rate_per_minute: one more.
    etcd_call(etcd, lambda c: set_setting(c, "copy_rate_per_minute", 60))
    try:
        assert infer(pods[0], "m5").status_code == 200
        owner = wait_for(lambda: holders(pods[0], "m5"), what="m5 loaded")[0]
        holder = pod_index(pods, owner)
        with httpx.Client() as client:

            def busy():
                body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
                for _ in range(20):
                    assert client.post(f"{holder.http_url}/v2/models/m5/infer", json=body).status_code == 200
                return len(holders(pods[0], "m5")) >= 2

            wait_for(busy, 15, "a copy of m5 for its request rate")
    finally:
        etcd_call(etcd, lambda c: c.delete(b"fleet/settings/copy_rate_per_minute"))
    # The copy that came second is the one evicted first.
    rows = index(pods[0])["m5"]["copies"]
    assert len(rows) >= 2


def test_fleet_metrics(pods):
    assert infer(pods[0], "m6").status_code == 200
    owner = wait_for(lambda: holders(pods[0], "m6"), what="m6 placed")[0]
    other = next(p for p in pods if p is not pod_index(pods, owner))
    assert infer(other, "m6").headers["meshserve-route"] == "forwarded"
    text = httpx.get(f"{other.http_url}/metrics").text
    assert 'meshserve_fleet_requests_total{route="forwarded"}' in text
    forwarded = next(
        line for line in text.splitlines() if line.startswith('meshserve_fleet_requests_total{route="forwarded"}')
    )
    assert float(forwarded.split()[-1]) >= 1
    assert "meshserve_fleet_pods 3.0" in text
    assert "meshserve_fleet_store_connected 1.0" in text


def test_unloaded_copy_leaves_its_last_use(pods):
    assert infer(pods[1], "m10").status_code == 200
    owner = wait_for(lambda: holders(pods[1], "m10"), what="m10 placed")[0]
    holder = pod_index(pods, owner)
    other = next(p for p in pods if p is not holder)
    before = time.time()
    r = httpx.post(f"{holder.http_url}/v2/repository/models/m10/unload", timeout=10)
    assert r.status_code == 200
    row = wait_for(lambda: not index(other)["m10"]["copies"] and index(other)["m10"], what="m10's copy gone")
    assert row["state"] != "READY"
    assert row["last_used"] is not None and before - 30 < row["last_used"] <= time.time()
    assert infer(other, "m10").status_code == 200  # and it places again on its next request


def test_grpc_stream_and_deadline_through_another_pod(pods):
    r = httpx.post(f"{pods[0].http_url}/v2/repository/models/slow/load", timeout=30)
    assert r.status_code == 200
    wait_for(lambda: holders(pods[1], "slow") == ["pod-0"], what="slow held by pod-0")
    with grpc.insecure_channel(pods[1].grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def request(i: int) -> pb.ModelInferRequest:
            req = pb.ModelInferRequest(model_name="m2", id=f"s{i}")
            req.inputs.add(name="x", datatype="FP32", shape=[1])
            req.raw_input_contents.append(np.array([i], dtype=np.float32).tobytes())
            return req

        # A stream through a pod that does not hold the model: every answer, in order.
        assert infer(pods[0], "m2").status_code == 200
        copies = wait_for(lambda: holders(pods[0], "m2"), what="m2 placed")
        stranger = next(p for p in pods if p.http_port not in [pod_index(pods, c).http_port for c in copies])
        with grpc.insecure_channel(stranger.grpc_address) as other:
            stream = pb_grpc.GRPCInferenceServiceStub(other).ModelStreamInfer
            answers = list(stream(iter([request(i) for i in range(5)]), timeout=20))
        assert [a.infer_response.id for a in answers] == [f"s{i}" for i in range(5)]
        values = [np.frombuffer(a.infer_response.raw_output_contents[0], np.float32)[0] for a in answers]
        assert values == [2.0 * i for i in range(5)]
        # The client's deadline goes with the forwarded call: 0.2 s of work, 0.05 s allowed.
        slow = pb.ModelInferRequest(model_name="slow")
        slow.inputs.add(name="x", datatype="FP32", shape=[1])
        slow.raw_input_contents.append(np.array([1], dtype=np.float32).tobytes())
        t = time.monotonic()
        try:
            stub.ModelInfer(slow, timeout=0.05)
            raise AssertionError("the deadline must pass first")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t < 1.0
        assert stub.ModelInfer(slow, timeout=10).model_name == "slow"  # and the pods are fine
