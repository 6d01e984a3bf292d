"""A model of an LLM serving engine, for measuring routing quality without
GPUs (the fake worker's --simulate mode; see docs/fleet-simulator.md).

What it models, per worker:
- a prefix KV cache of `cache_chars` characters in blocks of `block_chars`,
  least recently used blocks evicted first. A prompt's cached part is its
  longest run of leading blocks already in the cache (as SGLang's radix
  cache finds it); after its prefill the prompt's blocks are cached;
- one prefill at a time, in arrival order, taking `prefill_overhead` plus
  the uncached characters at `prefill_chars_per_sec`: a cache miss costs
  time, and a queue of misses costs everyone behind it;
- batched decode: at most `max_running` requests past prefill at once
  (others wait to start their prefill), each producing one token per
  decode step of `decode_step` + `decode_step_per_request` x batch size.

Time to first token is the wait for the prefill slot plus the prefill. The
engine counts prompt and cached characters, so a benchmark can report the
fleet's cache hit rate."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import AsyncIterator


@dataclasses.dataclass
class EngineModel:
    block_chars: int = 64
    cache_chars: int = 1 << 20
    prefill_chars_per_sec: float = 200_000.0
    prefill_overhead: float = 0.001
    max_running: int = 32
    decode_step: float = 0.008
    decode_step_per_request: float = 0.0002


def block_keys(text: str, block_chars: int) -> list[int]:
    """One key per full block of `text`, each naming the whole prefix up to
    the block's end (a chain: equal keys mean equal prefixes)."""
    keys = []
    key = 0
    for end in range(block_chars, len(text) + 1, block_chars):
        key = hash((key, text[end - block_chars:end]))
        keys.append(key)
    return keys


class PrefixCache:
    """Blocks of prompt prefixes with LRU eviction. A prompt's blocks are
    touched deepest first, so a prefix is always more recent than its
    extensions and eviction takes the tails first (a radix cache's leaves)."""

    def __init__(self, capacity_blocks: int):
        self.capacity = max(1, capacity_blocks)
        self.blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    def cached_blocks(self, keys: list[int]) -> int:
        """Leading blocks already cached (touched, as a hit uses them)."""
        n = 0
        for key in keys:
            if key not in self.blocks:
                break
            n += 1
        for key in reversed(keys[:n]):
            self.blocks.move_to_end(key)
        return n

    def insert(self, keys: list[int]) -> None:
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)
            else:
                self.blocks[key] = None
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


class SimulatedEngine:
    def __init__(self, model: EngineModel):
        self.model = model
        self.cache = PrefixCache(model.cache_chars // model.block_chars)
        self.prefill_lock = asyncio.Lock()   # FIFO: one prefill at a time, in arrival order
        self.running = 0
        self.slot_freed = asyncio.Condition()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.prompt_chars = 0
        self.cached_chars = 0
        self.requests = 0
        self.prefill_secs = 0.0     # time spent prefilling: busy / elapsed is the prefill utilisation

    def stats(self) -> dict:
        return {"prompt_chars": self.prompt_chars, "cached_chars": self.cached_chars,
                "requests": self.requests, "cached_blocks": len(self.cache.blocks), "running": self.running,
                "prefill_secs": self.prefill_secs}

    async def generate(self, prompt: str, max_new_tokens: int) -> AsyncIterator[int]:
        """Yields the index of each token as it is produced."""
        m = self.model
        self.requests += 1
        async with self.slot_freed:
            await self.slot_freed.wait_for(lambda: self.running < m.max_running)
            self.running += 1
        try:
            async with self.prefill_lock:
                keys = block_keys(prompt, m.block_chars)
                cached = min(self.cache.cached_blocks(keys) * m.block_chars, len(prompt))
                self.prompt_chars += len(prompt)
                self.cached_chars += cached
                took = m.prefill_overhead + (len(prompt) - cached) / m.prefill_chars_per_sec
                self.prefill_secs += took
                await asyncio.sleep(took)
                self.cache.insert(keys)
            yield 0
            for i in range(1, max(1, max_new_tokens)):
                await asyncio.sleep(m.decode_step + m.decode_step_per_request * self.running)
                yield i
        finally:
            async with self.slot_freed:
                self.running -= 1
                self.slot_freed.notify()
