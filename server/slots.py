"""A model's execution slots (``max_concurrency``) and the bounded line in front of them.

Past ``max_queue_size`` callers waiting, a new one is turned away at once with
:class:`QueueFull` (503 + Retry-After / UNAVAILABLE): a burst costs the client a retry,
not the server memory and every queued caller's latency without end.

A free slot is taken without awaiting anything (``try_take``): this is on every
request's path, where an ``asyncio.Semaphore`` costs two coroutine calls and a scan of
its waiters. A released slot is handed straight to the first caller in line (FIFO).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from meshserve.protocol.errors import QueueFull


class Slots:
    __slots__ = ("model", "free", "max_queue", "waiting", "rejected", "_line")

    def __init__(self, model: str, concurrency: int, max_queue: int) -> None:
        self.model = model
        self.free = concurrency
        self.max_queue = max_queue
        self.waiting = 0  # callers in line now
        self.rejected = 0  # turned away since load
        self._line: deque[asyncio.Future[None]] = deque()

    def reject(self) -> QueueFull:
        self.rejected += 1
        return QueueFull(f"model {self.model!r} is busy: {self.max_queue} requests already waiting; retry shortly")

    def try_take(self) -> bool:
        """Take a free slot now, if one is free and nobody is in line before us."""
        if self.free > 0 and not self._line:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        """Take a slot, waiting in line if there is room in it (``async with slots``)."""
        if self.try_take():
            return
        if self.waiting >= self.max_queue:
            raise self.reject()
        await self._wait()

    async def acquire(self) -> None:
        """A slot for work already admitted (a batch of queued requests): no line limit."""
        if not self.try_take():
            await self._wait()

    async def _wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(waiter)
        self.waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):  # gave up in line: a free slot never waits behind it
                    self._line.remove(waiter)
            elif waiter.done():
                self.release()  # handed a slot just as the caller gave up: pass it on
            raise
        finally:
            self.waiting -= 1

    def release(self) -> None:
        line = self._line
        while line:
            waiter = line.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it directly
                return
        self.free += 1

    __aenter__ = take

    async def __aexit__(self, *exc: Any) -> None:
        self.release()
