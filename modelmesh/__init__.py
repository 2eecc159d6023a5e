"""Where models live and how they are kept warm: the per-pod model cache
(a byte-weighted LRU) and its placement policy, the coordination store, and the
fleet's decisions across pods (``modelmesh.fleet``).

It is handed a load and an unload function (and, across pods, a transport) and
knows neither storage, frameworks nor wire formats, so it is tested alone with
stand-ins.
"""

from meshserve.modelmesh.cache import CacheEntry, CacheStats, ModelCache, ModelState
from meshserve.modelmesh.placement import PlacementPolicy

__all__ = ["CacheEntry", "CacheStats", "ModelCache", "ModelState", "PlacementPolicy"]
