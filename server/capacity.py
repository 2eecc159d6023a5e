"""How many bytes of models this pod may hold, and what a model will take before it loads."""

from __future__ import annotations

import os
from pathlib import Path

from meshserve.loaders.files import files_size  # noqa: F401  (the size prediction lives with the loaders)

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_limit_bytes() -> int:
    """The container's memory limit (cgroup v2, then v1), else the machine's memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < physical:
            return int(raw)
    return physical


def default_capacity(fraction: float) -> int:
    return int(memory_limit_bytes() * fraction)
