"""Server-Sent Events responses for generation streams.

The response closes its :class:`Generation` (or several) however it ends: done, failed, or the
client gone before the body began (Starlette then never starts the body iterator,
whose own ``finally`` would not run), so no sequence and no model lease outlives it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from fastapi.responses import StreamingResponse
from meshserve.server.llm.request_stats import RequestStats
from meshserve.server.llm.service import Generation

SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


class GenerationResponse(StreamingResponse):
    def __init__(
        self, events: AsyncIterator[bytes], gens: Generation | list[Generation], stats: RequestStats | None = None
    ) -> None:
        super().__init__(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
        self._gens = gens if isinstance(gens, list) else [gens]
        self._stats = stats

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                for gen in self._gens:
                    await gen.close()
            if self._stats is not None:
                self._stats.end()  # 200, or the status of the error event that ended the stream
