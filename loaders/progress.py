"""A small progress bar for pulls and pushes: bytes done, total and rate, on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, label: str, total: int | None = None, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started = time.monotonic()
        self._shown = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._shown >= 0.1:
            self._shown = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        mib = self.done / 2**20
        rate = mib / max(now - self.started, 1e-6)
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 24)
            text = f"{self.label} [{bar:<24}] {mib:.1f}/{self.total / 2**20:.1f} MiB {rate:.1f} MiB/s"
        else:
            text = f"{self.label} {mib:.1f} MiB {rate:.1f} MiB/s"
        self.stream.write("\r" + text + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), end="\n")
