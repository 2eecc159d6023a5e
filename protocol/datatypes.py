"""OIP datatypes, their numpy dtypes, shape checks and the BYTES wire format."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import Enum

import numpy as np
from meshserve.protocol.errors import InvalidInput, PayloadTooLarge


class Datatype(str, Enum):
    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"


# Little-endian, as the protocol puts them on the wire.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

_DATATYPE_OF_KIND: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in DTYPES.items() if name != "BYTES"
}


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype for a datatype name; names are case-sensitive."""
    try:
        return DTYPES[datatype]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown datatype {datatype!r}; expected one of {', '.join(DTYPES)}") from None


def datatype_of(array: np.ndarray) -> str:
    """The datatype name for a numpy array (str/bytes/object arrays are BYTES)."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPE_OF_KIND[(kind, array.dtype.itemsize)]
    except KeyError:
        raise InvalidInput(f"numpy dtype {array.dtype} has no OIP datatype") from None


# numpy 1.x's NPY_MAXDIMS: any runtime's numpy holds a tensor accepted here, and nested
# JSON data is never deeper than this.
MAX_RANK = 32
# numpy sizes an array as (product of its nonzero dimensions) x itemsize in an int64, even
# when a zero dimension makes it empty: at 8 bytes an item, the product must stay below 2**60.
_MAX_SPAN = 2**60
# The default cap on BYTES elements in one request (settings.max_bytes_elements): an element
# costs 4 bytes on the wire but ~64 in memory (a bytes object and two pointers).
MAX_BYTES_ELEMENTS = 1 << 20


def element_count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_shape(name: str, shape: object) -> list[int]:
    """Validate a wire shape before anything is sized by it: at most MAX_RANK dimensions,
    each an int64 >= 0 or one -1 to resolve later, and a size numpy can represent."""
    if not isinstance(shape, (list, tuple)):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: shape has {len(shape)} dimensions; at most {MAX_RANK} are accepted")
    wildcard = 0
    span = 1
    for d in shape:
        if type(d) is not int:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} holds a non-integer dimension")
        if d > 0:
            span *= d
        elif d < 0:
            if d != -1:
                raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
            wildcard += 1
    if span >= _MAX_SPAN:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} is too large for any tensor")
    if wildcard > 1:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} has more than one -1; at most one can be resolved from the data"
        )
    return list(shape)


def resolve_shape(name: str, shape: list[int], count: int) -> list[int]:
    """Check that ``count`` elements fill ``shape``, resolving a single -1 from the count."""
    if -1 not in shape:
        n = 1
        for d in shape:
            n *= d
        if n != count:
            raise InvalidInput(f"input {name!r}: shape {shape} needs {n} elements but {count} were given")
        return shape
    known = element_count(d for d in shape if d != -1)
    if known == 0 or count % known:
        raise InvalidInput(f"input {name!r}: cannot resolve -1 in shape {shape} from {count} elements")
    return [count // known if d == -1 else d for d in shape]


_LEN = struct.Struct("<I")


def too_many_bytes_elements(name: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"input {name!r}: more BYTES elements than one request may hold (max_bytes_elements; {limit} left for it)"
    )


def decode_bytes_elements(
    name: str, buffer: bytes | memoryview, count: int | None = None, limit: int | None = None
) -> list[bytes]:
    """Split a raw BYTES buffer (4-byte little-endian length + bytes, repeated), expecting
    ``count`` elements if given and refusing more than ``limit`` before building them."""
    if count is not None and limit is not None and count > limit:
        raise too_many_bytes_elements(name, limit)
    cap = limit if count is None else count
    view = memoryview(buffer)
    out: list[bytes] = []
    pos, end = 0, len(view)
    unpack = _LEN.unpack_from
    while pos < end:
        if end - pos < 4:
            raise InvalidInput(f"input {name!r}: truncated BYTES element length")
        (n,) = unpack(view, pos)
        pos += 4
        if n > end - pos:
            raise InvalidInput(f"input {name!r}: BYTES element of {n} bytes overruns the buffer")
        out.append(bytes(view[pos : pos + n]))
        pos += n
        if cap is not None and len(out) > cap:
            if count is None:
                raise too_many_bytes_elements(name, limit)
            break
    if count is not None and len(out) != count:
        raise InvalidInput(f"input {name!r}: expected {count} BYTES elements, found {len(out)}")
    return out


def bytes_from_buffer(name: str, shape: list[int], buffer: bytes | memoryview, limit: int) -> np.ndarray:
    """A BYTES tensor from its raw form (REST binary data, gRPC raw contents)."""
    count = None if -1 in shape else element_count(shape)
    items = decode_bytes_elements(name, buffer, count, limit)
    return bytes_array(items, resolve_shape(name, shape, len(items)))


def fixed_from_buffer(
    name: str, datatype: str, dtype: np.dtype, shape: list[int], buffer: bytes | memoryview
) -> np.ndarray:
    """A fixed-size tensor as a view of its raw bytes; BOOL bytes must be 0 or 1 (numpy
    would keep 0x02 as a bool that is neither true nor false)."""
    if len(buffer) % dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {len(buffer)} bytes is not a whole number of {datatype} elements")
    array = np.frombuffer(buffer, dtype=dtype)
    resolved = resolve_shape(name, shape, array.size)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1")
    return array.reshape(resolved)


def encode_bytes_elements(array: np.ndarray) -> bytes:
    """Serialise a BYTES tensor to the length-prefixed raw form."""
    parts: list[bytes] = []
    pack = _LEN.pack
    for item in array.reshape(-1):
        b = as_bytes(item)
        parts.append(pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, (bytearray, memoryview, np.bytes_)):
        return bytes(item)
    return str(item).encode()


def bytes_array(items: list[bytes], shape: Sequence[int]) -> np.ndarray:
    """An object array of ``bytes`` with the given shape."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def cast_checked(name: str, values: np.ndarray, datatype: str) -> np.ndarray:
    """Convert flat values parsed from JSON/typed contents to ``datatype``, refusing lossy casts."""
    dtype = DTYPES[datatype]
    kind = values.dtype.kind
    if values.size == 0:
        return values.astype(dtype, copy=False)
    if dtype.kind == "b":
        if kind != "b":
            raise InvalidInput(f"input {name!r}: BOOL data must be true/false")
    elif dtype.kind in "iu":
        if kind not in "iu":
            raise InvalidInput(f"input {name!r}: {datatype} data must be integers")
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidInput(f"input {name!r}: value out of range for {datatype}")
    elif dtype.kind == "f":
        if kind not in "iuf":
            raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
        # A cast to FP16/FP32 turns values past their range into inf. For JSON floats (float64)
        # to FP32, the hot path, a sum of squares within FP32's largest squared proves they fit
        # in one BLAS call; past it, and for anything to FP16, cast and look.
        if datatype == "FP16" or (
            datatype == "FP32" and kind == "f" and values.itemsize == 8 and not values.dot(values) <= _FP32_MAX_SQUARED
        ):
            _check_float_range(name, values, datatype)
    return values.astype(dtype, copy=False)


_FP32_MAX_SQUARED = float(np.finfo(np.float32).max) ** 2


def _check_float_range(name: str, values: np.ndarray, datatype: str) -> None:
    dtype = DTYPES[datatype]
    with np.errstate(over="ignore"):
        out = values.astype(dtype)
    if (np.isinf(out) & ~np.isinf(values)).any():  # inf sent as such (gRPC typed contents) stays
        raise InvalidInput(
            f"input {name!r}: value out of range for {datatype} (largest finite: {float(np.finfo(dtype).max):g})"
        )
