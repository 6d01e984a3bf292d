"""What precise routing (--kv-events-port) costs: per request, tokenizing
and matching a prompt (whole, and reusing the previous turn of its
conversation); per cached block, the index's memory; per event, applying
it (one process); and how soon two independent gateways both know what an
engine stored.

    .venv/bin/python benchmarks/kv_index.py [--sizes 1000,8000,32000,128000]

The tokenizer is a byte-level BPE trained on the benchmark's vocabulary
(smg.simulated_engine.write_tokenizer, 2,000 tokens, ~5 characters a
token); a model's own tokenizer has a larger vocabulary and costs somewhat
more per character."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import tracemalloc

import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smg._fast.kvindex import BlockIndex, chain_hashes  # noqa: E402
from smg._fast.worker import Worker  # noqa: E402
from smg.kv_events import EventStream, KvEvents  # noqa: E402
from smg.simulated_engine import write_tokenizer  # noqa: E402
from smg.tokenizer import PrefixTokenizer, load_tokenizer  # noqa: E402
from routing_quality import text  # noqa: E402  (the routing benchmark's prompts)

BLOCK = 16
SLOTS = 8


def best_of(fn, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def per_request(tok, sizes: list[int]) -> None:
    print("| prompt | tokens | tokenize + match whole | next turn (+500 characters, reused) |")
    print("|---:|---:|---:|---:|")
    rng = random.Random(1)
    for size in sizes:
        prompt = f"[conv{size}] " + text(rng, size)
        nxt = prompt + " USER: " + text(rng, 500)
        tokens = tok.encode(prompt).ids
        # an index where 8 workers hold the prompt's first half
        index = BlockIndex()
        hashes = chain_hashes(tokens, BLOCK)
        half = tokens[:len(hashes) // 2 * BLOCK]
        for slot in range(SLOTS):
            index.stored(slot, list(range(len(half) // BLOCK)), None, half, BLOCK)
        mask = (1 << SLOTS) - 1

        def whole():
            pt = PrefixTokenizer(tok)
            index.match(pt.encode(prompt, BLOCK).hashes, mask)

        pt = PrefixTokenizer(tok)
        pt.CHECK_EVERY = 10 ** 9

        def reused():
            pt.groups.clear()
            pt.chars = 0
            pt.encode(prompt, BLOCK)
            t0 = time.perf_counter()
            index.match(pt.encode(nxt, BLOCK).hashes, mask)
            reused.took = time.perf_counter() - t0

        took_whole = best_of(whole)
        best = float("inf")
        for _ in range(5):
            reused()
            best = min(best, reused.took)
        print(f"| {size:,} | {len(tokens):,} | {took_whole * 1e6:,.0f} us | {best * 1e6:,.0f} us |")


def index_memory() -> None:
    """Half of each worker's blocks are the same prompts as the others'
    (shared system prompts, documents), half its own."""
    per_slot = 50_000
    shared = random.Random(3).choices(range(1000), k=per_slot // 2 * BLOCK)
    tracemalloc.start()
    index = BlockIndex(max_blocks_per_slot=1 << 22)
    before = tracemalloc.get_traced_memory()[0]
    for slot in range(SLOTS):
        own = random.Random(slot).choices(range(1000), k=per_slot // 2 * BLOCK)
        base = slot * 10 ** 7       # each engine names blocks its own way
        index.stored(slot, list(range(base, base + per_slot // 2)), None, shared, BLOCK)
        index.stored(slot, list(range(base + per_slot // 2, base + per_slot)), None, own, BLOCK)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    entries = SLOTS * per_slot
    print(f"\nindex memory: {SLOTS} workers x {per_slot:,} blocks ({len(index):,} distinct): "
          f"{used / 2**20:.1f} MiB, {used / entries:.0f} bytes per (worker, block)")


def event_rate() -> None:
    events = KvEvents(None, port=1)
    stream = EventStream(events, Worker("w", "http://127.0.0.1:9"), 0, "tcp://127.0.0.1:1", None)
    events.streams["w"] = stream
    rng = random.Random(4)
    payloads = []
    parent = None
    for seq in range(2000):
        hashes = [seq * 4 + i for i in range(4)]
        tokens = [rng.randrange(1000) for _ in range(4 * BLOCK)]
        batch = [time.time(), [{"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
                                "token_ids": tokens, "block_size": BLOCK, "lora_id": None, "medium": "GPU"},
                               {"type": "BlockRemoved", "block_hashes": [hashes[0] - 40] if seq > 10 else [],
                                "medium": "GPU"}], None]
        parent = hashes[-1]
        payloads.append([b"", seq.to_bytes(8, "big"), msgspec.msgpack.encode(batch)])

    async def apply():
        for frames in payloads:
            await stream.on_message(frames)

    t0 = time.perf_counter()
    asyncio.run(apply())
    took = time.perf_counter() - t0
    print(f"\nevents: {len(payloads):,} batches of BlockStored (4 blocks of {BLOCK} tokens) + BlockRemoved, "
          f"decoded and applied at {len(payloads) / took:,.0f} batches/s ({took / len(payloads) * 1e6:.0f} us each)")


def propagation(path: str, trials: int) -> None:
    """Two independent gateways subscribed to one simulated engine: a prompt
    is sent to the engine directly (as another router would), and both
    gateways' GET /workers are polled until each shows the blocks it
    stored. The time from the engine's answer to both showing them."""
    import json
    import subprocess
    import urllib.request

    from load import free_port, wait_until

    def get(url: str):
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def post(url: str, body: dict) -> None:
        req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    port, events = free_port(), free_port()
    engine = subprocess.Popen([sys.executable, "-m", "smg.testing", "--port", str(port), "--simulate",
                               "--sim-tokenizer", path, "--sim-kv-events-port", str(events),
                               "--sim-prefill-chars-per-sec", "1e8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    gateways, ports = [], []
    try:
        for _ in range(2):
            p = free_port()
            ports.append(p)
            gateways.append(subprocess.Popen(
                [sys.executable, "-m", "smg", "--host", "127.0.0.1", "--port", str(p), "--prometheus-port",
                 str(free_port()), "--worker-urls", f"http://127.0.0.1:{port}", "--kv-events-port", str(events),
                 "--tokenizer-path", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT))

        def blocks(p: int) -> int:
            (w,) = get(f"http://127.0.0.1:{p}/workers")["workers"]
            return (w.get("kv_events") or {}).get("indexed_blocks", -1)

        wait_until(lambda: all(blocks(p) == 0 for p in ports), 30, "gateways subscribed")
        rng = random.Random(5)
        post(f"http://127.0.0.1:{port}/generate", {"text": text(rng, 2000)})       # the subscriptions are up
        took = []
        for _ in range(trials):
            wait_until(lambda: len({blocks(p) for p in ports}) == 1, 10, "the gateways to agree")
            before = blocks(ports[0])
            post(f"http://127.0.0.1:{port}/generate", {"text": text(rng, 2000), "stream": False})
            t0 = time.perf_counter()
            while not all(blocks(p) > before for p in ports):
                if time.perf_counter() - t0 > 5:
                    raise RuntimeError("a gateway never showed the blocks")
            took.append(time.perf_counter() - t0)
        took.sort()
        print(f"\npropagation: {trials} stores sent to the engine directly; both of two gateways showed them "
              f"within p50 {took[len(took) // 2] * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms of the engine's answer "
              f"(polling GET /workers of each in turn)")
    finally:
        for proc in (*gateways, engine):
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,8000,32000,128000")
    ap.add_argument("--trials", type=int, default=30, help="propagation trials")
    args = ap.parse_args()
    rng = random.Random(0)
    path = write_tokenizer(tempfile.mkdtemp(prefix="smg-kv-"), [text(rng, 2000) for _ in range(200)])
    per_request(load_tokenizer(path), [int(s) for s in args.sizes.split(",")])
    index_memory()
    event_rate()
    propagation(path, args.trials)


if __name__ == "__main__":
    main()
