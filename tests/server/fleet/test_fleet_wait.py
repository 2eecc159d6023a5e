"""A fleet under churn: a miss that every pod refuses (all full of young models) waits for
the pod whose least recently used model ages first and loads there; 503 with Retry-After
only past --capacity-wait."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from meshserve.modelmesh.fleet.routing import no_room_anywhere, wait_for_room
from meshserve.protocol.errors import CapacityExhausted

from tests.server.fleet.conftest import holders, infer, start_pods, wait_for, wait_pods

# Each model is 4 KiB (1024 float32, size_bytes): room for two per pod.
TWO_MODELS = str(9 * 1024)
SIZED = {"MESHSERVE_DEFAULT_MODEL_BYTES": "0", "MESHSERVE_MODEL_OVERHEAD_BYTES": "0"}  # from the files alone


def _fill(pods) -> dict[str, list[str]]:
    """m0..m3 placed two per pod (placement prefers pods with room); returns pod -> models."""
    for m in ("m0", "m1", "m2", "m3"):
        r = infer(pods[0], m)
        assert r.status_code == 200, r.text
    placed = {m: wait_for(lambda m=m: holders(pods[1], m), what=f"{m} placed")[0] for m in ("m0", "m1", "m2", "m3")}
    by_pod: dict[str, list[str]] = {}
    for m, pod in placed.items():
        by_pod.setdefault(pod, []).append(m)
    assert sorted(len(v) for v in by_pod.values()) == [2, 2], placed

    def full() -> bool:  # placement reads the pods' records: wait until both say they are full
        records = httpx.get(f"{pods[0].http_url}/v2/fleet/pods", timeout=5).json()
        return all(p["used"] >= 2 * 4096 for p in records)

    wait_for(full, 5, "both pods' records full")
    return by_pod


def test_a_miss_every_pod_refuses_waits_for_the_first_to_age(etcd, fleet_models, tmp_path):
    env = {
        **SIZED,
        "MESHSERVE_CAPACITY_BYTES": TWO_MODELS,
        "MESHSERVE_MIN_CHURN_AGE_SECONDS": "7",
        "MESHSERVE_CAPACITY_WAIT_SECONDS": "12",
    }
    pods = start_pods(etcd, fleet_models, tmp_path / "logs", n=2, prefix="waitok", env=env)
    try:
        wait_pods(pods[0], 2)
        by_pod = _fill(pods)
        # Keep pod-1's models young; pod-0's age first.
        time.sleep(1.0)
        for m in by_pod["pod-1"]:
            assert infer(pods[1], m).status_code == 200

        def published() -> bool:  # placement reads the pods' records: wait for pod-1's to say so
            records = {p["id"]: p for p in httpx.get(f"{pods[1].http_url}/v2/fleet/pods", timeout=5).json()}
            return records["pod-1"]["oldest_lru"] > records["pod-0"]["oldest_lru"] + 0.5

        wait_for(published, 3, "pod-1's record with its younger LRU")
        t0 = time.monotonic()
        r = infer(pods[1], "m4")
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [8.0]
        assert 0.5 < took < 7.5, took  # waited for pod-0's oldest to pass the 7 s guard
        assert wait_for(lambda: holders(pods[0], "m4"), what="m4 placed") == ["pod-0"]
        # The dashboard's feed shows the fleet: both pods, and which copies live where.
        doc = httpx.get(f"{pods[1].http_url}/v2/dashboard/state", params={"q": "m4"}, timeout=10).json()
        assert [p["id"] for p in doc["fleet"]["pods"]] == ["pod-0", "pod-1"]
        assert all(p["alive"] and not p["shutting_down"] for p in doc["fleet"]["pods"])
        (row,) = [dict(zip(doc["models"]["columns"], r, strict=True)) for r in doc["models"]["rows"]]
        assert row["copies"] == ["pod-0"] and row["state"] == "READY_ELSEWHERE"
        _fleet_in_the_page(pods[1], tmp_path)
    finally:
        for p in pods:
            p.stop()


def test_past_the_wait_503_with_retry_after(etcd, fleet_models, tmp_path):
    env = {
        **SIZED,
        "MESHSERVE_CAPACITY_BYTES": TWO_MODELS,
        "MESHSERVE_MIN_CHURN_AGE_SECONDS": "30",
        "MESHSERVE_CAPACITY_WAIT_SECONDS": "1.5",
    }
    pods = start_pods(etcd, fleet_models, tmp_path / "logs", n=2, prefix="waitno", env=env)
    try:
        wait_pods(pods[0], 2)
        _fill(pods)
        t0 = time.monotonic()
        r = infer(pods[0], "m5")
        took = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert "no pod has room for model 'm5'" in r.json()["error"]
        # When the first pod's oldest model passes the 30 s guard, not a blind 1 s.
        assert 20 <= int(r.headers["retry-after"]) <= 31, r.headers
        assert 1.4 < took < 2.6, took  # one wait for the whole fleet (1.5 s), not one per pod (3 s)
        assert httpx.get(f"{pods[0].http_url}/v2/models/m0/ready", timeout=5).status_code == 200
    finally:
        for p in pods:
            p.stop()


# -- the fleet's wait, alone ---------------------------------------------------------
def test_every_pod_refused_waits_for_the_first_room():
    async def go():
        now = time.monotonic()
        room = {"pod-a": now + 0.4, "pod-b": now + 0.2}
        first = await wait_for_room("m", room, now + 5, None)
        return first, time.monotonic() - now, room

    first, took, left = asyncio.run(go())
    assert first == "pod-b" and 0.15 < took < 1.0
    assert list(left) == ["pod-a"]  # pod-b is tried again; pod-a still refused


def test_room_past_the_bound_is_503_at_once_with_its_retry_after():
    async def go():
        now = time.monotonic()
        with pytest.raises(CapacityExhausted) as e:
            await wait_for_room("m", {"pod-a": now + 20, "pod-b": now + 12}, now + 1, None)
        return e.value, time.monotonic() - now

    error, took = asyncio.run(go())
    assert took < 0.5 and 11 <= error.retry_after <= 12
    assert "no pod has room for model 'm' now (2 refused)" in error.message
    assert no_room_anywhere("m", {"p": time.monotonic() - 5}, None).retry_after == 1.0  # never below 1 s


def _fleet_in_the_page(pod, out) -> None:
    """The page's fleet table in headless Chromium: both pods, and no console error."""
    from tests.server.test_dashboard import _chromium, _console_errors, _wait

    browser = _chromium()
    try:
        browser.get(pod.http_url + "/dashboard")
        script = "return [...document.querySelectorAll('#pods tr')].map(tr => tr.cells[0].textContent)"
        shown = _wait(lambda: browser.execute_script(script), what="the fleet table")
        assert shown == ["pod-0", "pod-1 (this pod)"]
        assert browser.execute_script("return document.getElementById('fleet').hidden") is False
        browser.save_screenshot(str(out / "dashboard-fleet.png"))
        assert _console_errors(browser) == []
    finally:
        browser.quit()
