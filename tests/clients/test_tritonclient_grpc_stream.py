"""ModelStreamInfer through tritonclient.grpc's start_stream/async_stream_infer, and
the asyncio client (tritonclient.grpc.aio), including its stream_infer."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tests.clients.cases import as_bytes_list, distinct_payload

WAIT = 60


def make_input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def echo_inputs(i: int) -> list[grpcclient.InferInput]:
    ints, tag = distinct_payload(i)
    return [make_input("ints", ints, "INT32"), make_input("tag", tag, "BYTES")]


def check_echo(result, i: int) -> None:
    ints, tag = distinct_payload(i)
    assert result.get_response().id == f"r{i}"
    assert result.get_response().model_name == "echo"
    np.testing.assert_array_equal(result.as_numpy("ints"), ints)
    assert as_bytes_list(result.as_numpy("tag")) == as_bytes_list(tag)


def bad_typed_inputs() -> list[grpcclient.InferInput]:
    """FP64 where typed declares FP32: INVALID_ARGUMENT."""
    x = np.zeros((1, 3))
    return [make_input("INPUT0", x, "FP64"), make_input("INPUT1", x, "FP64")]


class Collector:
    """The stream callback: keeps (result, error) pairs in arrival order."""

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self._cond = threading.Condition()

    def __call__(self, result, error) -> None:
        with self._cond:
            self.items.append((result, error))
            self._cond.notify_all()

    def wait_for(self, n: int) -> list[tuple]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= n, WAIT), f"{len(self.items)} of {n} answers"
            return list(self.items)


@pytest.fixture
def stream(server):
    """A client with a started stream; yields (client, collector)."""
    client = grpcclient.InferenceServerClient(server.grpc_address)
    collector = Collector()
    client.start_stream(callback=collector)
    yield client, collector
    client.stop_stream(cancel_requests=True)
    client.close()


def test_stream_50_requests_with_an_error_in_the_middle(stream):
    client, collector = stream
    bad = 25
    for i in range(50):
        if i == bad:
            client.async_stream_infer("typed", bad_typed_inputs(), request_id=f"r{i}")
        else:
            client.async_stream_infer("echo", echo_inputs(i), request_id=f"r{i}")
    items = collector.wait_for(50)
    assert len(items) == 50
    errors = [(k, e) for k, (_, e) in enumerate(items) if e is not None]
    assert len(errors) == 1, [str(e) for _, e in errors]
    assert "FP32" in errors[0][1].message()
    answers = {r.get_response().id: r for r, e in items if e is None}
    assert sorted(answers) == sorted(f"r{i}" for i in range(50) if i != bad)
    for i in range(50):
        if i != bad:
            check_echo(answers[f"r{i}"], i)


def test_stream_500_requests_past_the_server_window(stream):
    """Far more requests than the server keeps in flight per stream, errors sprinkled in."""
    client, collector = stream
    n = 500
    for i in range(n):
        if i % 50 == 49:
            client.async_stream_infer("raises", echo_inputs(i), request_id=f"r{i}")
        else:
            client.async_stream_infer("echo", echo_inputs(i), request_id=f"r{i}")
    items = collector.wait_for(n)
    assert len(items) == n
    assert sum(e is not None for _, e in items) == n // 50
    answers = {r.get_response().id: r for r, e in items if e is None}
    assert len(answers) == n - n // 50
    for i in range(n):
        if i % 50 != 49:
            check_echo(answers[f"r{i}"], i)


def test_stream_answers_keep_request_order(stream):
    client, collector = stream
    for i in range(50):
        client.async_stream_infer("echo", echo_inputs(i), request_id=f"r{i}")
    items = collector.wait_for(50)
    assert [r.get_response().id for r, _ in items] == [f"r{i}" for i in range(50)]


@pytest.mark.parametrize(
    "model,inputs,words",
    [
        ("raises", lambda: echo_inputs(0), "this model always fails"),
        ("no-such-model", lambda: echo_inputs(0), "no-such-model"),
        ("typed", bad_typed_inputs, "FP32"),
    ],
    ids=["model-raises", "unknown-model", "invalid-input"],
)
def test_stream_goes_on_after_an_error(stream, model, inputs, words):
    client, collector = stream
    client.async_stream_infer("echo", echo_inputs(0), request_id="r0")
    client.async_stream_infer(model, inputs(), request_id="bad")
    items = collector.wait_for(2)
    assert items[0][1] is None
    assert items[1][0] is None and words in items[1][1].message()
    # The error has been delivered; the same stream keeps serving.
    for i in range(1, 11):
        client.async_stream_infer("echo", echo_inputs(i), request_id=f"r{i}")
    items = collector.wait_for(12)
    for i, (result, error) in enumerate(items[2:], start=1):
        assert error is None, error
        check_echo(result, i)


def test_stream_mixes_models(stream):
    client, collector = stream
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = {}
    for i in range(40):
        rid = f"r{i}"
        kind = ("echo", "typed", "hooks", "iris")[i % 4]
        if kind == "echo":
            client.async_stream_infer("echo", echo_inputs(i), request_id=rid)
        elif kind == "typed":
            ins = [make_input("INPUT0", x + i, "FP32"), make_input("INPUT1", x, "FP32")]
            client.async_stream_infer("typed", ins, model_version="1", request_id=rid, parameters={"k": i})
        elif kind == "hooks":
            client.async_stream_infer("hooks", [make_input("v", x + i, "FP32")], request_id=rid)
        else:
            iris_x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
            client.async_stream_infer("iris", [make_input("input0", iris_x, "FP32")], request_id=rid)
        expected[rid] = (kind, i)
    items = collector.wait_for(40)
    for result, error in items:
        assert error is None, error
        kind, i = expected[result.get_response().id]
        if kind == "echo":
            check_echo(result, i)
        elif kind == "typed":
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + i + x)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.full_like(x, i))
        elif kind == "hooks":
            np.testing.assert_allclose(result.as_numpy("scaled"), (x + i).astype(np.float64) * 2.5)
        else:
            np.testing.assert_array_equal(result.as_numpy("predict"), [0, 2])


def test_stop_stream_waits_for_pending_answers(server):
    client = grpcclient.InferenceServerClient(server.grpc_address)
    collector = Collector()
    try:
        client.start_stream(callback=collector)
        for i in range(50):
            client.async_stream_infer("echo", echo_inputs(i), request_id=f"r{i}")
        client.stop_stream(cancel_requests=False)
        assert len(collector.items) == 50
        for i, (result, error) in enumerate(collector.items):
            assert error is None, error
            check_echo(result, i)
    finally:
        client.close()


# -- tritonclient.grpc.aio --------------------------------------------------------------------


def test_aio_client(server):
    async def main() -> None:
        client = grpcaio.InferenceServerClient(server.grpc_address)
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("typed", "1")
            assert "model_repository" in (await client.get_server_metadata()).extensions
            assert list((await client.get_model_metadata("typed")).versions) == ["1"]
            index = await client.get_model_repository_index(as_json=True)
            assert {"echo", "iris", "typed"} <= {m["name"] for m in index["models"]}

            check_echo(await client.infer("echo", echo_inputs(3), request_id="r3"), 3)
            with pytest.raises(InferenceServerException) as info:
                await client.infer("typed", bad_typed_inputs())
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            with pytest.raises(InferenceServerException) as info:
                await client.infer("raises", echo_inputs(0))
            assert info.value.status() == "StatusCode.INTERNAL"

            results = await asyncio.gather(
                *(client.infer("echo", echo_inputs(i), request_id=f"r{i}") for i in range(200))
            )
            for i, result in enumerate(results):
                check_echo(result, i)
        finally:
            await client.close()

    asyncio.run(main())


def test_aio_stream_infer(server):
    bad = 7

    async def requests():
        for i in range(20):
            if i == bad:
                yield {"model_name": "raises", "inputs": echo_inputs(i), "request_id": f"r{i}"}
            else:
                yield {"model_name": "echo", "inputs": echo_inputs(i), "request_id": f"r{i}"}

    async def main() -> list[tuple]:
        client = grpcaio.InferenceServerClient(server.grpc_address)
        try:
            return [pair async for pair in client.stream_infer(requests())]
        finally:
            await client.close()

    items = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert len(items) == 20
    errors = [e for _, e in items if e is not None]
    assert len(errors) == 1 and "this model always fails" in errors[0].message()
    answers = {r.get_response().id: r for r, e in items if e is None}
    for i in range(20):
        if i != bad:
            check_echo(answers[f"r{i}"], i)
