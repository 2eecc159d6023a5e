"""Built-in workflow steps as a command, for rendered Argo workflows' containers:
``python -m meshserve.adapters.steps check-freshness|touch|deploy ...``."""

from __future__ import annotations

import argparse
import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshserve.adapters.steps")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check-freshness", help="print fresh or stale")
    c.add_argument("--store", required=True)
    c.add_argument("--window-seconds", type=float, default=3600)
    t = sub.add_parser("touch", help="mark the data updated now")
    t.add_argument("--store", required=True)
    d = sub.add_parser("deploy", help="(re)load a model on a meshserve server")
    d.add_argument("--server", required=True)
    d.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    from meshserve.adapters.freshness import CacheStore, check

    if args.cmd == "check-freshness":
        fresh, _ = asyncio.run(check(CacheStore(args.store), args.window_seconds))
        print("fresh" if fresh else "stale")
    elif args.cmd == "touch":
        asyncio.run(CacheStore(args.store).touch())
    else:
        import httpx

        r = httpx.post(f"{args.server.rstrip('/')}/v2/repository/models/{args.model}/load", timeout=600)
        if r.status_code != 200:
            print(r.text, file=sys.stderr)
            return 1
        print(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
