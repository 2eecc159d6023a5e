"""Where models live and how they are kept warm: the per-pod model cache.

It is handed a load and an unload function and knows neither storage nor
frameworks, so it is tested alone with stand-in models.
"""

from modelmesh.cache import CacheEntry, ModelCache, ModelState

__all__ = ["CacheEntry", "ModelCache", "ModelState"]
