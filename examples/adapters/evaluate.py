"""The example pipeline's evaluate step: RMSE of the served model on the example data.

Asks the meshserve server (``SERVER``, default http://127.0.0.1:9080) over the Open
Inference Protocol, prints the RMSE (the step's result) and exits 1 above ``THRESHOLD``
(default 0.5), which stops the pipeline before its deploy step. Standard library only.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import urllib.request

from examples.adapters.make_data import DATA


def main() -> int:
    server = os.environ.get("SERVER", "http://127.0.0.1:9080").rstrip("/")
    model = os.environ.get("MODEL", "linear-example")
    threshold = float(os.environ.get("THRESHOLD", "0.5"))
    xs, ys = [], []
    for f in sorted(DATA.glob("part-*.csv")):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                xs.append([float(row["x1"]), float(row["x2"])])
                ys.append(float(row["y"]))
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(xs), 2], "data": sum(xs, [])}]}
    req = urllib.request.Request(f"{server}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        preds = json.loads(r.read())["outputs"][0]["data"]
    rmse = (sum((p - y) ** 2 for p, y in zip(preds, ys, strict=True)) / len(ys)) ** 0.5
    print(f"{rmse:.6f}")
    if rmse > threshold:
        print(f"rmse {rmse:.4f} > threshold {threshold}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
