"""--workers 2 with copies of hot models (server/worker_copies.py): a hot model is served by
every worker that receives it, a cold one stays with its owner, copies go first under
memory pressure, and repository changes reach every copy."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
from meshserve.server.workers import owner_of

from tests.server.prod.conftest import grpc_infer_request, grpc_stub, infer_doc, write_model
from tests.support.server import RunningServer, start_server

MB = 1 << 20

PID = '''
import os

import numpy as np

from meshserve import InferenceRequest, Model


class Pid(Model):
    """Answers with the process that served it; reports SIZE bytes."""

    SIZE = {size}

    def size_bytes(self):
        return self.SIZE

    def predict(self, request: InferenceRequest):
        return {{"pid": np.asarray([os.getpid()], dtype=np.int64)}}
'''


def _owned_by(worker: int, count: int, prefix: str) -> list[str]:
    names, i = [], 0
    while len(names) < count:
        name = f"{prefix}{i}"
        if owner_of(name, 2) == worker:
            names.append(name)
        i += 1
    return names


def _rest_pid(srv: RunningServer, name: str) -> int | None:
    with httpx.Client(timeout=10) as c:  # a fresh connection: the kernel picks the worker
        r = c.post(f"{srv.http_url}/v2/models/{name}/infer", json=infer_doc([1]))
    return r.json()["outputs"][0]["data"][0] if r.status_code == 200 else None


def _grpc_pid(srv: RunningServer, name: str) -> int:
    with grpc.insecure_channel(srv.grpc_address) as ch:  # a fresh connection too
        out = grpc_stub(ch).ModelInfer(grpc_infer_request(name, [1]), timeout=10)
    return out.outputs[0].contents.int64_contents[0] if out.outputs[0].contents.int64_contents else None


def _pids_seen(srv: RunningServer, name: str, seconds: float, want: int, rest: bool = True) -> set[int]:
    seen: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(seen) < want:
        pid = _rest_pid(srv, name) if rest else _grpc_pid(srv, name)
        assert pid is not None
        seen.add(pid)
    return seen


def _write(root: Path, names: list[str], size: int) -> None:
    for name in names:
        write_model(root, name, PID.format(size=size), "Pid")


def test_a_hot_model_is_served_by_both_workers_a_cold_one_by_its_owner(tmp_path):
    (hot,) = _owned_by(0, 1, "hot")
    (cold,) = _owned_by(0, 1, "cold")
    _write(tmp_path / "models", [hot, cold], MB)
    srv = start_server(tmp_path / "models", tmp_path / "server.log", "--workers", "2", "--worker-copy-rate", "3")
    try:
        owner = _rest_pid(srv, cold)
        # Cold: one request a second from fresh connections, always the owner.
        for _ in range(4):
            assert _rest_pid(srv, cold) == owner
            time.sleep(1.0)
        # Hot: after a window of steady traffic the other worker serves its own copy.
        both = _pids_seen(srv, hot, 20, 2)
        assert len(both) == 2 and owner in both, srv.log()
        assert "serving a copy of hot model" in srv.log()
        assert len(_pids_seen(srv, hot, 10, 2, rest=False)) == 2  # gRPC too
        assert {_rest_pid(srv, cold) for _ in range(10)} == {owner}

        # An unload through any worker reaches the copy: no worker serves it afterwards.
        with httpx.Client(timeout=10) as c:
            assert c.post(f"{srv.http_url}/v2/repository/models/{hot}/unload").status_code == 200
        assert all(_rest_pid(srv, hot) is None for _ in range(10))
        # Loaded again: served again, copies come back when hot.
        with httpx.Client(timeout=10) as c:
            assert c.post(f"{srv.http_url}/v2/repository/models/{hot}/load").status_code == 200
        assert len(_pids_seen(srv, hot, 20, 2)) == 2
        # A folder added after start and loaded by name (Triton's explicit mode) is replayed
        # on the other worker too, which never registered it: nothing to drop, no complaint.
        (fresh,) = _owned_by(1, 1, "fresh")
        _write(tmp_path / "models", [fresh], MB)
        with httpx.Client(timeout=10) as c:
            assert c.post(f"{srv.http_url}/v2/repository/models/{fresh}/load").status_code == 200
        assert _rest_pid(srv, fresh) is not None
        assert "did not take" not in srv.log()
    finally:
        srv.stop()


def test_copies_are_evicted_before_single_copies(tmp_path):
    (hot,) = _owned_by(0, 1, "hot")
    first, second = _owned_by(1, 2, "own")
    _write(tmp_path / "models", [hot, first, second], 40 * MB)
    srv = start_server(
        tmp_path / "models", tmp_path / "server.log", "--workers", "2", "--worker-copy-rate", "3",
        "--capacity-bytes", str(200 * MB), "--min-churn-age", "0", "--no-preload",
    )  # fmt: skip
    try:
        owner = _rest_pid(srv, hot)
        # Worker 1 (100 MiB) holds a copy of the hot model (40 MiB) ...
        assert len(_pids_seen(srv, hot, 20, 2)) == 2, srv.log()
        with httpx.Client(timeout=10, base_url=srv.http_url) as c:
            # ... then loads its own two (80 MiB): the copy goes, though it was used last.
            assert c.post(f"/v2/repository/models/{first}/load").status_code == 200
            assert c.post(f"/v2/repository/models/{second}/load").status_code == 200
            rows = {r["name"]: r["state"] for r in c.post("/v2/repository/index", json={}).json()}
        assert rows[first] == rows[second] == "READY"
        # The hot model is back to its owner alone: no room for a copy without evicting.
        assert {_rest_pid(srv, hot) for _ in range(30)} == {owner}
        assert "evicting model " + hot in srv.log()
    finally:
        srv.stop()
