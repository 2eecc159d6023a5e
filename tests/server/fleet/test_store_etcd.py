"""EtcdStore against a real etcd: claims race, records follow leases, views follow the watch."""

from __future__ import annotations

import asyncio
import time

from meshserve.modelmesh.store import EtcdStore, PodRecord


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def test_claims_race_and_records_follow_leases(etcd):
    async def go():
        url = etcd.store_url("units")
        a, b = EtcdStore(url, lease_seconds=1), EtcdStore(url, lease_seconds=1)
        await a.start(PodRecord("a", grpc="127.0.0.1:1"))
        await b.start(PodRecord("b", grpc="127.0.0.1:2"))
        try:
            await _until(lambda: set(a.view.pods) == {"a", "b"} and set(b.view.pods) == {"a", "b"})
            # Both pods claim the same cold model at once, each for itself: one wins, both know it.
            owners = await asyncio.gather(*(s.claim(f"m{i}", s.pod) for i in range(20) for s in (a, b)))
            for i in range(20):
                assert owners[2 * i] == owners[2 * i + 1]
            assert {"a", "b"} >= set(owners)
            # The winner's copy ends the claim; the loser's view sees the holder.
            winner = a if owners[0] == "a" else b
            other = b if winner is a else a
            await winner.set_holdings([("m0", True)])
            await _until(lambda: "m0" not in other.view.claims and list(other.view.holders_of("m0")) == [winner.pod.id])
            # A claim is bound to the chosen pod's lease: a pod that lapses takes it along.
            await other.claim("late", winner.pod)
            await _until(lambda: "late" in other.view.claims)
            for t in winner._tasks:  # stop its keepalive without revoking: a pod frozen or killed
                t.cancel()
            await _until(lambda: winner.pod.id not in other.view.pods, timeout=6)
            assert "late" not in other.view.claims and other.view.holders_of("m0") == {}
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())


def test_registrations_are_written_once(etcd):
    async def go():
        url = etcd.store_url("regs")
        a, b = EtcdStore(url), EtcdStore(url)
        await a.start(PodRecord("a"))
        await b.start(PodRecord("b"))
        try:
            docs = {f"m{i}": {"name": f"m{i}", "uri": f"/models/m{i}"} for i in range(300)}  # > one txn
            assert await a.register(docs) == 300
            await _until(lambda: len(b.view.models) == 300)
            assert await b.register(docs) == 0
            assert b.view.models["m7"]["uri"] == "/models/m7"
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())
