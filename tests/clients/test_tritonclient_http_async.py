"""tritonclient.http's async paths: async_infer (gevent pool), many threads each
with its own client, and the asyncio client (tritonclient.http.aio).
Every concurrent request carries its own payload and must get its own answer."""

from __future__ import annotations

import asyncio
import gc
import threading

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tests.clients.cases import as_bytes_list, distinct_payload, http_address

N = 200


def request_for(i: int) -> tuple[list[httpclient.InferInput], list[httpclient.InferRequestedOutput]]:
    ints, tag = distinct_payload(i)
    a = httpclient.InferInput("ints", list(ints.shape), "INT32")
    a.set_data_from_numpy(ints, binary_data=i % 2 == 0)
    b = httpclient.InferInput("tag", list(tag.shape), "BYTES")
    b.set_data_from_numpy(tag, binary_data=i % 3 == 0)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=i % 5 < 2) for n in ("tag", "ints")]
    return [a, b], outputs


def check_answer(result, i: int) -> None:
    ints, tag = distinct_payload(i)
    assert result.get_response()["id"] == f"r{i}"
    np.testing.assert_array_equal(result.as_numpy("ints"), ints)
    assert as_bytes_list(result.as_numpy("tag")) == as_bytes_list(tag)


@pytest.fixture
def pooled_client(server):
    client = httpclient.InferenceServerClient(http_address(server), concurrency=32, network_timeout=60)
    yield client
    client.close()


def test_async_infer_one(pooled_client):
    inputs, outputs = request_for(1)
    pending = pooled_client.async_infer("echo", inputs, outputs=outputs, request_id="r1")
    check_answer(pending.get_result(timeout=30), 1)


def test_async_infer_error_is_raised_by_get_result(pooled_client):
    inputs, _ = request_for(0)
    pending = pooled_client.async_infer("typed", inputs)
    with pytest.raises(InferenceServerException) as info:
        pending.get_result(timeout=30)
    assert info.value.status() == "400"


def test_async_infer_200_concurrent(pooled_client):
    pending = []
    for i in range(N):
        inputs, outputs = request_for(i)
        pending.append(pooled_client.async_infer("echo", inputs, outputs=outputs, request_id=f"r{i}"))
    for i, p in enumerate(pending):
        check_answer(p.get_result(timeout=60), i)


def test_async_infer_mixed_models_and_errors(pooled_client):
    """Successes and failures interleaved on one pooled client keep to their own request."""
    pending = []
    for i in range(60):
        if i % 3 == 2:
            inputs, _ = request_for(i)
            pending.append(("raises", pooled_client.async_infer("raises", inputs, request_id=f"r{i}")))
        else:
            inputs, outputs = request_for(i)
            pending.append(("echo", pooled_client.async_infer("echo", inputs, outputs=outputs, request_id=f"r{i}")))
    for i, (model, p) in enumerate(pending):
        if model == "raises":
            with pytest.raises(InferenceServerException) as info:
                p.get_result(timeout=60)
            assert info.value.status() == "500"
        else:
            check_answer(p.get_result(timeout=60), i)


def test_200_concurrent_from_threads(server):
    """20 threads, each with its own client (tritonclient.http clients are not
    thread-safe), released together and sending 10 requests each."""
    threads_n = 20
    gc.collect()  # free earlier tests' clients here, in the thread that made them
    barrier = threading.Barrier(threads_n)
    collect = threading.Lock()
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def worker(first: int) -> None:
        client = httpclient.InferenceServerClient(http_address(server), network_timeout=60)
        try:
            barrier.wait(timeout=30)
            for i in range(first, N, threads_n):
                inputs, outputs = request_for(i)
                results[i] = client.infer("echo", inputs, outputs=outputs, request_id=f"r{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            client.close()
            # The client is freed in a cycle; its __del__ joins a gevent pool, which
            # only works from this thread: collect it here, not later in another thread.
            with collect:
                del client
                gc.collect()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == list(range(N))
    for i, result in results.items():
        check_answer(result, i)


# -- tritonclient.http.aio ----------------------------------------------------------


def test_aio_client(server):
    async def main() -> None:
        client = aiohttpclient.InferenceServerClient(http_address(server))
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("echo")
            meta = await client.get_server_metadata()
            assert "binary_tensor_data" in meta["extensions"]
            assert (await client.get_model_metadata("typed"))["versions"] == ["1"]

            inputs, outputs = request_for(5)
            check_answer(await client.infer("echo", inputs, outputs=outputs, request_id="r5"), 5)

            with pytest.raises(InferenceServerException) as info:
                await client.infer("no-such-model", inputs)
            assert info.value.status() == "404"

            requests = [request_for(i) for i in range(N)]
            results = await asyncio.gather(
                *(client.infer("echo", inp, outputs=out, request_id=f"r{i}") for i, (inp, out) in enumerate(requests))
            )
            for i, result in enumerate(results):
                check_answer(result, i)
        finally:
            await client.close()

    asyncio.run(main())
