"""The placement order and the store records, without processes."""

from __future__ import annotations

import asyncio

import pytest
from meshserve.modelmesh.placement import rank_pods
from meshserve.modelmesh.store import EtcdStore, FleetView, InProcessStore, PodRecord, open_store, parse_store_url


def pod(i: str, **kw) -> PodRecord:
    return PodRecord(id=i, capacity=kw.pop("capacity", 1000), **kw)


def test_rank_pods_follows_modelmesh_order():
    pods = [
        pod("leaving", shutting_down=True),
        pod("full-recent", used=990, oldest_lru=200.0),
        pod("full-cold", used=990, oldest_lru=100.0),
        pod("busy", used=100, models=5),
        pod("roomy", used=100, models=2),
        pod("roomier", used=50, models=2),
        pod("roomier-loading", used=50, models=2, loading=3),
    ]
    order = [p.id for p in rank_pods(pods, need=100)]
    # Not shutting down; room first (fewest models, most free space, free load slots);
    # then full pods, the one with the coldest LRU entry first.
    assert order == ["roomier", "roomier-loading", "roomy", "busy", "full-cold", "full-recent"]


def test_in_process_store_claims_once_and_tracks_holders():
    async def go():
        store = InProcessStore()
        me, other = pod("a"), pod("b")
        await store.start(me)
        assert await store.claim("m", other) == "b"
        assert await store.claim("m", me) == "b"  # the second racer learns the winner
        await store.set_holdings([("m", True)])
        assert "m" not in store.view.claims  # a copy ends the claim
        assert list(store.view.holders_of("m")) == ["a"]
        await store.set_holdings([("m", False)])
        assert store.view.holders_of("m") == {}
        assert await store.register({"m": {"name": "m"}}) == 1
        assert await store.register({"m": {"name": "m"}, "n": {"name": "n"}}) == 1

    asyncio.run(go())


def test_view_ignores_malformed_records():
    view = FleetView()
    view.apply("pods/x", b"not json", 1)
    view.apply("claims/m", b"{}", 2)
    assert view.pods == {} and view.claims == {}
    view.apply("holders/ns/model/pod-1", b"{}", 3)  # model keys may hold a slash (name/version)
    assert view.holders == {"ns/model": {"pod-1": 3}}


def test_store_urls():
    assert parse_store_url("etcd://10.0.0.1:2379/mesh") == ("10.0.0.1", 2379, "mesh")
    assert parse_store_url("etcd://etcd") == ("etcd", 2379, "meshserve")
    for bad in ("http://x:1/p", "etcd:///p", "etcd://h:notaport/p"):
        with pytest.raises(ValueError):
            parse_store_url(bad)
    assert isinstance(open_store(None), InProcessStore)
    assert isinstance(open_store("etcd://h:1/p"), EtcdStore)


def test_extra_copies_are_evicted_first():
    from meshserve.modelmesh import CacheEntry, PlacementPolicy

    entries = []
    for i, extra in enumerate([False, False, True, False, True]):  # oldest first
        e = CacheEntry(f"m{i}", spec=None)
        e.size_bytes, e.last_used, e.extra = 10, float(i), extra
        entries.append(e)
    choice = PlacementPolicy().choose_victims(entries, need=20, now=100.0)
    assert [v.key for v in choice.victims] == ["m2", "m4"]  # the extra copies, though newer
    choice = PlacementPolicy().choose_victims(entries, need=30, now=100.0)
    assert [v.key for v in choice.victims] == ["m2", "m4", "m0"]  # then the least recently used
