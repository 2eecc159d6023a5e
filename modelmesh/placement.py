"""Which resident models to evict to make room: least recently used first,
never a pinned model, one serving a request, or one in a load/unload, and
never one used within ``min_churn_age`` (ModelMesh's minChurnAgeMs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from modelmesh.cache import CacheEntry


class Choice(NamedTuple):
    """Victims that free enough, or None: blocked by the churn guard (``churn``), or
    everything evictable is too little (models in use free up later)."""

    victims: list[CacheEntry] | None
    churn: bool


class PlacementPolicy:
    def __init__(self, min_churn_age: float = 0.0) -> None:
        self.min_churn_age = min_churn_age

    def evictable(self, entry: CacheEntry) -> bool:
        return not entry.pinned and entry.inflight == 0 and entry.transition is None

    def choose_victims(self, lru: Iterable[CacheEntry], need: int, now: float) -> Choice:
        """The fewest least-recently-used entries whose bytes cover ``need``."""
        victims: list[CacheEntry] = []
        freed = 0
        for entry in lru:  # oldest first
            if freed >= need:
                break
            if not self.evictable(entry):
                continue
            if now - entry.last_used < self.min_churn_age:
                return Choice(None, churn=True)
            victims.append(entry)
            freed += entry.size_bytes
        return Choice(victims if freed >= need else None, churn=False)
