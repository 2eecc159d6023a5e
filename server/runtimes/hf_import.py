"""``transformers``, for the runtimes that use it, with its names resolved under one lock.

transformers' top-level module resolves its names lazily, on first access, and that is not
safe across threads: two models loading at once in a fresh process (two LLMs in
``--model-dir``, both loaded at start-up) had one of them fail with "module 'transformers'
has no attribute 'AutoTokenizer'" while the other was resolving it. Every runtime takes the
module from :func:`transformers_with`, which resolves the names it will use under a lock
first; once resolved, a name is a plain attribute.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()


def transformers_with(*names: str) -> Any:
    """The ``transformers`` module, with ``names`` resolved (imported) under the lock."""
    with _LOCK:
        import transformers

        for name in names:
            getattr(transformers, name)
    return transformers
