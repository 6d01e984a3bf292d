"""The gateway's memory and file descriptors under hostile floods: many
clients at once (100 by default), each doing the same thing; the gateway's
peak RSS above its idle RSS while they do it, and its open file
descriptors once they have gone.

    .venv/bin/python benchmarks/floods.py [--clients 100]

Floods:
  refused-bodies  each client sends a 16 MB body to /generate without the
                  API key: refused on its headers (401), the body is never kept
  pipelined       each client has a slow streamed request pending and
                  pipelines 4 requests of 4 MB behind it: the gateway stops
                  reading the connection at a bound
  pd-logprobs     each client asks prefill/decode /generate for logprobs
                  while prefill takes 3 s to answer; decode's stream (several
                  MB) waits for prefill's logprobs: the gateway holds a bounded
                  part of it and stops reading the decode worker
  large-bodies    each client sends an 8 MB prompt to /generate (authorized),
                  once with round_robin (the body streams to the worker:
                  --max-buffered-request-bytes) and once with cache_aware
                  (the gateway must read the prompt, so it holds it whole)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load import GatewayProc, Workers  # noqa: E402


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def post_head(path: str, length: int, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path.encode(), length, extra))


def post(path: str, body: bytes) -> bytes:
    return post_head(path, len(body)) + body


class PeakSampler:
    """Samples a process's RSS every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.02)

    def finish(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def drain(s: socket.socket, seconds: float) -> None:
    s.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if not s.recv(1 << 16):
                return
        except socket.timeout:
            continue
        except OSError:
            return


def refused_body_client(port: int) -> None:
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        try:
            s.sendall(post_head("/generate", 16 << 20))
            for _ in range(16):
                s.sendall(chunk)
        except OSError:
            pass  # the gateway closed after its 401: fine
        drain(s, 1.0)


def pipelined_client(port: int, hold: float) -> None:
    body = b'{"text": "' + b"y" * (4 << 20) + b'"}'
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.settimeout(hold)
        try:
            s.sendall(post("/generate", b'{"text": "slow", "stream": true}'))
            for _ in range(4):
                s.sendall(post("/generate", body))
        except OSError:
            pass  # the gateway stopped reading: the send timed out
        drain(s, 0.5)


def pd_logprob_client(port: int, hold: float) -> None:
    body = json.dumps({"text": "x", "stream": True, "return_logprob": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(post("/generate", body))
        drain(s, hold)


def large_body_client(port: int) -> None:
    body = b'{"text": "' + b"z" * (8 << 20) + b'"}'
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(post_head("/generate", len(body)))
        view = memoryview(body)
        for i in range(0, len(body), 1 << 20):
            s.sendall(view[i:i + (1 << 20)])
        answer = b""
        while b"\r\n\r\n" not in answer:  # the answer's head: the request is done
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            answer += chunk


def flood(gw: GatewayProc, clients: int, target, *args) -> tuple[int, int, int, int]:
    """(idle RSS kB, peak RSS kB, fds before, fds after)."""
    pid = gw.proc.pid
    fds_before = open_fds(pid)
    idle = rss_kb(pid)
    sampler = PeakSampler(pid)
    threads = [threading.Thread(target=target, args=(gw.port, *args), daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    peak = sampler.finish()
    deadline = time.monotonic() + 30
    while open_fds(pid) > fds_before and time.monotonic() < deadline:
        time.sleep(0.1)
    return idle, peak, fds_before, open_fds(pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args()
    rows = []

    slow = Workers(1, stream_chunks=20, extra=("--stream-interval", "0.2"))
    gw = GatewayProc("smg", [sys.executable, "-m", "smg"], ["--api-key", "sekret", "--worker-urls", *slow.urls,
                                                           "--max-concurrent-requests", "1000"])
    try:
        gw.wait_ready()
        rows.append(("refused-bodies", *flood(gw, args.clients, refused_body_client)))
        # the pipelined flood is authorized
        gw.stop()
        gw = GatewayProc("smg", [sys.executable, "-m", "smg"], ["--worker-urls", *slow.urls,
                                                               "--max-concurrent-requests", "1000"])
        gw.wait_ready()
        rows.append(("pipelined", *flood(gw, args.clients, pipelined_client, 3.0)))
    finally:
        gw.stop()
        slow.stop()

    prefill = Workers(1, role="prefill", extra=("--response-delay", "3"))
    decode = Workers(1, role="decode", stream_chunks=500)
    gw = GatewayProc("smg", [sys.executable, "-m", "smg"],
                     ["--pd-disaggregation", "--prefill", prefill.urls[0], "none", "--decode", decode.urls[0],
                      "--max-concurrent-requests", "1000"])
    try:
        gw.wait_ready()
        rows.append(("pd-logprobs", *flood(gw, args.clients, pd_logprob_client, 5.0)))
    finally:
        gw.stop()
        prefill.stop()
        decode.stop()

    for policy in ("round_robin", "cache_aware"):
        worker = Workers(1)
        gw = GatewayProc("smg", [sys.executable, "-m", "smg"], ["--worker-urls", *worker.urls, "--policy", policy,
                                                               "--max-concurrent-requests", "1000"])
        try:
            gw.wait_ready()
            rows.append((f"large-bodies ({policy})", *flood(gw, args.clients, large_body_client)))
        finally:
            gw.stop()
            worker.stop()

    print(f"\n{args.clients} clients at once\n")
    print("| flood | idle RSS MB | peak above idle MB | fds before | fds after |")
    print("|---|---:|---:|---:|---:|")
    for name, idle, peak, before, after in rows:
        print(f"| {name} | {idle / 1024:.0f} | {(peak - idle) / 1024:.1f} | {before} | {after} |")


if __name__ == "__main__":
    main()
