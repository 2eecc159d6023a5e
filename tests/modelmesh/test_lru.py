"""Byte-weighted LRU placement: lazy loads, eviction, pinning, churn guard, failures."""

import asyncio

import pytest
from meshserve.modelmesh import ModelCache, ModelState, PlacementPolicy
from meshserve.protocol.errors import CapacityExhausted, ModelLoadError, ModelNotReady


class Models:
    """Stand-in models: a spec is (name, size); tracks the bytes really held."""

    def __init__(self, delay: float = 0.0, actual: dict | None = None) -> None:
        self.delay = delay
        self.actual = actual or {}
        self.loads: list[str] = []
        self.held = 0
        self.peak = 0
        self.fail: set[str] = set()
        self.hang: set[str] = set()

    async def load(self, spec):
        name, size = spec
        self.loads.append(name)
        if name in self.hang:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.delay)
        if name in self.fail:
            raise RuntimeError(f"{name} is broken")
        real = self.actual.get(name, size)
        self.held += real
        self.peak = max(self.peak, self.held)
        return (name, real), real

    async def unload(self, handle):
        self.held -= handle[1]


def cache_of(models: Models, capacity: int, churn: float = 0.0, **kw) -> ModelCache:
    return ModelCache(
        models.load,
        models.unload,
        capacity_bytes=capacity,
        size_fn=lambda spec: spec[1],
        policy=PlacementPolicy(min_churn_age=churn),
        **kw,
    )


async def use(cache, key):
    async with cache.acquire(key) as handle:
        return handle


def test_lazy_load_then_lru_eviction_only_as_needed():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=100)
        for k in "abcd":
            cache.register(k, (k, 30))
        assert cache.get("a").state is ModelState.REGISTERED and m.loads == []
        await use(cache, "a")
        await use(cache, "b")
        await use(cache, "c")
        await use(cache, "a")  # a is now more recent than b
        assert cache.stats.misses == 3 and cache.stats.hits == 1 and cache.used_bytes == 90
        await use(cache, "d")  # needs 30, 10 free: evict exactly one, the LRU (b)
        assert cache.get("b").state is ModelState.EVICTED and cache.stats.evictions == 1
        assert {k for k in "abcd" if cache.get(k).state is ModelState.READY} == {"a", "c", "d"}
        assert cache.used_bytes == 90 and m.held == 90
        await use(cache, "b")  # an evicted model loads again on its next request
        assert cache.get("b").state is ModelState.READY and m.loads.count("b") == 2

    asyncio.run(main())


def test_concurrent_misses_wait_for_one_load():
    async def main():
        m = Models(delay=0.05)
        cache = cache_of(m, capacity=100)
        cache.register("a", ("a", 10))
        await asyncio.gather(*(use(cache, "a") for _ in range(20)))
        assert m.loads == ["a"] and cache.stats.misses == 20

    asyncio.run(main())


def test_a_model_serving_a_request_is_never_evicted():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=60)
        for k in "abc":
            cache.register(k, (k, 30))
        await use(cache, "a")
        await use(cache, "b")
        async with cache.acquire("a"):  # a is the LRU but busy
            await use(cache, "c")
            assert cache.get("a").state is ModelState.READY
            assert cache.get("b").state is ModelState.EVICTED

    asyncio.run(main())


def test_pinned_models_stay():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=60)
        cache.register("p", ("p", 30), pinned=True)
        cache.register("x", ("x", 30))
        cache.register("y", ("y", 30))
        await cache.load("p")
        await use(cache, "x")
        await use(cache, "y")
        assert cache.get("p").state is ModelState.READY and cache.get("x").state is ModelState.EVICTED

    asyncio.run(main())


def test_churn_guard_refuses_instead_of_evicting_hot_models():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=60, churn=60.0, capacity_wait=0.05)
        for k in "abc":
            cache.register(k, (k, 30))
        await use(cache, "a")
        await use(cache, "b")
        with pytest.raises(CapacityExhausted, match="capacity exhausted"):
            await use(cache, "c")
        assert cache.get("c").state is ModelState.REGISTERED
        assert cache.get("a").state is ModelState.READY and cache.get("b").state is ModelState.READY
        assert cache.used_bytes == 60
        cache.policy.min_churn_age = 0
        await use(cache, "c")
        assert cache.get("c").state is ModelState.READY

    asyncio.run(main())


def test_a_model_bigger_than_the_capacity_fails_clearly():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=50)
        cache.register("big", ("big", 51))
        cache.register("ok", ("ok", 20))
        await use(cache, "ok")
        with pytest.raises(CapacityExhausted, match="more than the whole capacity"):
            await use(cache, "big")
        assert cache.get("big").state is ModelState.FAILED and m.loads == ["ok"]
        with pytest.raises(ModelNotReady):
            await use(cache, "big")
        assert cache.get("ok").state is ModelState.READY and cache.used_bytes == 20

    asyncio.run(main())


def test_failed_loads_retry_with_backoff():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=100, retry_backoff=(0.1, 1.0))
        cache.register("f", ("f", 10))
        m.fail.add("f")
        with pytest.raises(ModelLoadError, match="f is broken"):
            await use(cache, "f")
        for _ in range(5):  # within the backoff: a clear error, no new load
            with pytest.raises(ModelNotReady, match="next retry in"):
                await use(cache, "f")
        assert m.loads == ["f"] and cache.used_bytes == 0
        await asyncio.sleep(0.12)
        with pytest.raises(ModelLoadError):
            await use(cache, "f")
        assert m.loads == ["f", "f"] and cache.get("f").failures == 2
        assert cache.get("f").retry_at - asyncio.get_running_loop().time() > 0.1  # backoff doubled
        m.fail.clear()
        await asyncio.sleep(0.25)
        await use(cache, "f")
        assert cache.get("f").state is ModelState.READY and cache.get("f").failures == 0

    asyncio.run(main())


def test_a_hanging_load_times_out_and_frees_its_reservation():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=100, load_timeout=0.05)
        cache.register("h", ("h", 40))
        cache.register("ok", ("ok", 40))
        m.hang.add("h")
        await use(cache, "ok")
        with pytest.raises(ModelLoadError, match="timed out"):
            await use(cache, "h")
        assert cache.get("h").state is ModelState.FAILED and cache.used_bytes == 40
        assert (await use(cache, "ok")) == ("ok", 40)

    asyncio.run(main())


def test_a_load_bigger_than_predicted_trims_back_under_capacity():
    async def main():
        m = Models(actual={"liar": 70})
        cache = cache_of(m, capacity=100)
        for k, size in (("a", 30), ("b", 30), ("liar", 10)):
            cache.register(k, (k, size))
        await use(cache, "a")
        await use(cache, "b")
        await use(cache, "liar")  # predicted 10 (fits), measured 70: evict a (only as much as needed)
        assert cache.used_bytes == 100 == m.held
        assert cache.get("a").state is ModelState.EVICTED and cache.get("b").state is ModelState.READY
        assert cache.get("liar").last_size == 70  # the next prediction uses what was measured

    asyncio.run(main())


def test_concurrent_cold_requests_never_exceed_capacity():
    async def main():
        m = Models(delay=0.01)
        cache = cache_of(m, capacity=100)
        keys = [f"m{i}" for i in range(30)]
        for k in keys:
            cache.register(k, (k, 25))

        async def one(i):
            async with cache.acquire(keys[(i * 7) % 30]):
                await asyncio.sleep(0.001)

        await asyncio.gather(*(one(i) for i in range(300)))
        assert m.peak <= 100 and cache.used_bytes == m.held <= 100
        assert cache.stats.evictions > 0 and cache.resident <= 4

    asyncio.run(main())


def test_a_cold_request_waits_for_a_busy_model_then_gives_up():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=30, capacity_wait=0.1)
        cache.register("a", ("a", 30))
        cache.register("b", ("b", 30))
        async with cache.acquire("a"):
            with pytest.raises(CapacityExhausted, match="in use"):
                await use(cache, "b")
        assert cache.get("b").state is ModelState.REGISTERED

        async def hold_a_briefly():
            async with cache.acquire("a"):
                await asyncio.sleep(0.03)

        holder = asyncio.ensure_future(hold_a_briefly())
        await asyncio.sleep(0.005)
        assert (await use(cache, "b")) == ("b", 30)  # waited for a's request to end
        await holder

    asyncio.run(main())


def test_unload_mid_request_lets_it_finish():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=100)
        cache.register("a", ("a", 10))
        await use(cache, "a")
        events = []

        async def request():
            async with cache.acquire("a") as handle:
                await asyncio.sleep(0.05)
                events.append(("done", handle))

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        await cache.unload("a")
        events.append("unloaded")
        await task
        assert events == [("done", ("a", 10)), "unloaded"]
        assert cache.get("a").state is ModelState.UNLOADED and cache.used_bytes == 0
        with pytest.raises(ModelNotReady, match="unloaded"):
            await use(cache, "a")

    asyncio.run(main())


def test_a_cancelled_request_does_not_cancel_the_load_others_wait_for():
    async def main():
        m = Models(delay=0.05)
        cache = cache_of(m, capacity=100)
        cache.register("a", ("a", 10))
        first = asyncio.ensure_future(use(cache, "a"))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(use(cache, "a"))
        await asyncio.sleep(0.005)
        first.cancel()
        assert (await second) == ("a", 10)
        assert m.loads == ["a"] and cache.get("a").state is ModelState.READY

    asyncio.run(main())


def test_an_extra_copy_only_displaces_other_extra_copies():
    """A copy (``extra``: the model is held elsewhere too) is evicted before single copies,
    and loading one never evicts a single copy, neither on its prediction nor once measured
    bigger than predicted; a single copy displaces a copy first, even a fresher one."""

    async def main():
        models = Models(actual={"copy_big": 40})
        cache = cache_of(models, 100)
        for name, size in [("single", 50), ("copy", 30), ("copy_big", 10)]:
            cache.register(name, (name, size))
        await cache.load("single")
        cache.get("copy").extra = True
        with pytest.raises(CapacityExhausted):
            cache._reserve(cache.get("copy"), 60)  # would need the single copy's room
        await cache.load("copy")
        cache.get("copy_big").extra = True
        await cache.load("copy_big")  # predicted 10, measured 40: only the other copy may go
        assert cache.get("single").state is ModelState.READY
        assert cache.get("copy").state is ModelState.EVICTED
        await cache.drop("copy_big")
        assert cache.get("copy_big").state is ModelState.EVICTED and models.held == 50
        # A single copy's load evicts the freshest copy before an older single one.
        cache.register("other", ("other", 50))
        await cache.load("copy")
        async with cache.acquire("copy"):
            pass
        await cache.load("other")
        assert cache.get("copy").state is ModelState.EVICTED
        assert cache.get("single").state is ModelState.READY

    asyncio.run(main())
