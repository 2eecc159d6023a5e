"""Transport speed, side by side in one run: the bare Python servers, Triton and meshserve.

Every server serves the same identity model (``INPUT0`` echoed back), the load generators are
wrk (REST) and h2load (gRPC), and all servers stay up while each scenario runs on each of them
back to back, the order rotating every round, so every figure of a row saw the same machine.

  python loadtests/transport_bench.py --rounds 3 --duration 8
  python loadtests/transport_bench.py --servers bare,meshserve --scenarios rest_small_json

Servers (``--servers``):
  bare          loadtests/echo_server.py: uvicorn + grpc.aio doing the least an OIP server can
  bare-w2       the same in two processes sharing the ports (SO_REUSEPORT), the yardstick for ``--workers 2``
  triton        ``tritonserver`` from the nvidia-pytriton wheel (``--triton-python``: the python of a
                venv holding it) with a Python-backend identity model, CPU only
  meshserve     ``meshserve serve`` with defaults, only the example ``echo`` model (a user's ``async def predict``)
  meshserve-w2  the same with ``--workers 2``

Scenarios (16 closed-loop clients each): ``rest_small_json`` ([1,4] FP32 as JSON, wrk -c16);
``grpc_small_c1``/``grpc_large_c1`` ([1,4] / [1,150528] FP32 raw, 16 streams over one
connection, h2load -c1 -m16); ``grpc_small_c16`` (16 connections, one stream each);
``grpc_small_c4``/``grpc_large_c4`` (4 connections x 4 streams,
as many clients behind a Kubernetes Service).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import run_h2load, run_wrk
from payloads import REPO_ROOT, SCENARIOS, build_payload, verify
from servers import ServerProc

REPO = Path(REPO_ROOT)

# scenario -> (payload, generator, connections, streams per connection)
MATRIX = {
    "rest_small_json": ("rest_small_json", "wrk", 16, 1),
    "grpc_small_c1": ("grpc_small", "h2load", 1, 16),
    "grpc_large_c1": ("grpc_large", "h2load", 1, 16),
    "grpc_small_c16": ("grpc_small", "h2load", 16, 1),
    "grpc_small_c4": ("grpc_small", "h2load", 4, 4),
    "grpc_large_c4": ("grpc_large", "h2load", 4, 4),
}
# The targets: (scenario, server, peer, ratio).
TARGETS = [
    ("rest_small_json", "meshserve", "bare", 0.6),
    ("grpc_small_c1", "meshserve", "bare", 0.9),
    ("grpc_small_c4", "meshserve-w2", "triton", 1.2),
    ("grpc_large_c4", "meshserve-w2", "triton", 1.0),
    ("rest_small_json", "meshserve-w2", "triton", 1.5),
]

TRITON_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
output [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
TRITON_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("INPUT0", x)]))
        return out
"""


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float | None


def triton_command(python: str, repo: Path) -> str:
    """tritonserver from the pytriton wheel of ``python``'s venv, its Python backend stub put in place."""
    import subprocess

    site = subprocess.run(
        [python, "-c", "import pytriton, os; print(os.path.dirname(pytriton.__file__))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    root = Path(site) / "tritonserver"
    pyver = subprocess.run(
        [python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    stub = root / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    target = root / "backends" / "python" / "triton_python_backend_stub"
    if not target.exists():
        shutil.copy2(stub, target)
    (repo / "echo" / "1").mkdir(parents=True, exist_ok=True)
    (repo / "echo" / "config.pbtxt").write_text(TRITON_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(TRITON_MODEL)
    return (
        f"{root}/bin/tritonserver --model-repository {repo} --backend-directory {root}/backends "
        "--http-port {http} --grpc-port {grpc} --allow-metrics false --log-verbose 0"
    )


def commands(args: argparse.Namespace, tmp: Path) -> dict[str, tuple[str, dict[str, str]]]:
    models = tmp / "models"
    if not models.exists():
        shutil.copytree(REPO / "examples" / "models" / "echo", models / "echo")
    meshserve = f"{args.meshserve} serve --model-dir {models} --http-port {{http}} --grpc-port {{grpc}}"
    bare = f"{sys.executable} loadtests/echo_server.py --http-port {{http}} --grpc-port {{grpc}}"
    out: dict[str, tuple[str, dict[str, str]]] = {
        "bare": (bare, {}),
        "bare-w2": (bare + " --processes 2", {}),
        "meshserve": (meshserve, {}),
        "meshserve-w2": (meshserve + " --workers 2", {}),
    }
    if "triton" in args.servers:
        venv_bin = str(Path(args.triton_python).parent)
        out["triton"] = (
            triton_command(args.triton_python, tmp / "triton"),
            {"PATH": f"{venv_bin}:{os.environ['PATH']}"},
        )
    return {k: v for k, v in out.items() if k in args.servers}


def measure(s: ServerProc, scenario: str, args: argparse.Namespace) -> Run | None:
    payload_name, tool, conns, streams = MATRIX[scenario]
    p = build_payload(SCENARIOS[payload_name], "echo", "INPUT0")
    err = verify(p, s.http_url, s.grpc_url, samples=2)
    if err:
        print(f"  [{s.label}] {scenario}: wrong echo: {err}", file=sys.stderr, flush=True)
        return None
    if tool == "wrk":
        run_wrk(p, s.http_url, conns, args.warmup, 1, warmup=0)
        cpu0 = s.cpu_seconds()
        r = run_wrk(p, s.http_url, conns, args.duration, 1, warmup=0)
    else:
        run_h2load(p, s.grpc_url, conns, args.warmup, warmup=0, streams=streams)
        cpu0 = s.cpu_seconds()
        r = run_h2load(p, s.grpc_url, conns, args.duration, warmup=0, streams=streams)
    cpu = s.cpu_seconds() - cpu0
    run = Run(r.rps, r.p50_ms, r.p99_ms, r.errors, cpu / r.requests * 1e6 if r.requests else None)
    print(
        f"  [{s.label:12s}] {scenario:16s} {run.rps:8.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms"
        f"  err {run.errors}  cpu {run.cpu_us or 0:.0f} us/req",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    return run


def spread(runs: list[Run]) -> str:
    v = sorted(r.rps for r in runs)
    if not v:
        return "-"
    mid = statistics.median(v)
    return f"{mid:,.0f}" if len(v) == 1 else f"{mid:,.0f} ({v[0]:,.0f}-{v[-1]:,.0f})"


def table(results: dict[str, dict[str, list[Run]]], args: argparse.Namespace) -> str:
    servers = [s for s in args.servers if s in results]
    head = "| scenario | " + " | ".join(servers) + " |"
    rows = [head, "|---|" + "---:|" * len(servers)]
    for sc in args.scenarios:
        rows.append(f"| {sc}, req/s | " + " | ".join(spread(results[s][sc]) for s in servers) + " |")
    for sc in args.scenarios:
        cells = []
        for s in servers:
            cpus = [r.cpu_us for r in results[s][sc] if r.cpu_us]
            cells.append(f"{statistics.median(cpus):.0f}" if cpus else "-")
        rows.append(f"| {sc}, server CPU us/req | " + " | ".join(cells) + " |")
    errors = {s: sum(r.errors for sc in args.scenarios for r in results[s][sc]) for s in servers}
    rows.append("| errors | " + " | ".join(str(errors[s]) for s in servers) + " |")
    lines = ["\n".join(rows), ""]
    for sc, mine, peer, target in TARGETS:
        if sc not in args.scenarios or mine not in results or peer not in results:
            continue
        ratios = [
            a.rps / b.rps for a, b in zip(results[mine][sc], results[peer][sc], strict=False) if b.rps
        ]  # round i paired with round i
        if ratios:
            med = statistics.median(ratios)
            verdict = "PASS" if med >= target else "MISS"
            lines.append(
                f"- {sc}: {mine} / {peer} = {med:.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)}), "
                f"target >= {target}: {verdict}"
            )
    lines.append(
        f"\n{args.rounds} round(s) of {args.duration:.0f} s per scenario after {args.warmup:.0f} s warm-up; "
        "median (min-max) over rounds; 16 closed-loop clients; load generator on the same machine."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--servers", default="bare,triton,meshserve,meshserve-w2")
    ap.add_argument("--scenarios", default=",".join(MATRIX))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--meshserve", default=str(Path(sys.executable).with_name("meshserve")))
    ap.add_argument("--triton-python", default="/work/venvs/triton/bin/python",
                    help="python of a venv with nvidia-pytriton")  # fmt: skip
    ap.add_argument("--log-dir", default="/tmp/meshserve-transport-bench")
    args = ap.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in MATRIX]
    if bad:
        ap.error(f"unknown scenarios {bad}; choose from {','.join(MATRIX)}")
    args.rounds = min(max(args.rounds, 1), 20)
    args.duration = min(max(args.duration, 1.0), 600.0)
    args.warmup = min(max(args.warmup, 1.0), 60.0)
    os.makedirs(args.log_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="transport-bench") as tmp:
        cmds = commands(args, Path(tmp))
        procs = {label: ServerProc(label, cmd, args.log_dir, env) for label, (cmd, env) in cmds.items()}
        results: dict[str, dict[str, list[Run]]] = {k: {sc: [] for sc in args.scenarios} for k in procs}
        try:
            for s in procs.values():
                s.start(120.0)
            order = list(procs.values())
            for i in range(args.rounds):
                for sc in args.scenarios:
                    for s in order[i % len(order) :] + order[: i % len(order)]:
                        run = measure(s, sc, args)
                        if run is not None:
                            results[s.label][sc].append(run)
        finally:
            for s in procs.values():
                s.stop()
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
