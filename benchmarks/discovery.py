"""Discovery benchmark: how fast pods become workers and stop getting traffic.

    .venv/bin/python benchmarks/discovery.py [--reference /path/to/venv/bin/smg]

Runs the emulated API server of the tests (tests/k8s_api.py, kmock based)
and fake workers on loopback pod IPs, then measures, for smg and (when
given) the Rust reference in the same run:

  ready -> routable   a Ready pod is added; time until /workers shows its
                      worker ready
  delete -> no traffic  while requests flow, a pod is deleted (or marked
                      terminating); time until its worker received its
                      last request
  1,000 pods          1,000 Ready pods exist before the gateway starts;
                      time from the gateway's first answer on /liveness
                      until all 1,000 workers are ready
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from helpers import free_port, request  # noqa: E402
from k8s_api import ApiServer, make_pod  # noqa: E402

from smg.testing import FakeWorker  # noqa: E402

LABELS = {"app": "sglang-worker"}
NS = "inference"


class Gateway:
    def __init__(self, name: str, command: list[str], port: int, env: dict):
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--prometheus-port", str(self.metrics_port),
                "--service-discovery", "--selector", "app=sglang-worker", "--service-discovery-namespace", NS,
                "--service-discovery-port", str(port), "--policy", "round_robin", "--log-level", "warn"]
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-discovery-{name}.log"), "w")
        self.started = time.monotonic()
        # both packages are named smg: never let this checkout leak into the reference
        full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        full_env.update(env)
        self.proc = subprocess.Popen(command + args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=ROOT if name == "smg" else "/")
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(self.port, "GET", "/liveness", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{name} did not start")
            time.sleep(0.01)
        self.live = time.monotonic()

    def workers(self) -> list[dict]:
        return request(self.port, "GET", "/workers", timeout=5).json()["workers"]

    def ready(self) -> set[str]:
        return {w["url"] for w in self.workers() if w.get("status") == "ready" or w.get("is_healthy")}

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def wait(cond, timeout: float, interval: float = 0.002) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError


def ready_to_routable(gw: Gateway, api: ApiServer, workers: list[FakeWorker], rounds: int) -> list[float]:
    # wait for the gateway's watch to be up: one pod, not timed
    warm = api.add(make_pod(f"warm-{gw.name}", workers[-1].host, LABELS))
    wait(lambda: workers[-1].url in gw.ready(), 60)
    api.delete(warm)
    wait(lambda: workers[-1].url not in {x["url"] for x in gw.workers()}, 60)
    out = []
    for i in range(rounds):
        w = workers[i % len(workers)]
        pod = make_pod(f"bench-{gw.name}-{i}", w.host, LABELS)
        t0 = time.monotonic()
        api.add(pod)
        t1 = wait(lambda w=w: w.url in gw.ready(), 30)
        out.append((t1 - t0) * 1000)
        api.delete(pod)
        wait(lambda w=w: w.url not in {x["url"] for x in gw.workers()}, 30)
    return out


def delete_to_no_traffic(gw: Gateway, api: ApiServer, workers: list[FakeWorker], rounds: int,
                         terminate: bool) -> list[float]:
    out = []
    stay, go = workers[0], workers[1]
    stay_pod = api.add(make_pod(f"stay-{gw.name}", stay.host, LABELS))
    wait(lambda: stay.url in gw.ready(), 30)
    for i in range(rounds):
        pod = api.add(make_pod(f"go-{gw.name}-{i}", go.host, LABELS))
        wait(lambda: go.url in gw.ready(), 30)
        stop = threading.Event()

        def traffic(stop=stop):
            while not stop.is_set():
                try:
                    request(gw.port, "POST", "/generate", {"text": "x", "model": "fake-model"}, timeout=10)
                except OSError:
                    pass

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        wait(lambda: go.stats.generation_requests > 0, 10)
        t0 = time.monotonic()
        if terminate:
            api.terminate(pod)
        else:
            api.delete(pod)
        time.sleep(8 if gw.name == "reference" else 2)  # long enough for either gateway
        stop.set()
        for t in threads:
            t.join()
        out.append(max(0.0, go.stats.last_request_at - t0) * 1000)
        if terminate:
            api.delete(pod)
        wait(lambda: go.url not in {x["url"] for x in gw.workers()}, 30)
    api.delete(stay_pod)
    return out


def thousand_pods(name: str, command: list[str], port: int, n: int) -> float:
    api = ApiServer().start()
    try:
        for i in range(n):
            api.add(make_pod(f"many-{i}", f"127.1.{i // 250}.{i % 250 + 1}", LABELS))
        gw = Gateway(name, command, port, api.env)
        try:
            t = wait(lambda: len(gw.ready()) >= n, 120, interval=0.05)
            return t - gw.live
        finally:
            gw.stop()
    finally:
        api.stop()


def summary(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return f"median {statistics.median(values):7.1f}  p90 {p90:7.1f}  max {values[-1]:7.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.environ.get("SMG_REFERENCE"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--pods", type=int, default=1000)
    args = ap.parse_args()
    gateways = [("smg", [sys.executable, "-m", "smg"])]
    if args.reference:
        gateways.append(("reference", [args.reference, "launch"]))

    port = free_port("127.0.0.2")
    workers = [FakeWorker(f"127.0.0.{i}", port).start() for i in range(2, 6)]
    # one worker on every other loopback address, for the 1,000 pods
    many = FakeWorker("0.0.0.0", free_port()).start()
    results: dict[str, dict[str, str]] = {}
    try:
        for name, cmd in gateways:
            api = ApiServer().start()
            gw = Gateway(name, cmd, port, api.env)
            try:
                r = {"ready -> routable (ms)": summary(ready_to_routable(gw, api, workers, args.rounds))}
                r["delete -> no new requests (ms)"] = summary(delete_to_no_traffic(gw, api, workers, max(3, args.rounds // 2), False))
                r["terminating -> no new requests (ms)"] = summary(delete_to_no_traffic(gw, api, workers, max(3, args.rounds // 2), True))
            finally:
                gw.stop()
                api.stop()
            r[f"{args.pods} pods from one list -> all ready (s)"] = f"{thousand_pods(name, cmd, many.port, args.pods):.2f}"
            results[name] = r
            for k, v in r.items():
                print(f"  {name:9s} {k:38s} {v}", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.stop()
        many.stop()
    print()
    names = list(results)
    print("| measurement | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in results[names[0]]:
        print(f"| {key} | " + " | ".join(results[n][key] for n in names) + " |")


if __name__ == "__main__":
    main()
