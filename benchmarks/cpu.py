"""Gateway CPU time per request: smg against the reference and against any
other checkout, same fake workers, same load, alternating rounds.

    .venv/bin/python benchmarks/cpu.py [--reference /tmp/ref/bin/smg] [--baseline DIR] [--rounds 3]

Requests per second on a shared 2-core machine swing by more than 10% from
one run to the next; the CPU a gateway spends per request swings much less
(it does not count the time the gateway waits for a core), so this is the
measurement that shows a 10% change in the per-request cost. The gateway's
CPU is user + system time from /proc, summed over its whole process tree
(--workers children included), read before and after each measured run; it
is divided by the requests wrk completed in that run.

Workloads (load.py's, plus a large prompt):
  generate-cache_aware  /generate, ~1 KB prompts from 8 shared prefixes, cache_aware
  generate-round_robin  the same prompts, round_robin
  chat-stream           streamed /v1/chat/completions (8 SSE events each), round_robin
  pd                    /generate through prefill/decode disaggregation
  prompt-32k            /generate, 32 KB prompts from 8 shared prefixes, cache_aware

--baseline DIR measures another checkout built in place (see load.py), e.g.
the commit before a change. Each round runs every gateway on a workload
before the next workload, so noise hits all of them alike; the table shows
the median over the rounds, and ratios of medians.

CPU time still moves by 10-15% between runs on a shared machine (the
gateway saturates a core, and how much it batches depends on what else
runs). --instructions N counts instead the instructions the gateway
executes in user space for N requests (valgrind's callgrind, zeroed after
a warm-up and dumped after the N requests; a few clients, one request at a
time each): the same from run to run to within about 1%. It leaves out the
kernel's part (the socket reads and writes, which are the same two of each
per request for every version of smg), so it is the measure for a change
to smg's own code. valgrind must be installed (Debian package valgrind).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

from load import (GatewayProc, Workers, chat_bodies, gateway_args, gateway_commands, generate_bodies, lua_script,
                  run_wrk, start_fleet)

WORKLOADS = ("generate-cache_aware", "generate-round_robin", "chat-stream", "pd", "prompt-32k")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[11], [12]: utime, stime (the 14th and 15th of stat)
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        todo.extend(children.get(p, ()))
    return total


def large_prompts(seed: int = 11, size: int = 32 * 1024) -> list[str]:
    """`size`-character prompts: 8 shared prefixes of 7/8 of that, varied tails."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()

    def text(n: int) -> str:
        out = []
        while sum(len(w) + 1 for w in out) < n:
            out.append(rng.choice(words))
        return " ".join(out)[:n]
    prefixes = [f"[big{p}] " + text(size * 7 // 8) for p in range(8)]
    return [p + " " + text(size // 8) for p in prefixes for _ in range(8)]


def measure(name: str, command: list[str], extra: list[str], workload: str, workers: Workers, pd, scripts: dict,
            args) -> dict:
    gw_workload = "generate-cache_aware" if workload == "prompt-32k" else workload
    gw = GatewayProc(name, command, gateway_args(gw_workload, workers, pd) + extra)
    try:
        gw.wait_ready()
        path, script = scripts[workload]
        url = f"http://127.0.0.1:{gw.port}{path}"
        run_wrk(url, script, args.warmup, args.connections, args.threads)
        before = tree_cpu_seconds(gw.proc.pid)
        r = run_wrk(url, script, args.duration, args.connections, args.threads)
        cpu = tree_cpu_seconds(gw.proc.pid) - before
        done = r["requests"]
        return {"gateway": name, "workload": workload, "requests": done, "errors": r["errors"], "rps": r["rps"],
                "cpu_seconds": cpu, "cpu_us_per_request": cpu / done * 1e6 if done else float("nan")}
    finally:
        gw.stop()


def callgrind_instructions(out_prefix: str, pid: int) -> int:
    """Dump the running callgrind's counters and return the instructions
    counted since they were last zeroed."""
    before = set(os.listdir(os.path.dirname(out_prefix)))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True, timeout=60)
    new = [f for f in os.listdir(os.path.dirname(out_prefix)) if f not in before
           and f.startswith(os.path.basename(out_prefix))]
    if not new:
        raise RuntimeError("callgrind wrote no dump")
    with open(os.path.join(os.path.dirname(out_prefix), new[0])) as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError("no summary line in the callgrind dump")


def send_requests(port: int, path: str, bodies: list[str], count: int, clients: int) -> int:
    """`count` requests over `clients` keep-alive connections, each waiting
    for its answer (streamed ones read to the end); returns the non-2xx count."""
    def client(k: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        bad = 0
        for i in range(k, count, clients):
            conn.request("POST", path, bodies[i % len(bodies)], {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            bad += not 200 <= r.status < 300
        conn.close()
        return bad
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(client, range(clients)))


def measure_instructions(name: str, command: list[str], extra: list[str], workload: str, workers: Workers, pd,
                         bodies: dict, args) -> dict:
    tmp = tempfile.mkdtemp(prefix="smg-callgrind-")
    out = os.path.join(tmp, "cg")
    traced = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *command]
    gw_workload = "generate-cache_aware" if workload == "prompt-32k" else workload
    gw = GatewayProc(name, traced, gateway_args(gw_workload, workers, pd) + extra)
    try:
        gw.wait_ready(timeout=180)
        path, body_list = bodies[workload]
        send_requests(gw.port, path, body_list, args.instructions // 4 + 100, 4)
        subprocess.run(["callgrind_control", "--zero", str(gw.proc.pid)], check=True, capture_output=True,
                       timeout=60)
        errors = send_requests(gw.port, path, body_list, args.instructions, 4)
        ir = callgrind_instructions(out, gw.proc.pid)
        return {"gateway": name, "workload": workload, "requests": args.instructions, "errors": errors,
                "instructions_per_request": ir / args.instructions}
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.environ.get("SMG_REFERENCE"))
    ap.add_argument("--baseline", help="another smg checkout, built in place, measured as 'baseline'")
    ap.add_argument("--duration", type=int, default=8, help="seconds measured per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4, help="fake workers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--gateway-arg", action="append", default=[],
                    help="an extra argument for every smg and baseline gateway (repeat it)")
    ap.add_argument("--instructions", type=int, metavar="N",
                    help="count user-space instructions per request over N requests (callgrind) instead of CPU time")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.instructions:
        if not shutil.which("callgrind_control"):
            raise SystemExit("valgrind is needed for --instructions: apt-get install valgrind")
    elif not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")

    tmp = tempfile.mkdtemp(prefix="smg-cpu-")
    scripts = {}
    bodies = {}
    small = generate_bodies()
    lua_script("/generate", small, os.path.join(tmp, "generate.lua"))
    for w in ("generate-cache_aware", "generate-round_robin", "pd"):
        scripts[w] = ("/generate", os.path.join(tmp, "generate.lua"))
        bodies[w] = ("/generate", small)
    chat = chat_bodies()
    lua_script("/v1/chat/completions", chat, os.path.join(tmp, "chat.lua"))
    scripts["chat-stream"] = ("/v1/chat/completions", os.path.join(tmp, "chat.lua"))
    bodies["chat-stream"] = ("/v1/chat/completions", chat)
    big = [json.dumps({"text": t, "sampling_params": {"max_new_tokens": 8}}) for t in large_prompts()]
    lua_script("/generate", big, os.path.join(tmp, "big.lua"))
    scripts["prompt-32k"] = ("/generate", os.path.join(tmp, "big.lua"))
    bodies["prompt-32k"] = ("/generate", big)

    gateways = gateway_commands(args)
    workers, pd = start_fleet(args.workers, workloads)
    results = []
    try:
        for rnd in range(args.rounds):
            for workload in workloads:
                # alternate the order from round to round: no gateway always runs first
                order = gateways if rnd % 2 == 0 else list(reversed(gateways))
                for name, cmd in order:
                    extra = [] if name == "reference" else args.gateway_arg
                    if args.instructions:
                        r = measure_instructions(name, cmd, extra, workload, workers, pd, bodies, args)
                        print(f"  round {rnd + 1} {name:9s} {workload:22s} {r['instructions_per_request']:9.0f} "
                              f"instructions/request  errors {r['errors']}", file=sys.stderr, flush=True)
                    else:
                        r = measure(name, cmd, extra, workload, workers, pd, scripts, args)
                        print(f"  round {rnd + 1} {name:9s} {workload:22s} {r['cpu_us_per_request']:8.1f} us "
                              f"CPU/request  {r['rps']:8.0f} req/s  errors {r['errors']}", file=sys.stderr, flush=True)
                    results.append(r)
    finally:
        workers.stop()
        if pd:
            pd[0].stop()
            pd[1].stop()

    def median(name: str, workload: str, key: str):
        vals = [r[key] for r in results if r["gateway"] == name and r["workload"] == workload]
        return statistics.median(vals) if vals else None

    if args.instructions:
        key, title = "instructions_per_request", "user-space instructions/request"
        print(f"\n{args.instructions} requests per run (4 clients), callgrind, {args.workers} fake workers, "
              f"median of {args.rounds} round(s)\n")
    else:
        key, title = "cpu_us_per_request", "CPU us/request"
        print(f"\n{args.connections} connections, {args.duration} s per run, {args.workers} fake workers, "
              f"median of {args.rounds} round(s)\n")
    print(f"| workload | gateway | {title} | each round | ours/ref | ours/baseline |")
    print("|---|---|---:|---|---:|---:|")
    for workload in workloads:
        ours = median("smg", workload, key)
        ref = median("reference", workload, key)
        base = median("baseline", workload, key)
        for name, _ in gateways:
            value = median(name, workload, key)
            if value is None:
                continue
            rounds = ", ".join(f"{r[key]:.0f}" for r in results if r["gateway"] == name and r["workload"] == workload)
            vs_ref = f"{ours / ref:.2f}" if name == "smg" and ref else ""
            vs_base = f"{ours / base:.2f}" if name == "smg" and base else ""
            print(f"| {workload} | {name} | {value:.0f} | {rounds} | {vs_ref} | {vs_base} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
