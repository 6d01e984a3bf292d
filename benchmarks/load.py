"""End-to-end load benchmark: smg against the Rust reference, same machine,
same fake workers, same load, one table.

    .venv/bin/python benchmarks/load.py --reference /path/to/venv/bin/smg

The reference is `smg==1.13.0` from PyPI, installed in its own virtual
environment (both packages are named smg):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install smg==1.13.0

Without --reference (or $SMG_REFERENCE) only smg is measured. --baseline DIR
also measures another checkout of smg, built in place (`python setup.py
build_ext --inplace`), e.g. the commit before a change:

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && ../main/.venv/bin/python setup.py build_ext --inplace)
    .venv/bin/python benchmarks/load.py --baseline /tmp/before
 Load comes
from wrk (Debian package `wrk`); the two gateways are driven alternately,
each after a warm-up, so that noise on this shared machine hits both.

Workloads:
  generate-cache_aware  /generate, ~1 KB prompts from 8 shared prefixes
  generate-round_robin  the same prompts, round_robin
  chat-stream           streamed /v1/chat/completions (8 SSE events each)
  pd                    /generate through prefill/decode disaggregation
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIXES = 8
SUFFIXES = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: Optional[dict] = None, timeout: float = 5.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def prompts(seed: int = 7) -> list[str]:
    """~1 KB prompts: 8 shared ~800-character prefixes, each with varied ~200-character suffixes."""
    rng = random.Random(seed)
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
             "tau upsilon phi chi psi omega").split()
    out = []
    for p in range(PREFIXES):
        prefix = f"[p{p}] " + " ".join(rng.choice(words) for _ in range(140))[:800]
        for _ in range(SUFFIXES):
            suffix = " ".join(rng.choice(words) for _ in range(40))[:200]
            out.append(prefix + " " + suffix)
    rng.shuffle(out)
    return out


def lua_script(path: str, bodies: list[str], out: str) -> None:
    """A wrk script that cycles through the bodies (a random start per thread)."""
    with open(out, "w") as f:
        f.write("local bodies = {\n")
        for b in bodies:
            f.write("  " + json.dumps(b).replace("\\u", "\\\\u") + ",\n")
        f.write("}\n")
        f.write(f'local path = "{path}"\n')
        f.write("""local i = 0
local headers = {["Content-Type"] = "application/json"}
function setup(thread) thread:set("start", math.random(1, #bodies)) end
function init(args) i = start or 1 end
function request()
  i = (i % #bodies) + 1
  return wrk.format("POST", path, headers, bodies[i])
end
""")


@dataclass
class Result:
    gateway: str
    workload: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    requests: int = 0
    affinity: Optional[float] = None
    balance: str = ""
    worker_counts: list = field(default_factory=list)


def parse_latency(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def run_wrk(url: str, script: str, duration: int, connections: int, threads: int,
            prefix: Optional[list[str]] = None) -> dict:
    """prefix: a command wrk runs under (e.g. taskset -c 2-3)."""
    out = subprocess.run([*(prefix or []), "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script, url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    res = {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": 0, "requests": 0, "raw": out}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        res["p50"] = parse_latency(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        res["p99"] = parse_latency(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        res["requests"] = int(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        res["errors"] += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res["errors"] += sum(int(x) for x in m.groups())
    return res


class Workers:
    """Fake workers in their own process (so their CPU is not the gateway's)."""

    def __init__(self, count: int, role: str = "regular", stream_chunks: int = 8, parse: bool = True,
                 extra: tuple[str, ...] = ()):
        self.port = free_port()
        while any(not _port_free(self.port + i) for i in range(count)):
            self.port = free_port()
        self.count = count
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smg.testing", "--port", str(self.port), "--count", str(count), "--role", role,
             "--stream-chunks", str(stream_chunks), *([] if parse else ["--no-parse"]), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        self.urls = [f"http://127.0.0.1:{self.port + i}" for i in range(count)]
        for u in self.urls:
            wait_until(lambda u=u: http_json(u + "/_fake/stats") is not None, 10, f"fake worker {u}")

    def reset(self) -> None:
        for u in self.urls:
            http_json(u + "/_fake/reset_stats", {})

    def stats(self) -> list[dict]:
        return [http_json(u + "/_fake/stats") for u in self.urls]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# where `python -m smg` runs for each gateway name (its smg package is the one imported)
CHECKOUTS = {"smg": ROOT}


class GatewayProc:
    def __init__(self, name: str, command: list[str], args: list[str]):
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        full = command + ["--host", "127.0.0.1", "--port", str(self.port), "--prometheus-port",
                          str(self.metrics_port), "--log-level", "warn", *args]
        # both packages are named smg: never let this checkout leak into the reference
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(full, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=CHECKOUTS.get(name, "/"))

    def wait_ready(self, timeout: float = 60) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited; log in {self.log.name}")
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readiness", timeout=1) as r:
                return r.status == 200
        wait_until(ready, timeout, f"{self.name} readiness")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def start_gateways(setup: str, name: str, command: list[str], args: list[str]) -> list[GatewayProc]:
    """The entry points of a setup: "1-gateway", "2-gateways" (two independent
    gateways, same arguments) or "workers-2" (one gateway, --workers 2)."""
    if setup == "2-gateways":
        return [GatewayProc(name, command, args), GatewayProc(name, command, args)]
    if setup == "workers-2":
        return [GatewayProc(name, command, args + ["--workers", "2"])]
    return [GatewayProc(name, command, args)]


WORKLOADS = ("generate-cache_aware", "generate-round_robin", "chat-stream", "pd")


def generate_bodies() -> list[str]:
    """The /generate request bodies of the generate and pd workloads."""
    return [json.dumps({"text": t, "sampling_params": {"max_new_tokens": 8}}) for t in prompts()]


def chat_bodies() -> list[str]:
    """The streamed /v1/chat/completions request bodies of chat-stream."""
    return [json.dumps({"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": t}]})
            for t in prompts()[:256]]


def gateway_commands(args) -> list[tuple[str, list[str]]]:
    """(name, command) of each gateway to measure: this checkout, then
    --baseline's checkout and the reference where given."""
    gateways = [("smg", [sys.executable, "-m", "smg"])]
    if args.baseline:
        CHECKOUTS["baseline"] = os.path.abspath(args.baseline)
        gateways.append(("baseline", [sys.executable, "-m", "smg"]))
    if args.reference:
        gateways.append(("reference", [args.reference, "launch"]))
    return gateways


def start_fleet(count: int, workloads: list[str]) -> tuple[Workers, Optional[tuple[Workers, Workers]]]:
    """`count` fake workers, and for the pd workload half as many prefill and
    decode workers."""
    workers = Workers(count)
    pd = None
    if "pd" in workloads:
        pd = (Workers(max(1, count // 2), role="prefill"), Workers(max(1, count // 2), role="decode"))
    return workers, pd


def gateway_args(workload: str, workers: Workers, pd: Optional[tuple[Workers, Workers]]) -> list[str]:
    if workload == "pd":
        prefill, decode = pd
        args = ["--pd-disaggregation", "--policy", "round_robin"]
        for u in prefill.urls:
            args += ["--prefill", u, "none"]
        for u in decode.urls:
            args += ["--decode", u]
        return args
    policy = "cache_aware" if workload == "generate-cache_aware" else "round_robin"
    return ["--policy", policy, "--worker-urls", *workers.urls]


def measure(name: str, command: list[str], workload: str, workers: Workers, pd, scripts: dict, args) -> Result:
    gw = GatewayProc(name, command, gateway_args(workload, workers, pd))
    try:
        gw.wait_ready()
        path, script = scripts[workload]
        url = f"http://127.0.0.1:{gw.port}{path}"
        run_wrk(url, script, args.warmup, args.connections, args.threads)
        serving = pd[1] if workload == "pd" else workers
        serving.reset()
        r = run_wrk(url, script, args.duration, args.connections, args.threads)
        res = Result(name, workload, r["rps"], r["p50"], r["p99"], r["errors"], r["requests"])
        stats = serving.stats()
        counts = [sum(s["requests"].get(p, 0) for p in ("/generate", "/v1/chat/completions")) for s in stats]
        res.worker_counts = counts
        mean = sum(counts) / len(counts) if counts else 0
        if mean:
            res.balance = f"{min(counts) / mean:.2f}-{max(counts) / mean:.2f}"
        if workload.startswith("generate"):
            tags: dict[str, list[int]] = {}
            for i, s in enumerate(stats):
                for tag, n in s["tags"].items():
                    tags.setdefault(tag, [0] * len(stats))[i] += n
            total = sum(sum(v) for v in tags.values())
            if total:
                res.affinity = sum(max(v) for v in tags.values()) / total
        if r["requests"] == 0:
            print(r["raw"], file=sys.stderr)
        return res
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.environ.get("SMG_REFERENCE"),
                    help="the reference's smg executable (in its own venv); also $SMG_REFERENCE")
    ap.add_argument("--baseline", help="another smg checkout, built in place, measured as 'baseline'")
    ap.add_argument("--duration", type=int, default=10, help="seconds measured per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4, help="fake workers")
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours/reference this many times")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")

    tmp = tempfile.mkdtemp(prefix="smg-bench-")
    scripts = {}
    lua_script("/generate", generate_bodies(), os.path.join(tmp, "generate.lua"))
    scripts["generate-cache_aware"] = scripts["generate-round_robin"] = scripts["pd"] = (
        "/generate", os.path.join(tmp, "generate.lua"))
    lua_script("/v1/chat/completions", chat_bodies(), os.path.join(tmp, "chat.lua"))
    scripts["chat-stream"] = ("/v1/chat/completions", os.path.join(tmp, "chat.lua"))

    gateways = gateway_commands(args)
    workers, pd = start_fleet(args.workers, workloads)
    results: list[Result] = []
    try:
        for _ in range(args.rounds):
            for workload in workloads:
                for name, cmd in gateways:
                    res = measure(name, cmd, workload, workers, pd, scripts, args)
                    results.append(res)
                    print(f"  {name:9s} {workload:22s} {res.rps:9.0f} req/s  p50 {res.p50_ms:6.2f} ms  "
                          f"p99 {res.p99_ms:6.2f} ms  errors {res.errors}", file=sys.stderr, flush=True)
    finally:
        workers.stop()
        if pd:
            pd[0].stop()
            pd[1].stop()
    print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=2)


def print_table(results: list[Result], args) -> None:
    def best(name: str, workload: str) -> Optional[Result]:
        rs = [r for r in results if r.gateway == name and r.workload == workload]
        if not rs:
            return None
        # the median run by throughput
        rs.sort(key=lambda r: r.rps)
        return rs[len(rs) // 2]

    print(f"\n{args.connections} connections, {args.duration} s per run, {args.workers} fake workers, "
          f"{args.rounds} round(s)\n")
    print("| workload | gateway | req/s | p50 ms | p99 ms | errors | prefix affinity | worker load (min-max / mean) "
          "| ours/ref req/s | ours/baseline req/s |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for workload in dict.fromkeys(r.workload for r in results):
        ours = best("smg", workload)
        ref = best("reference", workload)
        base = best("baseline", workload)
        for r in (ours, base, ref):
            if r is None:
                continue
            ratio = f"{ours.rps / ref.rps:.2f}" if (r is ours and ref and ref.rps) else ""
            vs_base = f"{ours.rps / base.rps:.2f}" if (r is ours and base and base.rps) else ""
            aff = f"{r.affinity:.3f}" if r.affinity is not None else ""
            print(f"| {workload} | {r.gateway} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {aff} "
                  f"| {r.balance} | {ratio} | {vs_base} |")


if __name__ == "__main__":
    main()
