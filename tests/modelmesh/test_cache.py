"""The cache alone, with stand-in models."""

import asyncio

import pytest
from meshserve.modelmesh import ModelCache, ModelState
from meshserve.protocol.errors import ModelLoadError, ModelNotFound, ModelNotReady


class Loader:
    def __init__(self, delay: float = 0.0) -> None:
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.delay = delay

    async def load(self, spec):
        self.loads.append(spec)
        await asyncio.sleep(self.delay)
        if spec.startswith("bad"):
            raise ModelLoadError(f"{spec} is broken")
        if spec.startswith("crash"):
            raise RuntimeError("boom")
        return f"handle:{spec}", len(spec)

    async def unload(self, handle):
        self.unloads.append(handle)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_loads_of_one_model_load_once():
    async def main():
        loader = Loader(delay=0.05)
        cache = ModelCache(loader.load, loader.unload)
        cache.register("a", "spec-a")
        await asyncio.gather(*(cache.load("a") for _ in range(10)))
        assert loader.loads == ["spec-a"]
        entry = cache.get("a")
        assert entry.state is ModelState.READY and entry.size_bytes == 6 and entry.load_seconds >= 0.05

    run(main())


def test_failed_load_is_recorded_and_not_served():
    async def main():
        loader = Loader()
        cache = ModelCache(loader.load, loader.unload)
        cache.register("b", "bad-b")
        cache.register("c", "crash-c")
        with pytest.raises(ModelLoadError, match="bad-b is broken"):
            await cache.load("b")
        with pytest.raises(ModelLoadError, match="RuntimeError: boom"):
            await cache.load("c")
        assert cache.get("b").state is ModelState.FAILED and "broken" in cache.get("b").reason
        with pytest.raises(ModelNotReady, match="failed to load: bad-b is broken"):
            async with cache.acquire("b"):
                pass

    run(main())


def test_failed_reload_keeps_the_serving_copy():
    async def main():
        loader = Loader()
        cache = ModelCache(loader.load, loader.unload)
        cache.register("a", "good")
        await cache.load("a")
        with pytest.raises(ModelLoadError, match="still serves"):
            await cache.load("a", spec="bad-new")
        async with cache.acquire("a") as handle:
            assert handle == "handle:good"
        await cache.load("a", spec="better")
        async with cache.acquire("a") as handle:
            assert handle == "handle:better"
        assert loader.unloads == ["handle:good"]

    run(main())


def test_unload_waits_for_in_flight_requests():
    async def main():
        loader = Loader()
        cache = ModelCache(loader.load, loader.unload)
        cache.register("a", "good")
        await cache.load("a")
        order = []

        async def request():
            async with cache.acquire("a"):
                await asyncio.sleep(0.05)
                order.append("request done")

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        await cache.unload("a")
        order.append("unloaded")
        await task
        assert order == ["request done", "unloaded"]
        assert cache.get("a").state is ModelState.UNLOADED and cache.get("a").handle is None
        with pytest.raises(ModelNotReady, match="unloaded"):
            async with cache.acquire("a"):
                pass

    run(main())


def test_unknown_model():
    async def main():
        cache = ModelCache(Loader().load, Loader().unload)
        with pytest.raises(ModelNotFound):
            await cache.load("nope")
        with pytest.raises(ModelNotFound):
            async with cache.acquire("nope"):
                pass

    run(main())


def test_acquire_tracks_use():
    async def main():
        cache = ModelCache(Loader().load, Loader().unload)
        cache.register("a", "good")
        await cache.load("a")
        loaded_at = cache.get("a").last_used
        async with cache.acquire("a"):
            assert cache.get("a").inflight == 1
        assert cache.get("a").inflight == 0 and cache.get("a").last_used > loaded_at
        assert cache.get("a").requests == 1 and cache.stats.hits == 1

    run(main())


def test_hit_holds_a_resident_model_without_a_lease_and_release_lets_an_unload_finish():
    async def main():
        loader = Loader()
        cache = ModelCache(loader.load, loader.unload)
        cache.register("a", "spec-a")
        assert cache.hit("a") is None and cache.hit("nope") is None  # not resident: the caller acquires
        assert cache.stats.hits == 0 and cache.get("a").inflight == 0
        await cache.load("a")
        entry = cache.hit("a")
        assert entry is not None and entry.handle == "handle:spec-a"
        assert (cache.stats.hits, entry.hits, entry.inflight, entry.requests) == (1, 1, 1, 1)
        unloading = asyncio.ensure_future(cache.unload("a"))
        await asyncio.sleep(0.02)
        assert not unloading.done() and loader.unloads == []  # held: the unload waits for it
        cache.release(entry, failed=True)
        await asyncio.wait_for(unloading, 1)
        assert loader.unloads == ["handle:spec-a"]
        assert (entry.inflight, entry.failed_requests) == (0, 1)

    run(main())
