"""The fleet's decisions, built alone: one pod ("a") of a fleet whose other pods exist as
records in the in-process store, a stand-in transport, stand-in models. Routing (holder,
ModelMesh's order, retries, failures, the fleet-wide wait for room), copies (by age, by
rate, extra copies evicted first) and hand-off (hot models first)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from meshserve.modelmesh import ModelState
from meshserve.modelmesh.fleet import (
    ROUTE,
    Copies,
    CopyGone,
    DeadlineExceeded,
    FleetConfig,
    Lifecycle,
    Membership,
    Router,
    Unreachable,
)
from meshserve.modelmesh.store import InProcessStore, PodRecord
from meshserve.protocol.errors import CapacityExhausted, ModelLoadError, ModelNotFound

from tests.modelmesh.test_lru import Models, cache_of

SIZE = 30  # every stand-in model's bytes


class FakeTransport:
    """Records each call; ``fail[pod]`` lists what that pod answers next (an error to raise)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (pod, why)
        self.loads: list[tuple[str, str]] = []  # (pod, model)
        self.fail: dict[str, list[BaseException]] = {}
        self.forgotten: list[str] = []

    def _answer(self, pod: PodRecord) -> None:
        errors = self.fail.get(pod.id)
        if errors:
            raise errors.pop(0)

    async def infer(self, pod: PodRecord, request: Any, timeout: float, why: str) -> str:
        self.calls.append((pod.id, why))
        self._answer(pod)
        return f"{pod.id}:{request}"

    async def stream(self, pod: PodRecord, request: Any, timeout: float, why: str):
        self.calls.append((pod.id, why))
        self._answer(pod)

        async def answers():
            for i in range(3):
                yield f"{pod.id}:{request}:{i}"

        return answers()

    async def relay(self, pod: PodRecord, request: Any, timeout: float, why: str) -> str:
        return await self.infer(pod, request, timeout, why)

    async def load(self, pod: PodRecord, key: str, timeout: float) -> None:
        self.loads.append((pod.id, key))
        self._answer(pod)

    def forget(self, pod_id: str) -> None:
        self.forgotten.append(pod_id)

    async def close(self) -> None:
        pass


class Pod:
    """Pod "a" of a fleet: its cache, the mesh's objects, the store they share."""

    def __init__(self, capacity: int = 1000, **config: Any) -> None:
        # No periodic ticks: the tests tick themselves.
        self.config = FleetConfig(lease_seconds=30.0, tick_seconds=3600.0, **config)
        self.models = Models()
        self.cache = cache_of(self.models, capacity)
        self.store = InProcessStore()
        self.transport = FakeTransport()
        self.members = Membership(
            self.store.view, PodRecord("a", capacity=capacity), self.config.suspect_seconds, self.transport.forget
        )
        self.router = Router(self.cache, self.store, self.members, self.config)
        self.copies = Copies(self.cache, self.store, self.members, self.transport, self.config)
        self.registered: list[str] = []
        self.lifecycle = Lifecycle(
            self.cache, self.store, self.members, self.copies, self.config,
            describe=lambda e: {"name": e.key}, register=lambda key, doc: self.registered.append(key),
        )  # fmt: skip

    async def __aenter__(self) -> Pod:
        await self.lifecycle.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.lifecycle.close()
        await self.cache.close()

    def register(self, *keys: str) -> None:
        for key in keys:
            self.cache.register(key, (key, SIZE))

    def peer(self, pod_id: str, capacity: int = 1000, **record: Any) -> None:
        """Another pod's record, as the store's watch would bring it."""
        self.store.view.apply(f"pods/{pod_id}", PodRecord(pod_id, capacity=capacity, **record).dumps(), 0)

    def holds(self, pod_id: str, key: str, revision: int = 1) -> None:
        self.store.view.apply(f"holders/{key}/{pod_id}", b"{}", revision)

    async def serve(self, key: str, request: str = "x", timeout: float | None = None) -> str:
        async def local() -> str:
            async with self.cache.acquire(key):
                return f"a:{request}"

        def forward(pod: PodRecord, t: float, why: str):
            return self.transport.infer(pod, request, t, why)

        return await self.router.serve(key, local, forward, timeout)


def run(coro_fn) -> Any:
    return asyncio.run(coro_fn())


# -- routing ---------------------------------------------------------------------------
def test_a_model_ready_here_is_served_here_and_one_held_elsewhere_goes_to_its_holder():
    async def main():
        async with Pod() as a:
            a.register("here", "there")
            a.peer("b")
            a.holds("b", "there")
            async with a.cache.acquire("here"):
                pass
            assert await a.serve("here") == "a:x" and ROUTE.get() == "local"
            assert await a.serve("there") == "b:x" and ROUTE.get() == "forwarded"
            assert a.transport.calls == [("b", "forwarded")]
            assert a.router.counts == {"local": 1, "forwarded": 1, "miss": 0, "retried": 0}
            assert a.cache.get("there").state is ModelState.REGISTERED  # no copy loaded here
            with pytest.raises(ModelNotFound):
                await a.serve("unknown")

    run(main)


def test_a_holder_shutting_down_is_passed_over_for_one_that_is_not():
    async def main():
        async with Pod() as a:
            a.register("m")
            a.peer("b", shutting_down=True)
            a.peer("c")
            a.holds("b", "m")
            a.holds("c", "m")
            for _ in range(10):
                assert await a.serve("m") == "c:x"

    run(main)


def test_a_model_held_nowhere_is_placed_in_modelmeshs_order():
    async def main():
        async with Pod(capacity=40) as a:  # a: room, but full once the model is in
            a.register("m")
            a.members.pod.used = 35
            await a.store.publish_pod(a.members.pod)  # a: no room for 30 bytes
            a.peer("b", models=3)  # room, but more models than c
            a.peer("c", models=1)
            a.peer("d", models=0, shutting_down=True)  # never chosen
            assert await a.serve("m") == "c:x" and ROUTE.get() == "miss"
            assert a.transport.calls == [("c", "miss")]
            assert a.store.view.claims["m"].pod == "c"
            # The placed pod is counted at once (its record lags): the next model goes elsewhere.
            assert a.store.view.pods["c"].models == 2 and a.store.view.pods["c"].used == SIZE

    run(main)


def test_this_pod_placed_first_loads_the_model_itself():
    async def main():
        async with Pod() as a:
            a.register("m")
            a.peer("b", models=5)
            assert await a.serve("m") == "a:x" and ROUTE.get() == "miss"
            assert a.cache.get("m").state is ModelState.READY and a.transport.calls == []
            await a.lifecycle.flush()
            assert "a" in a.store.view.holders_of("m") and "m" not in a.store.view.claims  # the copy ends the claim

    run(main)


def test_an_unreachable_holder_is_suspected_and_the_request_loads_elsewhere():
    async def main():
        async with Pod(capacity=10) as a:  # a cannot hold the model: c is the next choice
            a.register("m")
            a.peer("b")
            a.peer("c")
            a.holds("b", "m")
            a.transport.fail["b"] = [ConnectionRefusedError("refused")]  # an OSError, as a REST relay raises
            assert await a.serve("m") == "c:x"
            assert a.transport.calls == [("b", "forwarded"), ("c", "miss")]
            assert not a.members.alive("b") and a.transport.forgotten == ["b"]
            assert a.router.counts["retried"] == 1
            # Skipped by the next request too, until its lease would have lapsed.
            a.transport.calls.clear()
            assert await a.serve("m") == "c:x"
            assert a.transport.calls == [("c", "miss")]

    run(main)


def test_a_suspect_is_trusted_again_once_its_time_is_up():
    async def main():
        async with Pod() as a:
            a.peer("b")
            members = Membership(a.store.view, a.members.pod, 0.1, a.transport.forget)
            members.suspect("b")
            assert not members.alive("b") and members.live_pods() == [a.store.view.pods["a"]]
            await asyncio.sleep(0.15)
            assert members.alive("b")

    run(main)


def test_a_copy_gone_is_passed_over_as_a_holder_but_may_load_the_model_again():
    async def main():
        async with Pod(capacity=10) as a:
            a.register("m")
            a.peer("b")
            a.peer("c", models=4)  # b ranks first for the load
            a.holds("b", "m")
            a.transport.fail["b"] = [CopyGone("evicted just now")]
            assert await a.serve("m") == "b:x"
            assert a.transport.calls == [("b", "forwarded"), ("b", "miss")]
            assert a.members.alive("b")  # it answered: not a suspect

    run(main)


def test_a_pod_without_room_is_left_for_the_next_and_its_claim_released():
    async def main():
        async with Pod(capacity=10) as a:
            a.register("m")
            a.peer("b", models=0)
            a.peer("c", models=1)
            a.transport.fail["b"] = [CapacityExhausted("full of young models", retry_after=30.0)]
            assert await a.serve("m") == "c:x"
            assert a.transport.calls == [("b", "miss"), ("c", "miss")]
            assert a.store.view.claims["m"].pod == "c"

    run(main)


def test_a_failed_load_is_recorded_and_that_pod_not_chosen_again_for_a_while():
    async def main():
        async with Pod(capacity=10, load_retry_max_seconds=60.0) as a:
            a.register("m")
            a.peer("b", models=0)
            a.peer("c", models=1)
            a.transport.fail["b"] = [ModelLoadError("loading model 'm' failed: bad file")]
            assert await a.serve("m") == "c:x"
            assert a.store.view.failures["m"]["b"]["reason"] == "loading model 'm' failed: bad file"
            a.store.view.claims.clear()
            a.transport.calls.clear()
            assert await a.serve("m") == "c:x"
            assert a.transport.calls == [("c", "miss")]  # b still ranks first, but failed lately

    run(main)


def test_a_load_that_fails_here_is_recorded_for_this_pod_and_placed_elsewhere():
    async def main():
        async with Pod() as a:
            a.register("m")
            a.peer("b", models=1)
            a.models.fail.add("m")
            assert await a.serve("m") == "b:x"
            assert "broken" in a.store.view.failures["m"]["a"]["reason"]
            assert a.transport.calls == [("b", "miss")]

    run(main)


def test_a_pod_past_its_deadline_is_not_retried():
    async def main():
        async with Pod(capacity=10) as a:
            a.register("m")
            a.peer("b")
            a.peer("c")
            a.holds("b", "m")
            a.transport.fail["b"] = [DeadlineExceeded("the pod did not answer within the deadline")]
            with pytest.raises(DeadlineExceeded):
                await a.serve("m")
            assert a.transport.calls == [("b", "forwarded")]

    run(main)


def test_every_pod_refusing_for_room_waits_for_the_first_to_expect_some():
    async def main():
        async with Pod(capacity=10, capacity_wait_seconds=5.0) as a:
            a.register("m")
            a.peer("b", models=0)
            a.peer("c", models=1)
            await a.store.record_failure("m", "a", "no room here either")  # a: not a candidate
            a.transport.fail["b"] = [CapacityExhausted("full", retry_after=3.0)]
            a.transport.fail["c"] = [CapacityExhausted("full", retry_after=0.3)]
            t0 = time.monotonic()
            assert await a.serve("m") == "c:x"
            took = time.monotonic() - t0
            assert 0.25 <= took < 1.5, took  # c's room came first: waited for it, not for b's
            assert a.transport.calls == [("b", "miss"), ("c", "miss"), ("c", "miss")]

    run(main)


def test_past_the_fleet_wide_bound_every_refusal_is_503_with_the_soonest_retry_after():
    async def main():
        async with Pod(capacity=10, capacity_wait_seconds=0.5) as a:
            a.register("m")
            a.peer("b")
            a.peer("c")
            await a.store.record_failure("m", "a", "no room here either")
            a.transport.fail["b"] = [CapacityExhausted("full", retry_after=8.0)]
            a.transport.fail["c"] = [CapacityExhausted("full", retry_after=6.0)]
            t0 = time.monotonic()
            with pytest.raises(CapacityExhausted) as e:
                await a.serve("m")
            assert time.monotonic() - t0 < 0.4  # the first room is past the bound: no wait at all
            assert 5.0 <= e.value.retry_after <= 6.0
            assert "no pod has room for model 'm' now (2 refused)" in e.value.message

    run(main)


def test_a_stream_is_relayed_from_the_pod_whose_first_answer_came_in():
    async def main():
        async with Pod(capacity=10) as a:
            a.register("m")
            a.peer("b")
            a.peer("c")
            a.holds("b", "m")
            a.transport.fail["b"] = [TimeoutError()]  # no first answer in time: unreachable

            async def here() -> None:
                return None

            answers = await a.router.serve("m", here, lambda pod, t, why: a.transport.stream(pod, "s", t, why), None)
            assert [x async for x in answers] == ["c:s:0", "c:s:1", "c:s:2"]
            assert a.transport.calls == [("b", "forwarded"), ("c", "miss")] and not a.members.alive("b")

    run(main)


# -- copies ----------------------------------------------------------------------------
def test_a_model_used_again_long_after_its_load_gets_a_second_copy_on_the_best_pod():
    async def main():
        async with Pod(second_copy_after_seconds=60.0, copy_rate_per_minute=1e9) as a:
            a.register("m", "young")
            a.peer("b", capacity=100, used=90)  # no room
            a.peer("c")
            for key in ("m", "young"):
                async with a.cache.acquire(key):
                    pass
            a.cache.get("m").loaded_at = time.time() - 120  # loaded two minutes ago
            assert await a.copies.tick() == []  # the first tick counts requests from here
            for key in ("m", "young"):
                async with a.cache.acquire(key):
                    pass
            started = await a.copies.tick()
            assert await asyncio.gather(*started) == [True]
            assert a.transport.loads == [("c", "m")]  # young: used again, but not old enough
            a.holds("c", "m")
            async with a.cache.acquire("m"):
                pass
            assert await a.copies.tick() == []  # tried lately (and two copies now)

    run(main)


def test_a_busy_model_gets_more_copies_up_to_max_copies():
    async def main():
        async with Pod(copy_rate_per_minute=1.0, max_copies=3) as a:
            a.register("m")
            a.peer("b")
            a.peer("c")
            a.holds("b", "m")
            async with a.cache.acquire("m"):
                pass
            await a.copies.tick()
            for _ in range(5):
                async with a.cache.acquire("m"):
                    pass
            await asyncio.gather(*await a.copies.tick())
            assert a.transport.loads == [("c", "m")]  # the one pod without a copy
            assert a.members.pod.rate > 1.0 and a.store.view.pods["a"].rate == a.members.pod.rate
            # Three copies: no more, however busy.
            a.holds("c", "m")
            a.copies._tried.clear()
            for _ in range(5):
                async with a.cache.acquire("m"):
                    pass
            assert await a.copies.tick() == []

    run(main)


def test_a_copy_that_cannot_be_loaded_tries_the_next_pod_and_suspects_the_silent_one():
    async def main():
        async with Pod() as a:
            a.register("m")
            a.peer("b", models=0)
            a.peer("c", models=1)
            a.transport.fail["b"] = [Unreachable("UNAVAILABLE: connection refused")]
            assert await a.copies.add("m", why="test")
            assert a.transport.loads == [("b", "m"), ("c", "m")] and not a.members.alive("b")

    run(main)


def test_an_extra_copy_is_evicted_before_an_older_single_copy():
    async def main():
        async with Pod(capacity=60) as a:
            a.register("single", "extra", "new")
            a.holds("b", "extra", revision=1)  # b's copy came first ...
            a.holds("a", "extra", revision=2)  # ... so the one this pod loads is an extra copy
            for key in ("single", "extra"):
                async with a.cache.acquire(key):
                    pass
            assert a.cache.get("extra").extra and not a.cache.get("single").extra
            async with a.cache.acquire("new"):
                pass
            assert a.cache.get("extra").state is ModelState.EVICTED
            assert a.cache.get("single").state is ModelState.READY  # older, but the only copy

    run(main)


# -- hand-off ---------------------------------------------------------------------------
def test_leaving_hands_off_the_models_held_only_here_hottest_first():
    async def main():
        async with Pod() as a:
            a.register("cold", "hot", "shared", "warm")
            a.peer("b", capacity=100, used=95)  # no room: the copies go to c
            a.peer("c")
            for key in ("cold", "shared", "warm", "hot"):
                async with a.cache.acquire(key):
                    pass
                await asyncio.sleep(0.01)
            a.holds("b", "shared")
            assert [e.key for e in a.lifecycle.handoff_order()] == ["hot", "warm", "shared", "cold"]
            await a.lifecycle.flush()
            await a.lifecycle.leave()
            assert a.transport.loads == [("c", "hot"), ("c", "warm"), ("c", "cold")]  # shared: b has it
            assert a.members.left and a.store.view.pods["a"].shutting_down
            assert all("a" not in a.store.view.holders_of(k) for k in ("cold", "hot", "shared", "warm"))
            # Gone from the fleet's view: requests for its models go to the other copies.
            a.holds("c", "hot")
            assert not a.router.serves_here(a.cache.get("hot"))
            assert await a.serve("hot") == "c:x"

    run(main)


def test_registrations_made_on_other_pods_are_registered_here():
    async def main():
        a = Pod()
        a.register("mine")
        async with a:
            assert a.store.view.models == {"mine": {"name": "mine"}}  # published at the join
            await a.store.register({"theirs": {"name": "theirs"}})
            assert a.registered == ["theirs"]

    run(main)


def test_modelmesh_imports_no_server_wire_format_or_grpc():
    """The mesh knows neither storage, frameworks nor wire formats: only errors come from protocol/."""
    import ast
    from pathlib import Path

    import meshserve.modelmesh

    root = Path(meshserve.modelmesh.__file__).parent
    seen = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                seen.update((path.name, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                seen.add((path.name, node.module))
    banned = [
        (f, m) for f, m in seen
        if m.startswith(("meshserve.server", "meshserve.loaders", "meshserve.adapters", "grpc"))
        or (m.startswith("meshserve.protocol") and m != "meshserve.protocol.errors")
    ]  # fmt: skip
    assert banned == []
    assert ("routing.py", "meshserve.protocol.errors") in seen  # the check sees the fleet's modules
