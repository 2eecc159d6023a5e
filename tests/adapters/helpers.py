"""Data and small entry points for the adapter tests."""

from __future__ import annotations

import csv
import random
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def write_partitions(target: Path, parts: int = 4, rows: int = 32, seed: int = 0) -> list[str]:
    """CSV partitions of y = 2*x1 - 3*x2 + 1 with globally unique row ids."""
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for p in range(parts):
        f = target / f"part-{p}.csv"
        with open(f, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "x1", "x2", "y"])
            for i in range(rows):
                x1, x2 = rng.random(), rng.random()
                w.writerow([f"p{p}-r{i}", x1, x2, 2 * x1 - 3 * x2 + 1])
        files.append(str(f))
    return files
