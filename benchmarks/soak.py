"""Soak: a long run at high load while pods and workers churn.

    .venv/bin/python benchmarks/soak.py --minutes 10

The gateway discovers 4 fake worker pods from the emulated API server of the
tests (cache_aware routing, ~1 KB prompts from 8 prefixes). wrk drives 32
connections in one-minute segments; meanwhile a churn thread, every few
seconds, deletes a pod and re-creates it (new uid, same IP), or makes a
worker fail its health checks for a while. After each minute the table gets
requests per second, p50/p99, errors and the gateway's RSS; the summary
compares the last minute with the first (RSS growth, p99 drift).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from helpers import free_port, request  # noqa: E402
from k8s_api import ApiServer, make_pod  # noqa: E402
from load import lua_script, prompts, run_wrk  # noqa: E402

from smg.testing import FakeWorker  # noqa: E402

LABELS = {"app": "sglang-worker"}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Churn(threading.Thread):
    def __init__(self, api: ApiServer, pods: list[dict], workers: list[FakeWorker], period: float):
        super().__init__(daemon=True)
        self.api = api
        self.pods = pods
        self.workers = workers
        self.period = period
        self.stop = threading.Event()
        self.events = {"pod_recreated": 0, "worker_unhealthy": 0}

    def run(self) -> None:
        rng = random.Random(11)
        while not self.stop.wait(self.period):
            i = rng.randrange(len(self.pods))
            if rng.random() < 0.7:
                old = self.pods[i]
                self.api.delete(old)
                time.sleep(0.5)
                new = make_pod(old["metadata"]["name"], old["status"]["podIP"], LABELS)
                self.api.add(new)
                self.pods[i] = new
                self.events["pod_recreated"] += 1
            else:
                w = self.workers[i]
                w.set(healthy=False)
                time.sleep(3)
                w.set(healthy=True)
                self.events["worker_unhealthy"] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--segment", type=int, default=60, help="seconds per measured segment")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--churn-period", type=float, default=5.0)
    ap.add_argument("--json", help="write the per-segment results here")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")

    api = ApiServer().start()
    port = free_port("127.0.0.2")
    workers = [FakeWorker(f"127.0.0.{i}", port).start() for i in range(2, 6)]
    pods = [api.add(make_pod(f"sglang-worker-{i}", w.host, LABELS)) for i, w in enumerate(workers)]
    gw_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(api.env)
    log = open(os.path.join(tempfile.gettempdir(), "soak-smg.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "smg", "--host", "127.0.0.1", "--port", str(gw_port), "--prometheus-port",
         str(metrics_port), "--service-discovery", "--selector", "app=sglang-worker", "--service-discovery-namespace",
         "inference", "--service-discovery-port", str(port), "--health-check-interval-secs", "1",
         "--health-failure-threshold", "2", "--health-success-threshold", "1", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    tmp = tempfile.mkdtemp(prefix="smg-soak-")
    script = os.path.join(tmp, "generate.lua")
    lua_script("/generate", [json.dumps({"text": t}) for t in prompts()], script)
    rows = []
    churn = Churn(api, pods, workers, args.churn_period)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                workers_ready = [w for w in request(gw_port, "GET", "/workers", timeout=2).json()["workers"]
                                 if w["status"] == "ready"]
                if len(workers_ready) == len(workers):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not discover its workers")
            time.sleep(0.1)
        run_wrk(f"http://127.0.0.1:{gw_port}/generate", script, 10, args.connections, 2)  # warm-up
        churn.start()
        print("| minute | req/s | p50 ms | p99 ms | errors | RSS MB |", flush=True)
        print("|---:|---:|---:|---:|---:|---:|", flush=True)
        segments = max(1, args.minutes * 60 // args.segment)
        for i in range(segments):
            r = run_wrk(f"http://127.0.0.1:{gw_port}/generate", script, args.segment, args.connections, 2)
            row = {"segment": i + 1, "rps": r["rps"], "p50": r["p50"], "p99": r["p99"], "errors": r["errors"],
                   "requests": r["requests"], "rss_mb": rss_mb(proc.pid)}
            rows.append(row)
            print(f"| {i + 1} | {row['rps']:.0f} | {row['p50']:.2f} | {row['p99']:.2f} | {row['errors']} "
                  f"| {row['rss_mb']:.1f} |", flush=True)
    finally:
        churn.stop.set()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for w in workers:
            w.stop()
        api.stop()
    first, last = rows[0], rows[-1]
    total = sum(r["requests"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    print(f"\n{total} requests, {errors} errors; churn: {churn.events}")
    print(f"RSS {first['rss_mb']:.1f} MB after minute 1 -> {last['rss_mb']:.1f} MB at the end "
          f"({100 * (last['rss_mb'] / first['rss_mb'] - 1):+.1f}%)")
    print(f"p99 {first['p99']:.2f} ms in minute 1 -> {last['p99']:.2f} ms in the last "
          f"({100 * (last['p99'] / first['p99'] - 1):+.1f}%)")
    print(f"gateway exit code after SIGTERM: {proc.returncode}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "churn": churn.events}, f, indent=2)


if __name__ == "__main__":
    main()
