"""Write the adapter examples' dataset: two CSV partitions of y = 2*x1 - 3*x2 + 1 (+ a little noise).

Columns are what the built-in trainer (meshserve.adapters.trainers.linear) reads: ``id``, the
features, and ``y`` last. The specs beside this file read the partitions from
/tmp/meshserve-examples/data (absolute: training workers run in their job's folder).

    python examples/adapters/make_data.py            # from the repository root
    python -m examples.adapters.make_data            # what pipeline.yaml's ingest step runs
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

DATA = Path("/tmp/meshserve-examples/data")
PARTS, ROWS = 2, 64


def write(target: Path = DATA, parts: int = PARTS, rows: int = ROWS, seed: int = 0) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for p in range(parts):
        f = target / f"part-{p}.csv"
        tmp = f.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "x1", "x2", "y"])
            for i in range(rows):
                x1, x2 = rng.random(), rng.random()
                w.writerow([f"p{p}-r{i}", f"{x1:.6f}", f"{x2:.6f}", f"{2 * x1 - 3 * x2 + 1 + rng.gauss(0, 0.01):.6f}"])
        tmp.replace(f)  # a reader never sees half a partition
        files.append(f)
    return files


if __name__ == "__main__":
    out = write(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)
    print(f"wrote {len(out) * ROWS} rows in {len(out)} partitions under {out[0].parent}")
