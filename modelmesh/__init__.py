"""Where models live and how they are kept warm: the per-pod model cache
(a byte-weighted LRU) and its placement policy.

It is handed a load and an unload function and knows neither storage nor
frameworks, so it is tested alone with stand-in models.
"""

from meshserve.modelmesh.cache import CacheEntry, CacheStats, ModelCache, ModelState
from meshserve.modelmesh.placement import PlacementPolicy

__all__ = ["CacheEntry", "CacheStats", "ModelCache", "ModelState", "PlacementPolicy"]
