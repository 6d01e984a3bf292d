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
  huge-prompt     one client sends one 100 MB prompt to /generate with the
                  API key, on each policy (--huge-mb sets the size)
  huge-pipelined  the same prompt pipelined behind a streaming request on
                  one connection (cache_aware)
  huge-pd         the same prompt through prefill/decode disaggregation
                  (round_robin, cache_aware)

"after" is the RSS above idle once the clients have gone and it has
settled (what the floods left held: buffers, the radix tree).

    .venv/bin/python benchmarks/floods.py --only huge-prompt,huge-pipelined
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
from smg.config import POLICIES  # noqa: E402


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


class InFlight:
    """Bytes the clients have sent whose answer has not arrived (sampled
    beside the RSS: a flood's "bytes in flight")."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes = 0
        self.peak = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n

    def reset(self) -> None:
        self.bytes = self.peak = 0


IN_FLIGHT = InFlight()


class PeakSampler:
    """Samples a process's RSS (and IN_FLIGHT) every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        IN_FLIGHT.reset()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            IN_FLIGHT.peak = max(IN_FLIGHT.peak, IN_FLIGHT.bytes)
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
        IN_FLIGHT.add(len(body))
        answer = b""
        while b"\r\n\r\n" not in answer:  # the answer's head: the request is done
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            answer += chunk
        IN_FLIGHT.add(-len(body))


def huge_prompt_client(port: int, megabytes: int, pipelined: bool) -> None:
    """One authorised prompt of `megabytes` MB (behind a streaming request
    on the same connection when `pipelined`); returns once it is answered."""
    body = b'{"text": "' + b"h" * (megabytes << 20) + b'"}'
    auth = b"Authorization: Bearer sekret\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        if pipelined:
            slow = b'{"text": "slow", "stream": true}'
            s.sendall(post_head("/generate", len(slow), auth) + slow)
        s.sendall(post_head("/generate", len(body), auth))
        view = memoryview(body)
        del body
        for i in range(0, len(view), 1 << 20):
            s.sendall(view[i:i + (1 << 20)])
        IN_FLIGHT.add(len(view))
        view.release()
        answer = b""
        expected = 2 if pipelined else 1
        while answer.count(b"HTTP/1.1 ") < expected or not answer.endswith(b"}"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            answer += chunk
        IN_FLIGHT.add(-(megabytes << 20) - 12)
        if answer.count(b"HTTP/1.1 200 ") != expected:
            print(f"huge prompt not answered 200: {answer[:300]!r}", file=sys.stderr)


def settled_rss_kb(pid: int, seconds: float = 3.0) -> int:
    """RSS once it has stopped falling (a freed buffer goes back in steps)."""
    last = rss_kb(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_kb(pid)
        if now >= last and time.monotonic() > deadline - seconds / 2:
            return now
        last = now
    return last


def flood(gw: GatewayProc, clients: int, target, *args) -> tuple[int, int, int, int, int, int]:
    """(idle RSS kB, peak RSS kB, settled RSS kB after, peak bytes in flight, fds before, fds after)."""
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
    return idle, peak, settled_rss_kb(pid), IN_FLIGHT.peak, fds_before, open_fds(pid)


def smg(args: list[str]) -> GatewayProc:
    gw = GatewayProc("smg", [sys.executable, "-m", "smg"], args + ["--max-concurrent-requests", "1000"])
    gw.wait_ready()
    return gw


def hostile_floods(clients: int, rows: list) -> None:
    slow = Workers(1, stream_chunks=20, extra=("--stream-interval", "0.2"))
    gw = None
    try:
        gw = smg(["--api-key", "sekret", "--worker-urls", *slow.urls])
        rows.append(("refused-bodies", *flood(gw, clients, refused_body_client)))
        gw.stop()
        gw = smg(["--worker-urls", *slow.urls])  # the pipelined flood is authorized
        rows.append(("pipelined", *flood(gw, clients, pipelined_client, 3.0)))
    finally:
        if gw is not None:
            gw.stop()
        slow.stop()


def pd_floods(clients: int, rows: list) -> None:
    prefill = Workers(1, role="prefill", extra=("--response-delay", "3"))
    decode = Workers(1, role="decode", stream_chunks=500)
    try:
        gw = smg(["--pd-disaggregation", "--prefill", prefill.urls[0], "none", "--decode", decode.urls[0]])
        try:
            rows.append(("pd-logprobs", *flood(gw, clients, pd_logprob_client, 5.0)))
        finally:
            gw.stop()
    finally:
        prefill.stop()
        decode.stop()


def large_body_floods(clients: int, rows: list) -> None:
    for policy in ("round_robin", "cache_aware"):
        # the worker answers 3 s after a body has arrived: most bodies are in flight at once
        worker = Workers(1, extra=("--response-delay", "3"))
        try:
            gw = smg(["--worker-urls", *worker.urls, "--policy", policy])
            try:
                rows.append((f"large-bodies ({policy})", *flood(gw, clients, large_body_client)))
            finally:
                gw.stop()
        finally:
            worker.stop()


def huge_prompt_floods(megabytes: int, rows: list, policies=POLICIES, pipelined: bool = False) -> None:
    workers = Workers(2, stream_chunks=20, extra=("--stream-interval", "0.1"))
    try:
        for policy in policies:
            gw = smg(["--api-key", "sekret", "--worker-urls", *workers.urls, "--policy", policy])
            try:
                name = f"huge-pipelined ({policy})" if pipelined else f"huge-prompt ({policy})"
                rows.append((name, *flood(gw, 1, huge_prompt_client, megabytes, pipelined)))
            finally:
                gw.stop()
    finally:
        workers.stop()


def huge_pd_floods(megabytes: int, rows: list) -> None:
    prefill = Workers(1, role="prefill")
    decode = Workers(1, role="decode")
    try:
        for policy in ("round_robin", "cache_aware"):
            gw = smg(["--api-key", "sekret", "--pd-disaggregation", "--prefill", prefill.urls[0], "none",
                      "--decode", decode.urls[0], "--policy", policy])
            try:
                rows.append((f"huge-pd ({policy})", *flood(gw, 1, huge_prompt_client, megabytes, False)))
            finally:
                gw.stop()
    finally:
        prefill.stop()
        decode.stop()


FLOODS = ("hostile", "pd-logprobs", "large-bodies", "huge-prompt", "huge-pipelined", "huge-pd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--huge-mb", type=int, default=100, help="the huge prompt's size in MB")
    ap.add_argument("--only", default=",".join(FLOODS),
                    help="comma-separated floods to run (hostile: refused-bodies and pipelined)")
    args = ap.parse_args()
    chosen = args.only.split(",")
    unknown = set(chosen) - set(FLOODS)
    if unknown:
        ap.error(f"unknown floods {sorted(unknown)}; choose from {', '.join(FLOODS)}")
    rows: list = []
    if "hostile" in chosen:
        hostile_floods(args.clients, rows)
    if "pd-logprobs" in chosen:
        pd_floods(args.clients, rows)
    if "large-bodies" in chosen:
        large_body_floods(args.clients, rows)
    if "huge-prompt" in chosen:
        huge_prompt_floods(args.huge_mb, rows)
    if "huge-pipelined" in chosen:
        huge_prompt_floods(args.huge_mb, rows, ("cache_aware",), pipelined=True)
    if "huge-pd" in chosen:
        huge_pd_floods(args.huge_mb, rows)

    print(f"\n{args.clients} clients at once (huge-*: 1 client, {args.huge_mb} MB)\n")
    print("| flood | idle RSS MB | peak above idle MB | after, above idle MB | peak bytes in flight MB "
          "| fds before | fds after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, idle, peak, after, in_flight, before, fds_after in rows:
        print(f"| {name} | {idle / 1024:.0f} | {(peak - idle) / 1024:.1f} | {(after - idle) / 1024:.1f} "
              f"| {in_flight / 2**20:.0f} | {before} | {fds_after} |" if in_flight else
              f"| {name} | {idle / 1024:.0f} | {(peak - idle) / 1024:.1f} | {(after - idle) / 1024:.1f} "
              f"| - | {before} | {fds_after} |")


if __name__ == "__main__":
    main()
