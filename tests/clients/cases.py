"""Tensors for the wire tests: every datatype with its extreme values, odd shapes,
and checks that compare what came back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

INT_TYPES = {
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
}
FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


def _ints(dtype: type) -> np.ndarray:
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    return np.array([[lo, lo + 1, 0, 1], [hi, hi - 1, 7, lo // 2]], dtype=dtype)


def _floats(dtype: type) -> np.ndarray:
    fi = np.finfo(dtype)
    return np.array([[fi.min, fi.max, fi.tiny, -fi.tiny], [-0.0, 0.1, fi.eps, -1234.5]], dtype=dtype)


# Values JSON can carry (no NaN or infinity), shaped [2, 4] (BYTES: [2, 3]).
JSON_SAFE: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True, True], [False, False, True, False]]),
    **{name: _ints(t) for name, t in INT_TYPES.items()},
    **{name: _floats(t) for name, t in FLOAT_TYPES.items()},
    "BYTES": np.array(
        [[b"", b"hello", "\u00fcn\u00efc\u00f6d\u00e9 \u2603".encode()], [b"a\x00b", b'"quoted" \\', b"x" * 1000]],
        dtype=object,
    ),
}
DATATYPES = list(JSON_SAFE)

# Values only the binary form can carry.
BINARY_ONLY: dict[str, np.ndarray] = {
    **{name: np.array([np.nan, np.inf, -np.inf, -0.0, 1.0], dtype=t) for name, t in FLOAT_TYPES.items()},
    "BYTES": np.array([b"\xff\xfe\x00", b"\x80", b"ok", bytes(range(256))], dtype=object),
}

# Odd shapes: rank 0, zero-size dimensions, a long rank.
SHAPES = [(), (0,), (2, 0, 3), (1, 1, 1, 1, 1, 2)]


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor of ``datatype`` and ``shape`` built from the datatype's extreme values."""
    base = JSON_SAFE[datatype].reshape(-1)
    count = int(np.prod(shape, dtype=np.int64))
    return np.resize(base, count).astype(base.dtype).reshape(shape)


def binary_modes() -> list:
    """(input binary_data, output binary_data) pairs with readable ids."""
    return [
        pytest.param(True, True, id="in_bin-out_bin"),
        pytest.param(True, False, id="in_bin-out_json"),
        pytest.param(False, True, id="in_json-out_bin"),
        pytest.param(False, False, id="in_json-out_json"),
    ]


def as_bytes_list(array: np.ndarray) -> list[bytes]:
    """BYTES elements as bytes (tritonclient gives str for JSON outputs, bytes for binary)."""
    return [x.encode() if isinstance(x, str) else bytes(x) for x in array.reshape(-1)]


def assert_same_tensor(actual: np.ndarray, expected: np.ndarray, datatype: str) -> None:
    """Same shape and the same values bit for bit (NaN payloads and -0.0 included)."""
    assert actual is not None, "output missing from the response"
    assert tuple(actual.shape) == tuple(expected.shape)
    if datatype == "BYTES":
        assert as_bytes_list(actual) == as_bytes_list(expected)
        return
    if expected.size == 0:
        # tritonclient.http turns an empty binary buffer into np.empty(0) (float64):
        # a client quirk, so only the shape is checked for empty tensors.
        return
    assert actual.dtype == expected.dtype
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), (
        f"{datatype}: sent {expected!r}, got {actual!r}"
    )


def distinct_payload(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Request number ``i``'s own tensors: an INT32 row and a BYTES tag."""
    ints = (np.arange(16, dtype=np.int32) + i * 1000).reshape(1, 16)
    tag = np.array([f"request-{i}".encode()], dtype=object)
    return ints, tag


def http_address(server) -> str:
    """tritonclient.http wants ``host:port``, without the scheme."""
    return f"127.0.0.1:{server.http_port}"
