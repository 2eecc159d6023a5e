"""The freshness check of the seed's pipeline: a cache store keeps when the data was
last updated; ingestion is skipped while that is within a window.

Stores: a file (``file:///path`` or a plain path) holding a Unix timestamp, or an
etcd key (``etcd://host:port/key``, through aetcd) holding one.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlparse

from meshserve.protocol.errors import InvalidInput


class CacheStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        u = urlparse(uri)
        self.scheme = u.scheme or "file"
        if self.scheme == "file":
            self.path = Path(u.path if u.scheme else uri)
        elif self.scheme == "etcd":
            if not u.hostname or not u.path.strip("/"):
                raise InvalidInput(f"cache store {uri!r}: use etcd://host:port/key")
            self.host, self.port, self.key = u.hostname, u.port or 2379, u.path.lstrip("/")
        else:
            raise InvalidInput(f"cache store {uri!r}: unsupported scheme {self.scheme!r} (file://, etcd://)")

    async def updated_at(self) -> float | None:
        if self.scheme == "file":
            try:
                return float(self.path.read_text().strip())
            except FileNotFoundError:
                return None
            except ValueError:
                return None  # unreadable: treat as never updated
        import aetcd

        async with aetcd.Client(host=self.host, port=self.port) as client:
            got = await client.get(self.key.encode())
        if got is None:
            return None
        try:
            return float(got.value.decode())
        except ValueError:
            return None

    async def touch(self, when: float | None = None) -> None:
        stamp = repr(time.time() if when is None else when)
        if self.scheme == "file":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(stamp)
            tmp.replace(self.path)
            return
        import aetcd

        async with aetcd.Client(host=self.host, port=self.port) as client:
            await client.put(self.key.encode(), stamp.encode())


async def check(store: CacheStore, window_seconds: float) -> tuple[bool, float | None]:
    """(fresh, age in seconds): fresh when updated within the window."""
    updated = await store.updated_at()
    if updated is None:
        return False, None
    age = time.time() - updated
    return age <= window_seconds, age
