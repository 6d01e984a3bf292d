"""The simulated engine behind the fake worker's --simulate mode: prefix
cache accounting, LRU eviction, one prefill at a time, the running cap."""

import asyncio

from helpers import request, wait_for

from smg.simulated_engine import EngineModel, PrefixCache, SimulatedEngine, block_keys


def test_block_keys_name_whole_prefixes():
    a = block_keys("x" * 64 + "y" * 64 + "tail", 64)
    b = block_keys("x" * 64 + "z" * 64, 64)
    assert len(a) == 2 and len(b) == 2  # the partial tail is no block
    assert a[0] == b[0] and a[1] != b[1]
    # the same block text after a different prefix is a different block
    assert block_keys("z" * 64 + "y" * 64, 64)[1] != a[1]


def test_prefix_cache_counts_leading_blocks_and_evicts_lru():
    cache = PrefixCache(4)
    p1 = block_keys("a" * 64 * 3, 64)
    cache.insert(p1)
    assert cache.cached_blocks(p1) == 3
    assert cache.cached_blocks(block_keys("a" * 64 * 2 + "b" * 64, 64)) == 2
    p2 = block_keys("c" * 64 * 2, 64)
    cache.insert(p2)  # 5 blocks for 4 places: the least recently used tail goes, not a shared head
    assert cache.cached_blocks(p1) == 2
    assert cache.cached_blocks(p2) == 2
    cache.insert(block_keys("d" * 64 * 2, 64))  # p1, used least recently, goes tail first, then head
    assert cache.cached_blocks(p2) == 2 and cache.cached_blocks(p1) == 0


def run(coro):
    return asyncio.run(coro)


async def collect(engine, prompt, tokens, out, name):
    async for i in engine.generate(prompt, tokens):
        out.append((name, i, asyncio.get_running_loop().time()))


def test_hits_are_counted_and_prefill_is_serial():
    model = EngineModel(block_chars=64, cache_chars=64 * 100, prefill_chars_per_sec=64_000, prefill_overhead=0.0,
                        decode_step=0.001, decode_step_per_request=0.0)
    prompt = "s" * 640  # 10 ms of prefill uncached

    async def main():
        engine = SimulatedEngine(model)
        out = []
        t0 = asyncio.get_running_loop().time()
        await collect(engine, prompt, 1, out, "first")
        first_ttft = out[-1][2] - t0
        # the same prompt again: all cached, no prefill time
        t1 = asyncio.get_running_loop().time()
        await collect(engine, prompt + "?", 1, out, "again")
        again_ttft = out[-1][2] - t1
        assert engine.prompt_chars == 640 + 641 and engine.cached_chars == 640
        assert first_ttft >= 0.009 and again_ttft < first_ttft / 2
        # two different misses at once: the second waits for the first prefill
        t2 = asyncio.get_running_loop().time()
        await asyncio.gather(collect(engine, "u" * 640, 1, out, "u"), collect(engine, "v" * 640, 1, out, "v"))
        firsts = sorted(t for name, i, t in out if name in ("u", "v"))
        assert firsts[0] - t2 >= 0.009 and firsts[1] - t2 >= 0.019

    run(main())


def test_running_cap_holds_prefills_back():
    model = EngineModel(block_chars=64, prefill_overhead=0.0, prefill_chars_per_sec=1e9, max_running=2,
                        decode_step=0.02, decode_step_per_request=0.0)

    async def main():
        engine = SimulatedEngine(model)
        out = []
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, engine.running)
                await asyncio.sleep(0.001)

        w = asyncio.ensure_future(watch())
        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(*(collect(engine, f"p{i}", 3, out, i) for i in range(4)))
        w.cancel()
        assert peak == 2
        third_first_token = min(t for name, i, t in out if name in (2, 3) and i == 0)
        assert third_first_token - t0 >= 0.04  # after two decode steps of the first pair

    run(main())


def test_fake_worker_simulate_mode_streams_and_reports(fake_workers):
    (w,) = fake_workers(1, simulate=True, sim_prefill_chars_per_sec=1e6, sim_decode_step=0.001)
    text = "shared prefix " * 40
    for q in ("one", "two"):
        r = request(w.port, "POST", "/generate", {"text": text + q, "stream": True,
                                                   "sampling_params": {"max_new_tokens": 4}})
        assert r.status == 200 and r.body.count(b"data: ") == 5  # 4 tokens and [DONE]
    stats = request(w.port, "GET", "/_fake/stats").json()
    engine = stats["engine"]
    assert engine["requests"] == 2
    assert engine["prompt_chars"] == 2 * len(text) + 6
    # the second request found the shared prefix cached, in whole 64-character blocks
    assert engine["cached_chars"] == (len(text) // 64) * 64
    wait_for(lambda: request(w.port, "GET", "/_fake/stats").json()["engine"]["running"] == 0)
