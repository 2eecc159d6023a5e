"""A model's execution slots (``max_concurrency``) and the bounded line in front of them.

Past ``max_queue_size`` callers waiting, a new one is turned away at once with
:class:`QueueFull` (503 + Retry-After / UNAVAILABLE): a burst costs the client a retry,
not the server memory and every queued caller's latency without end.
"""

from __future__ import annotations

import asyncio
from typing import Any

from meshserve.protocol.errors import QueueFull


class Slots:
    __slots__ = ("model", "semaphore", "max_queue", "waiting", "rejected")

    def __init__(self, model: str, concurrency: int, max_queue: int) -> None:
        self.model = model
        self.semaphore = asyncio.Semaphore(concurrency)
        self.max_queue = max_queue
        self.waiting = 0  # callers in line now
        self.rejected = 0  # turned away since load

    def reject(self) -> QueueFull:
        self.rejected += 1
        return QueueFull(f"model {self.model!r} is busy: {self.max_queue} requests already waiting; retry shortly")

    async def take(self) -> None:
        """Take a slot, waiting in line if there is room in it (``async with slots``)."""
        semaphore = self.semaphore
        if not semaphore.locked():
            await semaphore.acquire()  # free: no wait
            return
        if self.waiting >= self.max_queue:
            raise self.reject()
        self.waiting += 1
        try:
            await semaphore.acquire()
        finally:
            self.waiting -= 1

    __aenter__ = take

    async def __aexit__(self, *exc: Any) -> None:
        self.semaphore.release()

    async def acquire(self) -> None:
        """A slot for work already admitted (a batch of queued requests): no line limit."""
        await self.semaphore.acquire()

    def release(self) -> None:
        self.semaphore.release()
