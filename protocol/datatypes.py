"""OIP datatypes, their numpy dtypes, shape checks and the BYTES wire format."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import Enum

import numpy as np
from meshserve.protocol.errors import InvalidInput


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


def element_count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_shape(name: str, shape: object) -> list[int]:
    """Validate a wire shape: a list of integers >= 0, or one -1 to resolve later."""
    if not isinstance(shape, (list, tuple)):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers")
    wildcard = 0
    for d in shape:
        if type(d) is not int:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} holds a non-integer dimension")
        if d < 0:
            if d != -1:
                raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
            wildcard += 1
    if wildcard > 1:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} has more than one -1; at most one can be resolved from the data"
        )
    return list(shape)


def resolve_shape(name: str, shape: list[int], count: int) -> list[int]:
    """Check that ``count`` elements fill ``shape``, resolving a single -1 from the count."""
    if -1 not in shape:
        if element_count(shape) != count:
            raise InvalidInput(
                f"input {name!r}: shape {shape} needs {element_count(shape)} elements but {count} were given"
            )
        return shape
    known = element_count(d for d in shape if d != -1)
    if known == 0 or count % known:
        raise InvalidInput(f"input {name!r}: cannot resolve -1 in shape {shape} from {count} elements")
    return [count // known if d == -1 else d for d in shape]


_LEN = struct.Struct("<I")


def decode_bytes_elements(name: str, buffer: bytes | memoryview, count: int | None = None) -> list[bytes]:
    """Split a raw BYTES buffer (4-byte little-endian length + bytes, repeated)."""
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
        if count is not None and len(out) > count:
            break
    if count is not None and len(out) != count:
        raise InvalidInput(f"input {name!r}: expected {count} BYTES elements, found {len(out)}")
    return out


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
    """Convert values parsed from JSON/typed contents to ``datatype``, refusing lossy casts."""
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
    return values.astype(dtype, copy=False)
