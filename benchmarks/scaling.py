"""Throughput with long prompts, and how it scales with data-plane processes.

    # ours --workers 1 and 2 against the reference, 32 KB and 128 KB prompts
    .venv/bin/python benchmarks/scaling.py --reference /tmp/ref/bin/smg

    # on a bigger host: --workers N pinned to N cores, N = 1, 2, 4, 8
    .venv/bin/python benchmarks/scaling.py --cores 1,2,4,8 --prompt-kb 32,128

Each request is one of 16 documents (the prompt size less 200 characters)
plus a 200-character question, to /generate, cache_aware: the gateway's
per-request work grows with the prompt (JSON, routing text, radix tree match
and insert), which is what more processes spread over more cores. Load
comes from wrk; the fake workers run in their own processes and answer
without parsing the prompts (--no-parse), so that the machine's CPU goes to
the gateway being measured rather than to its test bed.

With --cores, the gateway is pinned to the first N CPUs (taskset) and runs
--workers N; wrk and the fake workers get the remaining CPUs when there are
any. Without --cores, nothing is pinned and the machine is shared, as on a
small host.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

from load import GatewayProc, Workers, lua_script, run_wrk

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def documents_prompts(size: int, seed: int = 11, docs: int = 16, per_doc: int = 4) -> list[str]:
    rng = random.Random(seed)

    def words(n: int) -> str:
        out, have = [], 0
        while have < n:
            w = rng.choice(WORDS)
            out.append(w)
            have += len(w) + 1
        return " ".join(out)[:n]

    out = []
    for d in range(docs):
        doc = f"[doc{d}] " + words(max(0, size - 200 - 8))
        for _ in range(per_doc):
            out.append(doc + " " + words(199))
    rng.shuffle(out)
    return out


def cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.environ.get("SMG_REFERENCE"))
    ap.add_argument("--prompt-kb", default="32,128", help="prompt sizes in KB")
    ap.add_argument("--processes", default="1,2", help="--workers values to measure (without --cores)")
    ap.add_argument("--cores", default="", help="a sweep: --workers N pinned to N CPUs, for each N listed")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--workers", type=int, default=4, help="fake workers")
    ap.add_argument("--worker-processes", type=int, default=2, help="processes the fake workers run in")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    cpus = sorted(os.sched_getaffinity(0))
    total_cpus = len(cpus)
    sweep = [int(c) for c in args.cores.split(",") if c]
    if sweep and max(sweep) > total_cpus:
        raise SystemExit(f"--cores {max(sweep)} is more than the {total_cpus} CPUs here")

    per_process = max(1, args.workers // args.worker_processes)
    # the fake workers answer without parsing the prompts: their CPU is not what is measured
    pools = [Workers(per_process, parse=False) for _ in range(max(1, args.workers // per_process))]
    urls = [u for p in pools for u in p.urls]
    tmp = tempfile.mkdtemp(prefix="smg-scaling-")
    results = []

    def measure(name: str, command: list[str], extra: list[str], kb: int, script: str, pin: int = 0) -> dict:
        prefix, rest = [], []
        others = set(cpus)
        if pin:
            prefix = ["taskset", "-c", cpu_list(cpus[:pin])]
            if pin < total_cpus:
                rest = ["taskset", "-c", cpu_list(cpus[pin:])]
                others = set(cpus[pin:])
        for pool in pools:  # the fake workers stay off the gateway's CPUs
            os.sched_setaffinity(pool.proc.pid, others)
        gw = GatewayProc(name, prefix + command, ["--policy", "cache_aware", "--worker-urls", *urls, *extra])
        try:
            gw.wait_ready()
            url = f"http://127.0.0.1:{gw.port}/generate"
            run_wrk(url, script, args.warmup, args.connections, args.threads, prefix=rest)
            r = run_wrk(url, script, args.duration, args.connections, args.threads, prefix=rest)
            config = " ".join(extra) or ("--workers 1" if name == "smg" else "")
            return {"gateway": name, "config": config, "prompt_kb": kb, "cores": pin,
                    "rps": r["rps"], "p50_ms": r["p50"], "p99_ms": r["p99"], "errors": r["errors"]}
        finally:
            gw.stop()

    try:
        for kb in [int(k) for k in args.prompt_kb.split(",") if k]:
            script = os.path.join(tmp, f"docs-{kb}.lua")
            bodies = [json.dumps({"text": t, "sampling_params": {"max_new_tokens": 8}})
                      for t in documents_prompts(kb * 1024)]
            lua_script("/generate", bodies, script)
            for _ in range(args.rounds):
                runs = []
                if sweep:
                    runs = [("smg", [sys.executable, "-m", "smg"], ["--workers", str(n)], n) for n in sweep]
                else:
                    runs = [("smg", [sys.executable, "-m", "smg"], ["--workers", p] if p != "1" else [], 0)
                            for p in args.processes.split(",") if p]
                    if args.reference:
                        runs.append(("reference", [args.reference, "launch"], [], 0))
                for name, cmd, extra, pin in runs:
                    if pools[0].proc.poll() is not None:
                        raise SystemExit("the fake workers died")
                    res = measure(name, cmd, extra, kb, script, pin)
                    results.append(res)
                    print(f"  {kb:4d} KB  {name:9s} {res['config']:12s} cores {pin or '-':>2}  {res['rps']:8.0f} req/s  "
                          f"p50 {res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:7.2f} ms  errors {res['errors']}",
                          file=sys.stderr, flush=True)
    finally:
        for p in pools:
            p.stop()
    print(f"\n{args.connections} connections, {args.duration} s per run, {args.workers} fake workers, "
          f"{total_cpus} CPUs, {args.rounds} round(s)\n")
    print("| prompt | gateway | config | cores | req/s | p50 ms | p99 ms | errors |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['prompt_kb']} KB | {r['gateway']} | {r['config']} | {r['cores'] or 'shared'} | {r['rps']:.0f} "
              f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
