"""HTTP body compression on the infer path: gzip/deflate requests (as tritonclient's
``request_compression_algorithm`` sends them) and responses when the client accepts them."""

from __future__ import annotations

import zlib

from meshserve.protocol.errors import InvalidInput, PayloadTooLarge

MIN_COMPRESSED_RESPONSE = 1024  # smaller bodies go as they are: compressing them costs more than it saves
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def decode_body(body: bytes, encoding: bytes, limit: int) -> bytes:
    """Decompress a request body, refusing more than ``limit`` bytes of output (no zip bombs)."""
    encoding = encoding.strip().lower()
    if encoding in (b"", b"identity"):
        return body
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise InvalidInput(f"unsupported Content-Encoding {encoding.decode(errors='replace')!r}; use gzip or deflate")
    for bits in (wbits, -zlib.MAX_WBITS) if encoding == b"deflate" else (wbits,):  # zlib, else raw deflate
        d = zlib.decompressobj(bits)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or d.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
        return out
    raise InvalidInput(f"request body is not valid {encoding.decode()} data")


def response_encoding(accept: bytes | None) -> bytes | None:
    """The encoding to answer with: gzip or deflate if the client lists it (and not as q=0)."""
    if not accept:
        return None
    for part in accept.lower().split(b","):
        name, _, params = part.strip().partition(b";")
        if name in (b"gzip", b"deflate"):
            q = params.replace(b" ", b"")
            if q.startswith(b"q=") and not q[2:].strip(b"0."):
                continue  # q=0: explicitly refused
            return name
    return None


def encode_body(parts: list[bytes | memoryview], encoding: bytes) -> bytes:
    """Compress the whole response (fast level: tensors rarely compress well)."""
    wbits = _WBITS[encoding]
    c = zlib.compressobj(1, zlib.DEFLATED, wbits)
    return b"".join([*(c.compress(p) for p in parts), c.flush()])
