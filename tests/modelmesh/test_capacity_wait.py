"""Under churn a cold request waits for room (an event or the age-out timer), then loads."""

import asyncio
import time

import pytest
from meshserve.modelmesh import ModelState
from meshserve.protocol.errors import CapacityExhausted

from tests.modelmesh.test_lru import Models, cache_of, use


def test_a_young_victim_ages_out_and_the_waiter_loads():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=60, churn=0.2, capacity_wait=5.0)
        for k in "abc":
            cache.register(k, (k, 30))
        await use(cache, "a")
        await use(cache, "b")
        t0 = time.monotonic()
        assert (await use(cache, "c")) == ("c", 30)
        waited = time.monotonic() - t0
        assert 0.15 <= waited < 1.0  # woken by the age-out timer, not at the end of the bound
        assert cache.get("a").state is ModelState.EVICTED and cache.get("b").state is ModelState.READY
        assert cache.used_bytes == 60 == m.held

    asyncio.run(main())


def test_a_busy_victim_released_lets_the_waiter_load_at_once():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=30, capacity_wait=5.0)
        cache.register("a", ("a", 30))
        cache.register("b", ("b", 30))
        released = 0.0

        async def hold_a():
            nonlocal released
            async with cache.acquire("a"):
                await asyncio.sleep(0.1)
            released = time.monotonic()

        holder = asyncio.ensure_future(hold_a())
        await asyncio.sleep(0.01)
        assert (await use(cache, "b")) == ("b", 30)
        assert time.monotonic() - released < 0.05  # the release woke it
        await holder
        assert cache.get("a").state is ModelState.EVICTED and m.peak == 30

    asyncio.run(main())


def test_past_the_bound_it_is_refused_with_a_retry_after():
    async def main():
        m = Models()
        cache = cache_of(m, capacity=60, churn=30.0, capacity_wait=0.1)
        for k in "abc":
            cache.register(k, (k, 30))
        await use(cache, "a")
        await use(cache, "b")
        t0 = time.monotonic()
        with pytest.raises(CapacityExhausted, match="used too recently") as err:
            await use(cache, "c")
        assert 0.09 <= time.monotonic() - t0 < 1.0
        assert 25 < err.value.retry_after <= 30  # when the oldest blocker ages out
        assert cache.get("c").state is ModelState.REGISTERED and m.loads == ["a", "b"]
        assert cache.used_bytes == 60 and not cache._room_waiters

    asyncio.run(main())


def test_many_waiters_share_one_load_per_model_and_never_overfill():
    async def main():
        m = Models(delay=0.01)
        cache = cache_of(m, capacity=60, churn=0.1, capacity_wait=5.0)
        for k in "abcd":
            cache.register(k, (k, 30))
        await use(cache, "a")
        await use(cache, "b")
        results = await asyncio.gather(*(use(cache, "cd"[i % 2]) for i in range(40)))
        assert sorted(set(results)) == [("c", 30), ("d", 30)]
        assert m.loads.count("c") == 1 and m.loads.count("d") == 1
        assert m.peak <= 60 and cache.used_bytes == m.held <= 60

    asyncio.run(main())


def test_churn_under_concurrent_cold_requests_waits_instead_of_failing():
    async def main():
        m = Models(delay=0.002)
        cache = cache_of(m, capacity=100, churn=0.02, capacity_wait=5.0)
        keys = [f"m{i}" for i in range(12)]
        for k in keys:
            cache.register(k, (k, 25))

        async def one(i):
            async with cache.acquire(keys[(i * 5) % 12]):
                await asyncio.sleep(0.001)

        outcomes = await asyncio.gather(*(one(i) for i in range(120)), return_exceptions=True)
        assert [o for o in outcomes if o is not None] == []
        assert m.peak <= 100 and cache.used_bytes == m.held <= 100 and cache.stats.evictions > 0

    asyncio.run(main())
