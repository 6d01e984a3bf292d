"""Prefix affinity when the traffic is split over several routers: one
gateway, two independent gateways (as two replicas behind a Kubernetes
Service), and one gateway with --workers 2, all in front of the same fake
workers, the load split evenly between the entry points.

    .venv/bin/python benchmarks/affinity.py [--reference /tmp/ref/bin/smg]

Affinity is the share of requests that went to the worker serving the most
requests of their prefix (1.0: every prefix lives on exactly one worker),
measured after a warm-up in which the gateways learn the prefixes.
The workload is load.py's: ~1 KB prompts from 8 shared ~800-character
prefixes, cache_aware.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import tempfile

from load import Workers, lua_script, prompts, run_wrk, start_gateways

SETUPS = ("1-gateway", "2-gateways", "workers-2")


def affinity(stats: list[dict]) -> float:
    tags: dict[str, list[int]] = {}
    for i, s in enumerate(stats):
        for tag, n in s["tags"].items():
            tags.setdefault(tag, [0] * len(stats))[i] += n
    total = sum(sum(v) for v in tags.values())
    return sum(max(v) for v in tags.values()) / total if total else float("nan")


def measure(name: str, command: list[str], setup: str, workers: Workers, script: str, args) -> dict:
    base = ["--policy", "cache_aware", "--worker-urls", *workers.urls]
    gateways = start_gateways(setup, name, command, base)
    try:
        for g in gateways:
            g.wait_ready()
        urls = [f"http://127.0.0.1:{g.port}/generate" for g in gateways]
        conns = max(1, args.connections // len(urls))
        with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
            if args.warmup:
                list(pool.map(lambda u: run_wrk(u, script, args.warmup, conns, 1), urls))
            workers.reset()
            runs = list(pool.map(lambda u: run_wrk(u, script, args.duration, conns, 1), urls))
        stats = workers.stats()
        counts = [s["requests"].get("/generate", 0) for s in stats]
        return {"gateway": name, "setup": setup, "affinity": affinity(stats),
                "rps": sum(r["rps"] for r in runs), "errors": sum(r["errors"] for r in runs),
                "worker_counts": counts}
    finally:
        for g in gateways:
            g.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.environ.get("SMG_REFERENCE"))
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3,
                    help="seconds of traffic before measuring (new prefixes settle: placement, spills)")
    ap.add_argument("--connections", type=int, default=32, help="in total, split over the entry points")
    ap.add_argument("--workers", type=int, default=4, help="fake workers")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--json")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    setups = [s for s in args.setups.split(",") if s]
    tmp = tempfile.mkdtemp(prefix="smg-affinity-")
    script = os.path.join(tmp, "generate.lua")
    lua_script("/generate", [json.dumps({"text": t, "sampling_params": {"max_new_tokens": 8}}) for t in prompts()],
               script)
    gateways = [("smg", [sys.executable, "-m", "smg"])]
    if args.reference:
        gateways.append(("reference", [args.reference, "launch"]))
    results = []
    workers = Workers(args.workers)
    try:
        for _ in range(args.rounds):
            for setup in setups:
                for name, cmd in gateways:
                    if setup == "workers-2" and name != "smg":
                        continue
                    r = measure(name, cmd, setup, workers, script, args)
                    results.append(r)
                    print(f"  {name:9s} {setup:11s} affinity {r['affinity']:.3f}  {r['rps']:8.0f} req/s  "
                          f"errors {r['errors']}  per worker {r['worker_counts']}", file=sys.stderr, flush=True)
    finally:
        workers.stop()
    print(f"\n{args.connections} connections in total, {args.duration} s, {args.workers} fake workers, "
          f"{args.rounds} round(s)\n")
    print("| setup | gateway | prefix affinity (each round) | req/s | errors |")
    print("|---|---|---|---:|---:|")
    for setup in setups:
        for name, _ in gateways:
            rs = [r for r in results if r["setup"] == setup and r["gateway"] == name]
            if rs:
                rounds = ", ".join(f"{r['affinity']:.3f}" for r in rs)
                print(f"| {setup} | {name} | {rounds} | "
                      f"{sum(r['rps'] for r in rs) / len(rs):.0f} | {sum(r['errors'] for r in rs)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
