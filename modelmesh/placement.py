"""Which resident models to evict to make room: least recently used first,
never a pinned model, one serving a request or about to (its requests waited
for its load), or one in a load/unload, and
never one used within ``min_churn_age`` (ModelMesh's minChurnAgeMs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from meshserve.modelmesh.cache import CacheEntry
    from meshserve.modelmesh.store import PodRecord


class Choice(NamedTuple):
    """Victims that free enough, or None: blocked by the churn guard (``churn``), or
    everything evictable is too little (models in use free up later)."""

    victims: list[CacheEntry] | None
    churn: bool


class PlacementPolicy:
    def __init__(self, min_churn_age: float = 0.0) -> None:
        self.min_churn_age = min_churn_age

    def evictable(self, entry: CacheEntry) -> bool:
        return not entry.pinned and entry.inflight == 0 and entry.waiting == 0 and entry.transition is None

    def choose_victims(self, lru: Iterable[CacheEntry], need: int, now: float) -> Choice:
        """The fewest least-recently-used entries whose bytes cover ``need``; in a fleet,
        extra copies (another pod holds the model too) go before single copies."""
        lru = list(lru)
        if any(e.extra for e in lru):
            lru = [e for e in lru if e.extra] + [e for e in lru if not e.extra]
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


def rank_pods(pods: Iterable[PodRecord], need: int) -> list[PodRecord]:
    """Where to load a model no pod holds, best first, in ModelMesh's order: pods not
    shutting down; those with room for ``need`` bytes before full ones (full ones by their
    oldest LRU entry: the coldest copy is the cheapest to evict); then fewest models, most
    free space, most free loading slots."""

    def order(p: PodRecord) -> tuple:
        fits = p.capacity <= 0 or p.used + need <= p.capacity
        return (
            not fits,
            0.0 if fits else (p.oldest_lru or float("inf")),
            p.models,
            -p.free,
            -(p.load_slots - p.loading),
        )

    return sorted((p for p in pods if not p.shutting_down), key=order)
