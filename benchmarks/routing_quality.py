"""Routing quality on a simulated fleet: time to first token and cache hit
rate, through one gateway or several, against the reference.

    .venv/bin/python benchmarks/routing_quality.py [--reference /tmp/ref/bin/smg]

The fleet is 8 fake workers in --simulate mode (smg.simulated_engine; the
model is described in docs/fleet-simulator.md): each has a finite prefix
cache, one prefill at a time whose length grows with the uncached part of
the prompt, and batched decode. Seeded open-loop workloads:

  shared-prompts   24 system prompts (3-8 KB, Zipf popularity) + a unique question
  multi-turn       48 conversations of 8 turns over 6 system prompts; each turn's
                   prompt is the whole conversation so far; turns follow answers
                   after a think time
  long-documents   12 documents (16-48 KB, Zipf popularity) + a unique question

Setups: 1-gateway; 2-gateways (two independent gateways, each request to
one of them at random, as a Service spreads them); workers-2 (one gateway,
--workers 2). Reported: TTFT p50/p99 as the client sees it, the fleet's
cache hit rate (cached / prompt characters, from the workers) and the
workload's ideal hit rate (every prompt served where its longest
previously seen prefix is cached, unlimited cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time

from load import _port_free, free_port, http_json, start_gateways, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smg.simulated_engine import EngineModel, block_keys  # noqa: E402

WORKLOADS = ("shared-prompts", "multi-turn", "long-documents")
SETUPS = ("1-gateway", "2-gateways", "workers-2")
WORDS = ("the of and to in is was for on that with as by at from this be are or an which it not have has "
         "model token cache prefix worker request route gateway latency batch prefill decode kernel memory "
         "tensor layer head attention query key value context window stream server client replica").split()


def text(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


class Fleet:
    """Simulated workers in their own process."""

    def __init__(self, count: int, args):
        self.port = free_port()
        while any(not _port_free(self.port + i) for i in range(count)):
            self.port = free_port()
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smg.testing", "--port", str(self.port), "--count", str(count), "--simulate",
             "--sim-cache-chars", str(args.cache_chars), "--sim-prefill-chars-per-sec", str(args.prefill_rate)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        self.urls = [f"http://127.0.0.1:{self.port + i}" for i in range(count)]
        for u in self.urls:
            wait_until(lambda u=u: http_json(u + "/_fake/stats") is not None, 10, f"simulated worker {u}")

    def reset(self) -> None:
        for u in self.urls:
            http_json(u + "/flush_cache", {})
            http_json(u + "/_fake/reset_stats", {})

    def hit_rate(self) -> float:
        stats = [http_json(u + "/_fake/stats")["engine"] for u in self.urls]
        prompt = sum(s["prompt_chars"] for s in stats)
        return sum(s["cached_chars"] for s in stats) / prompt if prompt else float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# --- workloads: lists of "sessions", each a start time and a list of (prompt, think time before it) ---

def arrivals(rng: random.Random, duration: float, rate: float):
    """Poisson arrival times in [0, duration)."""
    t = rng.expovariate(rate)
    while t < duration:
        yield t
        t += rng.expovariate(rate)


def shared_prompts(rng: random.Random, duration: float, rate: float) -> list:
    systems = [f"[sys{i}] " + text(rng, rng.randint(3000, 8000)) for i in range(24)]
    weights = zipf_weights(len(systems), 1.1)
    return [(t, [(rng.choices(systems, weights)[0] + " Q: " + text(rng, rng.randint(200, 600)), 0.0)])
            for t in arrivals(rng, duration, rate)]


def long_documents(rng: random.Random, duration: float, rate: float) -> list:
    docs = [f"[doc{i}] " + text(rng, rng.randint(16000, 48000)) for i in range(12)]
    weights = zipf_weights(len(docs), 1.0)
    return [(t, [(rng.choices(docs, weights)[0] + " Question: " + text(rng, rng.randint(100, 300)), 0.0)])
            for t in arrivals(rng, duration, rate)]


def multi_turn(rng: random.Random, duration: float, rate: float, conversations: int = 48, turns: int = 8) -> list:
    systems = [f"[chat{i}] " + text(rng, rng.randint(2000, 4000)) for i in range(6)]
    sessions = []
    for c in range(conversations):
        start = rng.uniform(0, duration / 2)
        history = rng.choice(systems) + f" conversation {c}:"
        prompts = []
        for _ in range(turns):
            history += " USER: " + text(rng, rng.randint(150, 400))
            prompts.append((history, rng.expovariate(1 / 0.3)))
            history += " ASSISTANT: " + text(rng, rng.randint(300, 800))
        sessions.append((start, prompts))
    return sessions


def build(workload: str, seed: int, duration: float, rate: float) -> list:
    rng = random.Random(f"{workload}-{seed}")
    if workload == "shared-prompts":
        return shared_prompts(rng, duration, rate)
    if workload == "long-documents":
        return long_documents(rng, duration, rate / 4)
    return multi_turn(rng, duration, rate)


def ideal_hit_rate(prompts_in_order: list[str], block_chars: int) -> float:
    seen: set[int] = set()
    prompt = cached = 0
    for p in prompts_in_order:
        keys = block_keys(p, block_chars)
        n = 0
        while n < len(keys) and keys[n] in seen:
            n += 1
        seen.update(keys)
        prompt += len(p)
        cached += min(n * block_chars, len(p))
    return cached / prompt if prompt else float("nan")


# --- the client ---

async def one_request(port: int, prompt: str, tokens: int) -> float:
    """Time to the first streamed token, in seconds (raises on failure)."""
    body = json.dumps({"text": prompt, "stream": True, "sampling_params": {"max_new_tokens": tokens}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /generate HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(status.decode(errors="replace").strip())
        buf = b""
        while b"data: " not in buf:
            chunk = await reader.read(65536)
            if not chunk:
                raise RuntimeError("closed before the first token")
            buf += chunk
        ttft = time.perf_counter() - t0
        while await reader.read(65536):
            pass
        return ttft
    finally:
        writer.close()


async def drive(sessions: list, ports: list[int], seed: int, tokens: int) -> tuple[list[float], int, list[str]]:
    rng = random.Random(seed)
    ttfts: list[float] = []
    sent: list[str] = []
    errors = 0
    t0 = time.perf_counter()

    async def session(start: float, prompts: list) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, start - (time.perf_counter() - t0)))
        for prompt, think in prompts:
            if think:
                await asyncio.sleep(think)
            sent.append(prompt)
            try:
                ttfts.append(await one_request(rng.choice(ports), prompt, tokens))
            except (OSError, RuntimeError):
                errors += 1

    await asyncio.gather(*(session(start, prompts) for start, prompts in sessions))
    return ttfts, errors, sent


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def measure(name: str, command: list[str], setup: str, workload: str, fleet: Fleet, args) -> dict:
    base = ["--policy", "cache_aware", "--worker-urls", *fleet.urls]
    gateways = start_gateways(setup, name, command, base)
    try:
        for g in gateways:
            g.wait_ready()
        fleet.reset()
        sessions = build(workload, args.seed, args.duration, args.rate)
        ttfts, errors, sent = asyncio.run(drive(sessions, [g.port for g in gateways], args.seed, args.tokens))
        return {"gateway": name, "setup": setup, "workload": workload, "requests": len(ttfts), "errors": errors,
                "ttft_p50_ms": pct(ttfts, 0.5) * 1000, "ttft_p99_ms": pct(ttfts, 0.99) * 1000,
                "hit_rate": fleet.hit_rate(), "ideal_hit_rate": ideal_hit_rate(sent, EngineModel.block_chars)}
    finally:
        for g in gateways:
            g.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.environ.get("SMG_REFERENCE"))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per run")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second (shared prompts)")
    ap.add_argument("--workers", type=int, default=8, help="simulated workers")
    ap.add_argument("--cache-chars", type=int, default=1 << 19, help="prefix cache per worker")
    ap.add_argument("--prefill-rate", type=float, default=400_000.0, help="prefill characters per second")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    setups = [s for s in args.setups.split(",") if s]
    gateways = [("smg", [sys.executable, "-m", "smg"])]
    if args.reference:
        gateways.append(("reference", [args.reference, "launch"]))
    fleet = Fleet(args.workers, args)
    results = []
    try:
        for workload in workloads:
            for setup in setups:
                for name, cmd in gateways:
                    if setup == "workers-2" and name != "smg":
                        continue
                    r = measure(name, cmd, setup, workload, fleet, args)
                    results.append(r)
                    print(f"  {workload:15s} {setup:11s} {name:9s} TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
                          f"p99 {r['ttft_p99_ms']:7.1f} ms  hit rate {r['hit_rate']:.3f} "
                          f"(ideal {r['ideal_hit_rate']:.3f})  requests {r['requests']}  errors {r['errors']}",
                          file=sys.stderr, flush=True)
    finally:
        fleet.stop()
    print(f"\n{args.workers} simulated workers, {args.duration:.0f} s of arrivals per run, seed {args.seed}\n")
    print("| workload | setup | gateway | TTFT p50 ms | TTFT p99 ms | hit rate | ideal | requests | errors |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['workload']} | {r['setup']} | {r['gateway']} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} "
              f"| {r['hit_rate']:.3f} | {r['ideal_hit_rate']:.3f} | {r['requests']} | {r['errors']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
