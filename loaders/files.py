"""Sizes of model files on disk."""

from __future__ import annotations

import os
from pathlib import Path


def files_size(path: Path | None) -> int:
    """Bytes on disk under ``path`` (a file or a directory), as ModelMesh's default size prediction."""
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except OSError:
                pass
    return total
