"""Benchmark any Open Inference Protocol v2 server (REST + gRPC), or compare meshserve with the bare echo server.

Examples:
  python loadtests/bench.py --http-url http://127.0.0.1:8080 --grpc-url 127.0.0.1:8081 --model echo
  python loadtests/bench.py --compare --duration 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import LoadResult, cpu_busy, have, run_h2load, run_python, run_wrk
from payloads import SCENARIOS, Payload, build_payload, verify
from servers import ServerProc, tree_cpu_seconds

DEFAULT_MESHSERVE_CMD = ".venv/bin/meshserve serve --model-dir examples/models --http-port {http} --grpc-port {grpc}"
DEFAULT_BARE_CMD = f"{shlex.quote(sys.executable)} loadtests/echo_server.py --http-port {{http}} --grpc-port {{grpc}}"
TARGETS = {
    "rest_small_json": 0.6,
    "rest_small_binary": 0.6,
    "rest_large_binary": 0.9,
    "grpc_small": 0.9,
    "grpc_large": 0.9,
}
READY_TARGET_S = 2.0


@dataclass
class ScenarioResult:
    """A scenario's load result, the server CPU it cost, and the correctness checks around it."""

    scenario: str
    load: LoadResult | None
    verify_error: str | None
    cpu_us_per_req: float | None = None


def pick_tool(proto: str, choice: str) -> str:
    """Resolve 'auto' to the fastest available generator (measured: wrk for REST, h2load for gRPC)."""
    if choice != "auto":
        return choice
    if proto == "rest":
        return "wrk" if have("wrk") else "python"
    return "h2load" if have("h2load") else "python"


def wait_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """Wait at most ``max_wait`` s until other processes leave the CPUs mostly idle; return the busy share."""
    busy = cpu_busy(0.5)
    for _ in range(int(max_wait / 0.5)):
        if busy <= threshold:
            break
        busy = cpu_busy(0.5)
    if busy > threshold:
        print(f"  warning: CPUs {busy:.0%} busy before the run; figures will be noisy", file=sys.stderr, flush=True)
    return busy


def load_once(args: argparse.Namespace, p: Payload, http_url: str, grpc_url: str, duration: float) -> LoadResult:
    """One closed-loop run with the chosen generator (no built-in warm-up)."""
    sc = p.scenario
    tool = pick_tool(sc.proto, args.rest_tool if sc.proto == "rest" else args.grpc_tool)
    if tool == "wrk":
        return run_wrk(p, http_url, args.concurrency, duration, args.wrk_threads, warmup=0)
    if tool == "h2load":
        return run_h2load(p, grpc_url, args.concurrency, duration, warmup=0, streams=args.h2_streams)
    url = http_url if sc.proto == "rest" else grpc_url
    return run_python(p, url, args.concurrency, duration, args.client_procs, warmup=0)


def run_scenario(
    args: argparse.Namespace, name: str, http_url: str, grpc_url: str, cpu: Callable[[], float] | None = None
) -> ScenarioResult:
    """Verify a sample, warm up, run the measured load (metering server CPU when possible), verify again."""
    p = build_payload(SCENARIOS[name], args.model, args.input_name)
    err = verify(p, http_url, grpc_url, samples=3)
    if err:
        return ScenarioResult(name, None, f"before load: {err}")
    busy = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
    if args.warmup > 0:
        load_once(args, p, http_url, grpc_url, args.warmup)
    cpu0 = cpu() if cpu else 0.0
    load = load_once(args, p, http_url, grpc_url, args.duration)
    cpu_used = cpu() - cpu0 if cpu else 0.0
    if load.requests == 0 or load.requests == load.errors:
        load.errors = max(load.errors, 1)
        load.note = f"{load.note} no successful requests".strip()
    if busy > 0.2:
        load.note = f"{load.note} CPUs {busy:.0%} busy before run".strip()
    per_req = cpu_used / load.requests * 1e6 if cpu and load.requests else None
    err = verify(p, http_url, grpc_url, samples=2)
    return ScenarioResult(name, load, f"after load: {err}" if err else None, per_req)


def log_result(label: str, r: ScenarioResult) -> None:
    """One progress line on stderr."""
    ld = r.load
    msg = "-"
    if ld:
        msg = f"{ld.rps:9.0f} req/s p50 {ld.p50_ms:.2f} ms p99 {ld.p99_ms:.2f} ms err {ld.errors}"
        msg += f" cpu {r.cpu_us_per_req:.0f} us/req" if r.cpu_us_per_req else ""
    print(f"  [{label}] {r.scenario:18s} {msg} {r.verify_error or ''}", file=sys.stderr, flush=True)


def fmt_lat(r: ScenarioResult | None) -> str:
    """'p50 / p99' in ms."""
    return f"{r.load.p50_ms:.2f} / {r.load.p99_ms:.2f}" if r and r.load else "-"


def single_table(results: dict[str, ScenarioResult], args: argparse.Namespace) -> str:
    """Markdown table for one server."""
    rows = [
        "| scenario | tool | req/s | p50 / p99 ms | errors | server CPU us/req | echo verified |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        ld = r.load
        ok = "yes" if r.verify_error is None else f"NO ({r.verify_error})"
        cpu = f"{r.cpu_us_per_req:.0f}" if r.cpu_us_per_req else "-"
        if ld:
            note = f" {ld.note}" if ld.note else ""
            rows.append(f"| {name} | {ld.tool} | {ld.rps:.0f} | {fmt_lat(r)} | {ld.errors}{note} | {cpu} | {ok} |")
        else:
            rows.append(f"| {name} | - | - | - | - | - | {ok} |")
    rows.append(
        f"\n{args.concurrency} concurrent clients, {args.duration:.0f} s per scenario "
        f"after {args.warmup:.0f} s warm-up."
    )
    return "\n".join(rows)


def median_result(runs: list[ScenarioResult]) -> ScenarioResult:
    """Combine rounds: the round with the median throughput, errors summed, median CPU, first verify error kept."""
    err = next((r.verify_error for r in runs if r.verify_error), None)
    loads = sorted((r for r in runs if r.load), key=lambda r: r.load.rps if r.load else 0.0)
    if not loads:
        return ScenarioResult(runs[0].scenario, None, err)
    mid = loads[(len(loads) - 1) // 2]
    assert mid.load is not None
    merged = replace(mid.load, errors=sum(r.load.errors for r in loads if r.load))
    cpus = [r.cpu_us_per_req for r in loads if r.cpu_us_per_req]
    return ScenarioResult(mid.scenario, merged, err, statistics.median(cpus) if cpus else None)


def paired_ratios(bare: list[ScenarioResult], mesh: list[ScenarioResult]) -> tuple[float, float | None]:
    """Median over rounds of meshserve/bare req/s and of bare/meshserve CPU per request, pairing round i with i."""
    rps, cpu = [], []
    for b, m in zip(bare, mesh, strict=False):
        if b.load and m.load and b.load.rps:
            rps.append(m.load.rps / b.load.rps)
        if b.cpu_us_per_req and m.cpu_us_per_req:
            cpu.append(b.cpu_us_per_req / m.cpu_us_per_req)
    return (statistics.median(rps) if rps else 0.0), (statistics.median(cpu) if cpu else None)


def compare_table(
    bare: dict[str, ScenarioResult],
    mesh: dict[str, ScenarioResult],
    ready: dict[str, list[float]],
    args: argparse.Namespace,
    runs: dict[str, dict[str, list[ScenarioResult]]],
) -> str:
    """Markdown comparison table with targets."""
    rows = [
        "| scenario | bare req/s | meshserve req/s | ratio | target | bare p50 / p99 ms | meshserve p50 / p99 ms "
        "| server CPU us/req bare / mesh | CPU ratio | errors bare / mesh | tool |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in args.scenarios:
        b, m = bare.get(name), mesh.get(name)
        brps = b.load.rps if b and b.load else 0.0
        mrps = m.load.rps if m and m.load else 0.0
        ratio, cpu_r = paired_ratios(runs["bare"][name], runs["meshserve"][name])
        target = TARGETS.get(name, 0.0)
        verdict = "PASS" if (m and m.verify_error is None and ratio >= target) else "MISS"
        if m and m.verify_error:
            verdict += f" ({m.verify_error})"
        bc, mc = (b.cpu_us_per_req if b else None), (m.cpu_us_per_req if m else None)
        cpu = f"{bc:.0f} / {mc:.0f}" if bc and mc else "-"
        cpu_ratio = f"{cpu_r:.3f}" if cpu_r else "-"
        errs = f"{b.load.errors if b and b.load else '-'} / {m.load.errors if m and m.load else '-'}"
        tool = b.load.tool if b and b.load else "-"
        rows.append(
            f"| {name} | {brps:.0f} | {mrps:.0f} | {ratio:.3f} | >= {target} {verdict} | {fmt_lat(b)} | {fmt_lat(m)} "
            f"| {cpu} | {cpu_ratio} | {errs} | {tool} |"
        )
    mr, br = ready.get("meshserve", []), ready.get("bare", [])
    if mr and br:
        verdict = "PASS" if max(mr) <= READY_TARGET_S else "MISS"
        rows.append(
            f"\nmeshserve process start -> /v2/health/ready 200: median {statistics.median(mr):.2f} s, max "
            f"{max(mr):.2f} s over {len(mr)} start(s) (target <= {READY_TARGET_S} s: {verdict}); "
            f"bare echo server: median {statistics.median(br):.2f} s."
        )
    env = " ".join(args.server_env) or "none"
    rows.append(
        f"\n{args.concurrency} concurrent clients, {args.duration:.0f} s per scenario after {args.warmup:.0f} s "
        f"warm-up, {args.rounds} round(s), {args.mode} order, medians over rounds shown; ratio = median over rounds "
        f"of meshserve/bare req/s, round i paired with round i; CPU ratio = the same for bare/meshserve server CPU per "
        f"request (>= 1: meshserve as cheap). Extra server env: {env}."
    )
    return "\n".join(rows)


def compare(args: argparse.Namespace) -> str:
    """Measure the bare echo server and meshserve on the same scenarios."""
    os.makedirs(args.log_dir, exist_ok=True)
    env = dict(kv.split("=", 1) for kv in args.server_env)
    cmds = {"bare": args.bare_cmd, "meshserve": args.meshserve_cmd}
    runs: dict[str, dict[str, list[ScenarioResult]]] = {k: {n: [] for n in args.scenarios} for k in cmds}
    ready: dict[str, list[float]] = {k: [] for k in cmds}
    for label, cmd in cmds.items():  # extra cold starts, only to time readiness
        for _ in range(args.ready_samples - 1):
            s = ServerProc(label, cmd, args.log_dir, env)
            try:
                ready[label].append(s.start(args.ready_timeout))
            finally:
                s.stop()

    def measure(s: ServerProc, names: list[str]) -> None:
        cpu = (lambda: tree_cpu_seconds(s.pid)) if os.path.isdir("/proc") else None
        for n in names:
            r = run_scenario(args, n, s.http_url, s.grpc_url, cpu)
            log_result(s.label, r)
            runs[s.label][n].append(r)

    if args.mode == "sequential":  # one server up at a time, all scenarios, alternating per round
        for _ in range(args.rounds):
            for label, cmd in cmds.items():
                s = ServerProc(label, cmd, args.log_dir, env)
                try:
                    ready[label].append(s.start(args.ready_timeout))
                    measure(s, args.scenarios)
                finally:
                    s.stop()
    else:  # both up (the idle one costs nothing); each scenario runs on bare then meshserve, back to back
        procs = {label: ServerProc(label, cmd, args.log_dir, env) for label, cmd in cmds.items()}
        try:
            for label, s in procs.items():
                ready[label].append(s.start(args.ready_timeout))
            for i in range(args.rounds):
                for n in args.scenarios:
                    order = list(procs.values()) if i % 2 == 0 else list(procs.values())[::-1]
                    for s in order:
                        measure(s, [n])
        finally:
            for s in procs.values():
                s.stop()
    merged = {k: {n: median_result(v) for n, v in per.items()} for k, per in runs.items()}
    if args.json_out:
        raw = {k: {n: [asdict(r) for r in v] for n, v in per.items()} for k, per in runs.items()}
        with open(args.json_out, "w") as f:
            json.dump({"ready_s": ready, "runs": raw}, f, indent=1)
    return compare_table(merged["bare"], merged["meshserve"], ready, args, runs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (durations and counts are clamped to sane bounds)."""
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--http-url", default="http://127.0.0.1:8080")
    ap.add_argument("--grpc-url", default="127.0.0.1:8081")
    ap.add_argument("--model", default="echo")
    ap.add_argument("--input-name", default="INPUT0", help="tensor name sent (and expected back)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per scenario (1..600)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each measurement")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of: " + ",".join(SCENARIOS))
    ap.add_argument("--rest-tool", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--grpc-tool", choices=["auto", "h2load", "python"], default="auto")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--h2-streams", type=int, default=1, help="h2load concurrent streams per connection")
    ap.add_argument("--client-procs", type=int, default=1, help="processes for the Python load generator")
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="max s to wait for an idle machine per scenario")
    ap.add_argument("--server-pid", type=int, default=0, help="meter this process (and children): CPU per request")
    ap.add_argument("--compare", action="store_true", help="start the bare echo server and meshserve, compare")
    ap.add_argument("--meshserve-cmd", default=DEFAULT_MESHSERVE_CMD, help="{http}/{grpc} are filled in")
    ap.add_argument("--bare-cmd", default=DEFAULT_BARE_CMD)
    ap.add_argument("--mode", choices=["interleaved", "sequential"], default="interleaved", help="--compare order")
    ap.add_argument("--rounds", type=int, default=1, help="--compare: repeat every measurement this many times")
    ap.add_argument("--ready-samples", type=int, default=3, help="--compare: cold starts timed per server")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V", help="--compare: env for both")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--log-dir", default="/tmp/meshserve-bench", help="--compare: server logs")
    ap.add_argument("--json-out", default="", help="write raw results as JSON here")
    args = ap.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}")
    if any("=" not in kv for kv in args.server_env):
        ap.error("--server-env takes KEY=VALUE")
    args.concurrency = min(max(args.concurrency, 1), 1024)
    args.duration = min(max(args.duration, 1.0), 600.0)
    args.warmup = min(max(args.warmup, 0.0), 60.0)
    args.rounds = min(max(args.rounds, 1), 20)
    args.ready_samples = min(max(args.ready_samples, 1), 20)
    args.quiet_wait = min(max(args.quiet_wait, 0.0), 600.0)
    args.ready_timeout = min(max(args.ready_timeout, 1.0), 600.0)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: print a markdown table to stdout; exit 1 on errors or wrong echoes."""
    args = parse_args(argv)
    if args.compare:
        print(compare(args))
        return 0
    cpu = (lambda: tree_cpu_seconds(args.server_pid)) if args.server_pid else None
    results: dict[str, ScenarioResult] = {}
    for name in args.scenarios:
        results[name] = run_scenario(args, name, args.http_url, args.grpc_url, cpu)
        log_result("server", results[name])
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({n: asdict(r) for n, r in results.items()}, f, indent=1)
    print(single_table(results, args))
    bad = any(r.verify_error or (r.load and r.load.errors) for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
