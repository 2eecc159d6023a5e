"""Modelcar start-up: cold (pull + load) and warm (cache + load) time to ready against
loading the same files from local disk, and pull throughput against a plain GET.

    python loadtests/oci_bench.py --mib 500

Starts a real registry (Debian's docker-registry) on 127.0.0.1, pushes a modelcar
holding a model of --mib MiB of random weights, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from meshserve.loaders import ModelFetcher  # noqa: E402
from meshserve.loaders.modelcar import build_and_push  # noqa: E402
from meshserve.loaders.oci import Reference, RegistryClient  # noqa: E402

from tests.loaders.conftest import start_registry  # noqa: E402
from tests.support.server import meshserve_command, start_server  # noqa: E402

MODEL_PY = """import numpy as np
from meshserve import Model


class Weights(Model):
    def load(self):
        self.w = np.fromfile(self.path / "weights.bin", dtype=np.uint8)

    def size_bytes(self):
        return self.w.nbytes

    async def predict(self, request):
        return {"n": np.array([self.w.size], dtype=np.int64)}
"""


def make_model(root: Path, mib: int) -> Path:
    model = root / "big"
    model.mkdir(parents=True)
    (model / "model.py").write_text(MODEL_PY)
    (model / "model-settings.json").write_text(json.dumps({"implementation": "model.py:Weights"}))
    with open(model / "weights.bin", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1024 * 1024))
    return model


def time_to_ready(args: list[str], env: dict[str, str], log: Path) -> float:
    t = time.monotonic()
    srv = start_server(None, log, *args, env=env, timeout=600)
    elapsed = time.monotonic() - t
    srv.stop()
    return elapsed


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024)
        except (OSError, AttributeError):
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed")
    return time.monotonic() - t, peak


def plain_get(host: str, repo: str, digests: list[str], to: Path | None = None) -> tuple[float, int]:
    """Stream the blobs, discarding them (or writing them to ``to``, as curl -o would)."""
    t, n = time.monotonic(), 0
    with httpx.Client(timeout=120) as c:
        for d in digests:
            out = open(to, "wb") if to else None
            with c.stream("GET", f"http://{host}/v2/{repo}/blobs/{d}") as r:
                for chunk in r.iter_raw(1024 * 1024):
                    n += len(chunk)
                    if out:
                        out.write(chunk)
            if out:
                out.close()
                to.unlink()
    return time.monotonic() - t, n


def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ocibench-"))
    reg = start_registry(root / "registry")
    try:
        model = make_model(root, args.mib)
        uri = f"oci://{reg.host}/bench/big:1"
        t = time.monotonic()
        with RegistryClient(reg.host, insecure=True) as client:
            build_and_push(model, uri, client, compress=args.compress)
            _, manifest = client.image_manifest(Reference.parse(uri))
        push_s = time.monotonic() - t
        blobs = [layer["digest"] for layer in manifest["layers"]]
        blob_bytes = sum(layer["size"] for layer in manifest["layers"])

        get_s, got = plain_get(reg.host, "bench/big", blobs)
        get_s = min(get_s, plain_get(reg.host, "bench/big", blobs)[0])
        save_s = min(plain_get(reg.host, "bench/big", blobs, root / "saved")[0] for _ in range(2))
        pull_times = []
        for i in range(2):
            t = time.monotonic()
            ModelFetcher(cache_dir=root / f"pullcache{i}", insecure=True).fetch(uri)
            pull_times.append(time.monotonic() - t)
        pull_s = min(pull_times)
        cli_s, cli_peak = peak_rss_of(
            [*meshserve_command(), "pull", uri, "--insecure", "--quiet", "--cache-dir", str(root / "clicache")]
        )

        local_cfg = root / "local.json"
        local_cfg.write_text(json.dumps({"models": [{"name": "big", "uri": str(model)}]}))
        oci_cfg = root / "oci.json"
        oci_cfg.write_text(json.dumps({"models": [{"name": "big", "uri": uri}]}))
        env = {"MESHSERVE_INSECURE_REGISTRIES": "true", "MESHSERVE_CACHE_DIR": str(root / "servecache")}
        local_s = min(time_to_ready(["--config", str(local_cfg)], env, root / "l.log") for _ in range(2))
        cold_s = time_to_ready(["--config", str(oci_cfg)], env, root / "c.log")
        warm_s = min(time_to_ready(["--config", str(oci_cfg)], env, root / "w.log") for _ in range(2))
        reg.stop()
        offline_s = time_to_ready(["--config", str(oci_cfg)], env, root / "o.log")

        mib = blob_bytes / 2**20
        rows = [
            (
                "model",
                f"{args.mib} MiB of random weights; layer {mib:.0f} MiB, {'gzip' if args.compress else 'plain tar'}",
            ),
            ("build + push (chunked)", f"{push_s:.1f} s"),
            ("plain streaming GET of the blobs", f"{get_s:.2f} s = {mib / get_s:.0f} MiB/s"),
            ("plain GET written to a file", f"{save_s:.2f} s = {mib / save_s:.0f} MiB/s"),
            (
                "meshserve pull (verify + unpack)",
                f"{pull_s:.2f}s = {mib / pull_s:.0f} MiB/s ({get_s / pull_s:.2f}x GET; {save_s / pull_s:.2f}x to file)",
            ),
            ("peak RSS of `meshserve pull`", f"{cli_peak / 2**20:.0f} MiB (took {cli_s:.1f} s)"),
            ("ready, local directory (runtime load)", f"{local_s:.2f} s"),
            ("ready, cold (pull + load)", f"{cold_s:.2f} s"),
            ("ready, warm cache", f"{warm_s:.2f} s ({warm_s - local_s:+.2f} s vs local)"),
            ("ready, warm cache, registry down", f"{offline_s:.2f} s"),
        ]
        print("\n| figure | value |\n|---|---|")
        for label, value in rows:
            print(f"| {label} | {value} |")
    finally:
        if reg.proc.poll() is None:
            reg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=500)
    ap.add_argument("--gzip", dest="compress", action="store_true", help="gzip layer (default: plain tar)")
    main(ap.parse_args())
