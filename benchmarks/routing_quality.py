"""Routing quality on a simulated fleet: time to first token and cache hit
rate, for smg (one gateway, two independent gateways, --workers 2) and the
reference (its cache_aware and round_robin), every workload in one command.

    .venv/bin/python benchmarks/routing_quality.py [--reference /tmp/ref/bin/smg]

The fleet is 8 fake workers in --simulate mode (smg.simulated_engine; the
model is described in docs/fleet-simulator.md): each has a finite prefix
cache, one prefill at a time whose length grows with the uncached part of
the prompt (20 us per character by default), and batched decode. Each
workload is seeded and sets the fleet's cache size; its rate is chosen so
that round_robin keeps the prefill queues busy (the utilisation column).

  shared-prompts     24 system prompts (3-8 KB, Zipf 1.1) + a unique question, Poisson
  multi-turn         96 short conversations (8 turns) over 6 shared system prompts
  long-multi-turn    80 conversations, each its own opening of ~2,000 characters,
                     growing ~500 characters a turn to 10-20k; turns follow answers
                     after a think time; a finished conversation is replaced by a new one
  long-documents     16 documents (16-48 KB, Zipf 1.0), many questions each
  mixed-bursty       shared prompts with 1 s bursts at 5x the mean rate every 5 s, a new
                     hot system prompt (40% of them) from the middle of the run, and 24
                     long conversations throughout
  eviction-pressure  64 long conversations and 24 documents (8-16 KB, Zipf 0.8): the
                     working set is about 1.8x the fleet's cache
  eviction-clear     eviction pressure at about 2.4x the fleet's cache, and one worker's
                     cache flushed in the middle of the run (not through the gateway)

--precise: the fleet caches token blocks of a tokenizer trained on the
workloads' vocabulary and publishes its KV-cache events (as SGLang and vLLM
do with --kv-events-config); every run of the workload sees that fleet, and
smg also runs in precise mode (--kv-events-port-offset: routed by what the
engines report holding) on one gateway and two. For smg the "expected" hit
rate is what the gateway expected the chosen workers to hold
(smg_cache_aware_expected_cached_chars_total): beside the engines' own hit
rate it shows how right the gateway's picture of the caches was.

Setups: 1-gateway; 2-gateways (two independent gateways, each request to
one of them at random, as a Service spreads them); workers-2 (one gateway,
--workers 2). Reported per run, over the requests sent after the warm-up:
TTFT p50/p99 as the client sees it; the fleet's cache hit rate (cached /
prompt characters, from the workers); the ideal hit rate (every prompt
served where its longest previously seen prefix is cached, with unlimited
cache: reachable only where the working set fits the fleet's cache); the
prefill utilisation (the workers' prefill time over the run's); and, for
smg, placement moves and spills (smg_cache_aware_decisions_total).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from typing import Callable

from load import _port_free, free_port, http_json, start_gateways, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smg.simulated_engine import EngineModel, block_keys  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from this be are or an which it not have has "
         "model token cache prefix worker request route gateway latency batch prefill decode kernel memory "
         "tensor layer head attention query key value context window stream server client replica").split()

# (gateway name, setup, policy): the runs of every workload, in order
RUNS = (("smg", "1-gateway", "cache_aware"), ("smg", "2-gateways", "cache_aware"),
        ("smg", "workers-2", "cache_aware"), ("reference", "1-gateway", "cache_aware"),
        ("reference", "2-gateways", "cache_aware"), ("reference", "1-gateway", "round_robin"))
# with --precise: smg routing by the engines' KV-cache events
PRECISE = "cache_aware+kv-events"
PRECISE_RUNS = (("smg", "1-gateway", PRECISE), ("smg", "2-gateways", PRECISE))


def text(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


# --- workloads ---------------------------------------------------------------
#
# A workload is a list of sessions. A session starts at a time and sends its
# turns one after the other: each turn is (prompt, think), sent `think`
# seconds after the previous turn's answer ended. A lone request is a
# session of one turn.

Session = tuple[float, list[tuple[str, float]]]


@dataclasses.dataclass
class Workload:
    name: str
    cache_chars: int                    # prefix cache per simulated worker
    build: Callable[[random.Random, float], list[Session]]
    flush_one_midway: bool = False      # worker 0's cache flushed half-way through the run


def arrivals(rng: random.Random, duration: float, rate: Callable[[float], float], peak: float):
    """Poisson arrival times in [0, duration) at `rate(t)` per second (at most
    `peak`), by thinning."""
    t = rng.expovariate(peak)
    while t < duration:
        if rng.random() * peak <= rate(t):
            yield t
        t += rng.expovariate(peak)


def conversation(rng: random.Random, opening: str, max_chars: int, think: float) -> list[tuple[str, float]]:
    """A conversation's turns: each prompt is the whole conversation so far
    (the opening, every user turn and assistant answer), growing until it
    reaches max_chars."""
    history = opening
    turns = []
    while True:
        history += " USER: " + text(rng, rng.randint(100, 300))
        if len(history) > max_chars and turns:
            return turns
        turns.append((history, rng.expovariate(1 / think) if turns else 0.0))
        history += " ASSISTANT: " + text(rng, rng.randint(200, 500))


def conversations(rng: random.Random, duration: float, count: int, tag: str, opening_chars: tuple[int, int],
                  max_chars: tuple[int, int], think: float) -> list[Session]:
    """`count` conversations going on at once for `duration`: the first
    start over the first seconds, and each that finishes is followed by a
    new one (its start estimated from its turns' think times and ~0.2 s an
    answer)."""
    sessions = []
    made = 0
    for slot in range(count):
        start = rng.uniform(0, min(5.0, duration / 4))
        while start < duration:
            opening = f"[{tag}{made}] " + text(rng, rng.randint(*opening_chars))
            turns = conversation(rng, opening, rng.randint(*max_chars), think)
            made += 1
            sessions.append((start, turns))
            start += sum(t for _, t in turns) + 0.2 * len(turns) + rng.expovariate(1 / think)
    return sessions


def shared_prompt_requests(rng: random.Random, duration: float, systems: list[str], weights: list[float],
                           rate: Callable[[float], float], peak: float, late: tuple[float, str, float] = None
                           ) -> list[Session]:
    """Lone requests: a system prompt by popularity plus a unique question.
    `late`: (from time, prompt, share), a prompt that takes that share of the
    requests from that time on."""
    out = []
    for t in arrivals(rng, duration, rate, peak):
        if late is not None and t >= late[0] and rng.random() < late[2]:
            system = late[1]
        else:
            system = rng.choices(systems, weights)[0]
        out.append((t, [(system + " Q: " + text(rng, rng.randint(200, 600)), 0.0)]))
    return out


def shared_prompts(rng: random.Random, duration: float) -> list[Session]:
    systems = [f"[sys{i}] " + text(rng, rng.randint(3000, 8000)) for i in range(24)]
    return shared_prompt_requests(rng, duration, systems, zipf_weights(24, 1.1), lambda t: 90.0, 90.0)


def multi_turn(rng: random.Random, duration: float) -> list[Session]:
    systems = [f"[chat{i}] " + text(rng, rng.randint(2000, 4000)) for i in range(6)]
    sessions = []
    for c in range(96):
        start = rng.uniform(0, duration / 2)
        history = rng.choice(systems) + f" conversation {c}:"
        prompts = []
        for _ in range(8):
            history += " USER: " + text(rng, rng.randint(150, 400))
            prompts.append((history, rng.expovariate(1 / 0.3)))
            history += " ASSISTANT: " + text(rng, rng.randint(300, 800))
        sessions.append((start, prompts))
    return sessions


def long_multi_turn(rng: random.Random, duration: float) -> list[Session]:
    return conversations(rng, duration, 80, "conv", (1800, 2200), (10_000, 20_000), 1.0)


def long_documents(rng: random.Random, duration: float) -> list[Session]:
    docs = [f"[doc{i}] " + text(rng, rng.randint(16_000, 48_000)) for i in range(16)]
    weights = zipf_weights(len(docs), 1.0)
    return [(t, [(rng.choices(docs, weights)[0] + " Question: " + text(rng, rng.randint(100, 300)), 0.0)])
            for t in arrivals(rng, duration, lambda t: 12.0, 12.0)]


def mixed_bursty(rng: random.Random, duration: float) -> list[Session]:
    systems = [f"[mix{i}] " + text(rng, rng.randint(3000, 8000)) for i in range(16)]
    hot = "[hot] " + text(rng, 6000)
    mean = 30.0

    def rate(t: float) -> float:
        return 5 * mean if t % 5.0 < 1.0 else mean
    out = shared_prompt_requests(rng, duration, systems, zipf_weights(16, 1.0), rate, 5 * mean,
                                 (duration / 2, hot, 0.4))
    return out + conversations(rng, duration, 24, "mconv", (1500, 2500), (8_000, 16_000), 1.2)


def eviction_pressure(rng: random.Random, duration: float) -> list[Session]:
    docs = [f"[edoc{i}] " + text(rng, rng.randint(8_000, 16_000)) for i in range(24)]
    weights = zipf_weights(len(docs), 0.8)
    out = [(t, [(rng.choices(docs, weights)[0] + " Question: " + text(rng, rng.randint(100, 300)), 0.0)])
           for t in arrivals(rng, duration, lambda t: 10.0, 10.0)]
    return out + conversations(rng, duration, 64, "econv", (1800, 2200), (8_000, 16_000), 1.5)


WORKLOADS = {w.name: w for w in (
    Workload("shared-prompts", 48_000, shared_prompts),
    Workload("multi-turn", 120_000, multi_turn),
    Workload("long-multi-turn", 240_000, long_multi_turn),
    Workload("long-documents", 96_000, long_documents),
    Workload("mixed-bursty", 120_000, mixed_bursty),
    Workload("eviction-pressure", 96_000, eviction_pressure),
    Workload("eviction-clear", 72_000, eviction_pressure, flush_one_midway=True),
)}


def working_set(sessions: list[Session]) -> int:
    """Characters of distinct prefixes the workload touches (each session's
    last prompt contains the others'; lone requests count whole)."""
    longest: dict[str, int] = {}
    for _, turns in sessions:
        head = turns[-1][0][:24]
        longest[head] = max(longest.get(head, 0), len(turns[-1][0]))
    return sum(longest.values())


def ideal_hit_rate(sent: list[tuple[float, str]], after: float, block_chars: int) -> float:
    """The hit rate of the prompts sent after `after` if each were served
    where the longest prefix sent before it is cached, cache unlimited."""
    seen: set[int] = set()
    prompt = cached = 0
    for t, p in sorted(sent, key=lambda x: x[0]):
        keys = block_keys(p, block_chars)
        n = 0
        while n < len(keys) and keys[n] in seen:
            n += 1
        seen.update(keys)
        if t >= after:
            prompt += len(p)
            cached += min(n * block_chars, len(p))
    return cached / prompt if prompt else float("nan")


# --- the fleet and the client ----------------------------------------------

class Fleet:
    """Simulated workers in their own process."""

    def __init__(self, count: int, cache_chars: int, prefill_rate: float, tokenizer: str = None):
        """`tokenizer`: cache token blocks and publish KV-cache events (worker
        i's on its HTTP port + event_offset, its replay socket + replay_offset)."""
        self.tokenizer = tokenizer
        self.event_offset = 1000
        self.replay_offset = 2000
        offsets = (0, self.event_offset, self.replay_offset) if tokenizer else (0,)
        self.port = free_port()
        while any(not _port_free(self.port + off + i) for i in range(count) for off in offsets):
            self.port = free_port()
        events = ["--sim-tokenizer", tokenizer, "--sim-kv-events-port", str(self.port + self.event_offset),
                  "--sim-kv-replay-port", str(self.port + self.replay_offset)] if tokenizer else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smg.testing", "--port", str(self.port), "--count", str(count), "--simulate",
             "--sim-cache-chars", str(cache_chars), "--sim-prefill-chars-per-sec", str(prefill_rate), *events],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        self.urls = [f"http://127.0.0.1:{self.port + i}" for i in range(count)]
        for u in self.urls:
            wait_until(lambda u=u: self.proc.poll() is None and "engine" in (http_json(u + "/_fake/stats") or {}),
                       10, f"simulated worker {u}")

    def reset(self, flush: bool = True) -> None:
        for u in self.urls:
            if flush:
                http_json(u + "/flush_cache", {})
            http_json(u + "/_fake/reset_stats", {})

    def precise_args(self) -> list[str]:
        return ["--kv-events-port-offset", str(self.event_offset), "--kv-events-replay-port-offset",
                str(self.replay_offset), "--tokenizer-path", self.tokenizer]

    def flush(self, index: int) -> None:
        http_json(self.urls[index] + "/flush_cache", {})

    def engine_stats(self) -> list[dict]:
        return [http_json(u + "/_fake/stats")["engine"] for u in self.urls]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


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


@dataclasses.dataclass
class Outcome:
    ttfts: list[float]          # of the requests sent after the warm-up
    errors: int
    sent: list[tuple[float, str]]   # (time sent, prompt), every request


async def drive(sessions: list[Session], ports: list[int], seed: int, tokens: int, warmup: float,
                at_warmup: Callable[[], None], midway: Callable[[], None] = None, duration: float = 0.0) -> Outcome:
    rng = random.Random(seed)
    out = Outcome([], 0, [])
    t0 = time.perf_counter()

    async def session(start: float, turns: list[tuple[str, float]]) -> None:
        await asyncio.sleep(max(0.0, start - (time.perf_counter() - t0)))
        for prompt, think in turns:
            if think:
                await asyncio.sleep(think)
            sent_at = time.perf_counter() - t0
            out.sent.append((sent_at, prompt))
            try:
                ttft = await one_request(rng.choice(ports), prompt, tokens)
                if sent_at >= warmup:
                    out.ttfts.append(ttft)
            except (OSError, RuntimeError):
                out.errors += 1

    async def mark_warmup() -> None:
        await asyncio.sleep(warmup)
        await asyncio.get_running_loop().run_in_executor(None, at_warmup)

    async def at_midway() -> None:
        if midway is not None:
            await asyncio.sleep(duration / 2)
            await asyncio.get_running_loop().run_in_executor(None, midway)

    await asyncio.gather(mark_warmup(), at_midway(), *(session(start, turns) for start, turns in sessions))
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def decisions(metrics_port: int) -> dict[str, float]:
    """smg's cache-aware decisions by kind (hit, miss, spill, move) and its
    spills and moves by reason ("spill/inflight", ...), from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^smg_cache_aware_decisions_total\{([^}]*)\} (\S+)$', body, re.M):
        kind = re.search(r'decision="([^"]+)"', m.group(1)).group(1)
        out[kind] = out.get(kind, 0.0) + float(m.group(2))
    for name in ("routed_chars", "expected_cached_chars"):
        for m in re.finditer(rf'^smg_cache_aware_{name}_total\{{[^}}]*\}} (\S+)$', body, re.M):
            out[name] = out.get(name, 0.0) + float(m.group(1))
    for m in re.finditer(r'^smg_cache_aware_placement_changes_total\{([^}]*)\} (\S+)$', body, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        kind = f"{labels['change']}/{labels['reason']}"
        out[kind] = out.get(kind, 0.0) + float(m.group(2))
    return out


def measure(name: str, command: list[str], setup: str, policy: str, workload: Workload, fleet: Fleet,
            args) -> dict:
    base = ["--policy", "cache_aware" if policy == PRECISE else policy, "--worker-urls", *fleet.urls]
    if policy == PRECISE:
        base += fleet.precise_args()
    gateways = start_gateways(setup, name, command, base)
    try:
        for g in gateways:
            g.wait_ready()
        fleet.reset()
        sessions = workload.build(random.Random(f"{workload.name}-{args.seed}"), args.duration)
        before = [decisions(g.metrics_port) for g in gateways] if name == "smg" else []
        marks: dict[str, float] = {}

        def at_warmup() -> None:
            fleet.reset(flush=False)
            marks["t"] = time.perf_counter()

        out = asyncio.run(drive(sessions, [g.port for g in gateways], args.seed, args.tokens, args.warmup,
                                at_warmup, (lambda: fleet.flush(0)) if workload.flush_one_midway else None,
                                args.duration))
        elapsed = time.perf_counter() - marks.get("t", time.perf_counter())
        stats = fleet.engine_stats()
        prompt = sum(s["prompt_chars"] for s in stats)
        result = {"gateway": name, "setup": setup, "policy": policy, "workload": workload.name,
                  "requests": len(out.ttfts), "errors": out.errors,
                  "ttft_p50_ms": pct(out.ttfts, 0.5) * 1000, "ttft_p99_ms": pct(out.ttfts, 0.99) * 1000,
                  "hit_rate": sum(s["cached_chars"] for s in stats) / prompt if prompt else float("nan"),
                  "ideal_hit_rate": ideal_hit_rate(out.sent, args.warmup, EngineModel.block_chars),
                  "prefill_utilisation": sum(s["prefill_secs"] for s in stats) / (len(stats) * elapsed),
                  "working_set_chars": working_set(sessions), "fleet_cache_chars": workload.cache_chars * args.workers}
        if name == "smg":
            after = [decisions(g.metrics_port) for g in gateways]
            result["decisions"] = {k: sum(a.get(k, 0) - b.get(k, 0) for a, b in zip(after, before))
                                   for k in after[0]}
            result["moves"] = result["decisions"].get("move", 0)
            result["spills"] = result["decisions"].get("spill", 0)
            routed = result["decisions"].get("routed_chars", 0)
            result["expected_hit_rate"] = result["decisions"].get("expected_cached_chars", 0) / routed \
                if routed else float("nan")
        return result
    finally:
        for g in gateways:
            g.stop()


def label(r: dict) -> str:
    if r["policy"] == PRECISE:
        return r["gateway"] + " precise"
    return r["gateway"] + ("" if r["policy"] == "cache_aware" else f" {r['policy']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.environ.get("SMG_REFERENCE"))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--runs", default="all",
                    help="comma-separated gateway/setup/policy triples to run, e.g. smg/1-gateway/cache_aware "
                         "(default: all of " + ", ".join("/".join(r) for r in RUNS) + ")")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds at the start not counted")
    ap.add_argument("--workers", type=int, default=8, help="simulated workers")
    ap.add_argument("--prefill-rate", type=float, default=50_000.0, help="prefill characters per second")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--precise", action="store_true",
                    help="engines publish KV-cache events; smg also runs routed by them (see above)")
    ap.add_argument("--json")
    args = ap.parse_args()
    workloads = [WORKLOADS[w] for w in args.workloads.split(",") if w]
    runs = RUNS if args.runs == "all" else [tuple(r.split("/")) for r in args.runs.split(",") if r]
    commands = {"smg": [sys.executable, "-m", "smg"]}
    if args.reference:
        commands["reference"] = [args.reference, "launch"]
    runs = [r for r in runs if r[0] in commands]
    tokenizer = None
    if args.precise:
        import tempfile

        from smg.simulated_engine import write_tokenizer

        if args.runs == "all":
            runs = [*runs[:1], *PRECISE_RUNS, *runs[1:]]
        rng = random.Random(0)
        tokenizer = write_tokenizer(tempfile.mkdtemp(prefix="smg-rq-"),
                                    [f"[doc{i}] [conv{i}] " + text(rng, 2000) for i in range(200)])
    results = []
    for workload in workloads:
        fleet = Fleet(args.workers, workload.cache_chars, args.prefill_rate, tokenizer)
        try:
            for name, setup, policy in runs:
                r = measure(name, commands[name], setup, policy, workload, fleet, args)
                results.append(r)
                extra = (f"  moves {r['moves']:.0f} spills {r['spills']:.0f} expected hit {r['expected_hit_rate']:.3f}"
                         if "moves" in r else "")
                print(f"  {workload.name:17s} {setup:10s} {label(r):21s} TTFT p50 {r['ttft_p50_ms']:6.1f} ms  "
                      f"p99 {r['ttft_p99_ms']:7.1f} ms  hit {r['hit_rate']:.3f} (ideal {r['ideal_hit_rate']:.3f})  "
                      f"prefill busy {r['prefill_utilisation']:.2f}  requests {r['requests']}  errors {r['errors']}"
                      f"{extra}", file=sys.stderr, flush=True)
        finally:
            fleet.stop()
    print(f"\n{args.workers} simulated workers, prefill {1e6 / args.prefill_rate:.0f} us/character, "
          f"{args.duration:.0f} s of arrivals per run ({args.warmup:.0f} s warm-up not counted), seed {args.seed}\n")
    print("| workload | setup | gateway | TTFT p50 ms | TTFT p99 ms | hit rate | expected | ideal | prefill busy "
          "| moves | spills | requests | errors |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    shown = set()
    for r in results:
        title = r["workload"]
        if title not in shown:
            shown.add(title)
            title += f" (working set {r['working_set_chars'] / r['fleet_cache_chars']:.1f}x the fleet's cache)"
        else:
            title = ""
        moves = f"{r['moves']:.0f} | {r['spills']:.0f}" if "moves" in r else " | "
        expected = f"{r['expected_hit_rate']:.3f}" if "expected_hit_rate" in r else ""
        print(f"| {title} | {r['setup']} | {label(r)} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} "
              f"| {r['hit_rate']:.3f} | {expected} | {r['ideal_hit_rate']:.3f} | {r['prefill_utilisation']:.2f} "
              f"| {moves} | {r['requests']} | {r['errors']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
