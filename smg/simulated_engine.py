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
import time
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
    extensions and eviction takes the tails first (a radix cache's leaves).
    Each block weighs 1 (a block of characters) or what it is given (the
    characters of a block of tokens); the cache holds `capacity` of weight."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.blocks: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.weight = 0

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

    def insert(self, keys: list[int], weights: list[int] | None = None) -> list[int]:
        """Cache the blocks; returns the keys evicted to make room."""
        for i in range(len(keys) - 1, -1, -1):
            key = keys[i]
            if key in self.blocks:
                self.blocks.move_to_end(key)
            else:
                w = weights[i] if weights is not None else 1
                self.blocks[key] = w
                self.weight += w
        evicted = []
        while self.weight > self.capacity and self.blocks:
            key, w = self.blocks.popitem(last=False)
            self.weight -= w
            evicted.append(key)
        return evicted

    def clear(self) -> None:
        self.blocks.clear()
        self.weight = 0


class TokenBlocks:
    """A prompt as an engine caches it: the tokenizer's ids in blocks of
    `block_tokens`, each named by the engine's own chain hash (seeded per
    engine, as vLLM seeds its hashes per process: a router must not rely on
    them), with the characters each block covers."""

    def __init__(self, tokenizer, block_tokens: int, seed: int):
        self.tokenizer = tokenizer
        self.block_tokens = block_tokens
        self.seed = seed

    def split(self, prompt: str, special: bool = True) -> tuple[list[int], list[list[int]], list[int]]:
        """(block hashes, token ids per block, characters per block) of the
        prompt's full blocks (`special`: with the tokenizer's special tokens;
        a chat template writes its own)."""
        enc = self.tokenizer.encode(prompt, add_special_tokens=special)
        ids, offsets = enc.ids, enc.offsets
        bt = self.block_tokens
        keys, tokens, chars = [], [], []
        parent, start_char = self.seed, 0
        for start in range(0, len(ids) - bt + 1, bt):
            block = ids[start:start + bt]
            parent = _int64(hash((parent, tuple(block))))
            keys.append(parent)
            tokens.append(block)
            end_char = offsets[start + bt - 1][1]
            chars.append(max(1, end_char - start_char))
            start_char = end_char
        return keys, tokens, chars


def _int64(h: int) -> int:
    return (h & 0xFFFFFFFFFFFFFFFF) - (1 << 64) if h & (1 << 63) else h & 0xFFFFFFFFFFFFFFFF


class KvEventPublisher:
    """An engine's KV-cache event publisher, in the engines' format (see
    smg.kv_events): a PUB socket and a ROUTER replay socket answering from
    the last `buffer` batches. Faults for tests: `drop` batches (numbered and
    kept for replay, not sent: a sequence gap), `paused` (nothing sent or
    kept: the events stop), restart (sequence from 0, buffer emptied),
    reopen (the sockets closed and bound again: a dropped connection)."""

    def __init__(self, port: int, replay_port: int = 0, host: str = "127.0.0.1", buffer: int = 10_000):
        import msgspec
        import zmq
        import zmq.asyncio

        self._encode = msgspec.msgpack.encode
        self._zmq = zmq
        self.ctx = zmq.asyncio.Context.instance()
        self.endpoint = f"tcp://{host}:{port}"
        self.replay_endpoint = f"tcp://{host}:{replay_port}" if replay_port else None
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer)
        self.seq = 0
        self.sent = 0
        self.drop = 0
        self.paused = False
        self.pub = None
        self.replay = None
        self.replay_task = None
        self.open()

    def open(self) -> None:
        zmq = self._zmq
        self.pub = self._bound(zmq.PUB, self.endpoint)
        if self.replay_endpoint:
            self.replay = self._bound(zmq.ROUTER, self.replay_endpoint)

    def _bound(self, kind: int, endpoint: str):
        """A socket bound to `endpoint`; a port just closed may take ZeroMQ's
        I/O thread a moment to let go of."""
        zmq = self._zmq
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + 2.0
        while True:
            try:
                sock.bind(endpoint)
                return sock
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    sock.close(0)
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        if self.replay_task is not None:
            self.replay_task.cancel()
            self.replay_task = None
        for sock in (self.pub, self.replay):
            if sock is not None:
                sock.close(0)
        self.pub = self.replay = None

    def restart(self) -> None:
        """The engine restarted: sequence from 0, nothing to replay."""
        self.close()
        self.seq = 0
        self.buffer.clear()
        self.open()

    def reopen(self) -> None:
        """The connection dropped: same sequence and buffer."""
        self.close()
        self.open()

    def publish(self, events: list[dict]) -> None:
        if not events or self.paused:
            return
        if self.replay is not None and self.replay_task is None:
            self.replay_task = asyncio.get_running_loop().create_task(self._serve_replay())
        payload = self._encode([time.time(), events, None])
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if self.drop > 0:
            self.drop -= 1
            return
        self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
        self.sent += 1

    async def _serve_replay(self) -> None:
        sock = self.replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self.buffer):
                if seq >= start_seq:
                    await sock.send_multipart([client, b"", b"", seq.to_bytes(8, "big"), payload])
            await sock.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])


class SimulatedEngine:
    def __init__(self, model: EngineModel, blocks: TokenBlocks | None = None,
                 events: KvEventPublisher | None = None):
        self.model = model
        self.blocks = blocks
        self.events = events
        if blocks is not None:
            self.cache = PrefixCache(model.cache_chars)
        else:
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

    def flush(self) -> None:
        """/flush_cache: the cache emptied (and, publishing, AllBlocksCleared)."""
        self.cache.clear()
        if self.events is not None:
            self.events.publish([{"type": "AllBlocksCleared"}])

    def lookup(self, prompt: str, special: bool = True) -> tuple[int, object]:
        """(cached characters of the prompt, what store() needs)."""
        m = self.model
        if self.blocks is None:
            keys = block_keys(prompt, m.block_chars)
            return min(self.cache.cached_blocks(keys) * m.block_chars, len(prompt)), keys
        keys, tokens, chars = self.blocks.split(prompt, special)
        n = self.cache.cached_blocks(keys)
        return sum(chars[:n]), (keys, tokens, chars)

    def store(self, blocks) -> None:
        """The prompt's blocks are cached after its prefill."""
        if self.blocks is None:
            self.cache.insert(blocks)
            return
        keys, tokens, chars = blocks
        new = [i for i in range(len(keys)) if keys[i] not in self.cache.blocks]
        evicted = self.cache.insert(keys, chars)
        if self.events is None:
            return
        events = []
        run: list[int] = []
        for i in new + [-1]:
            if run and i != run[-1] + 1:
                first = run[0]
                events.append({"type": "BlockStored", "block_hashes": [keys[j] for j in run],
                               "parent_block_hash": keys[first - 1] if first else None,
                               "token_ids": [t for j in run for t in tokens[j]],
                               "block_size": self.blocks.block_tokens, "lora_id": None, "medium": "GPU"})
                run = []
            if i >= 0:
                run.append(i)
        if evicted:
            events.append({"type": "BlockRemoved", "block_hashes": evicted, "medium": "GPU"})
        self.events.publish(events)

    async def generate(self, prompt: str, max_new_tokens: int, special: bool = True) -> AsyncIterator[int]:
        """Yields the index of each token as it is produced (`special`: the
        prompt is tokenized with the tokenizer's special tokens, as a
        completion's is; a chat rendered by its template is not)."""
        m = self.model
        self.requests += 1
        async with self.slot_freed:
            await self.slot_freed.wait_for(lambda: self.running < m.max_running)
            self.running += 1
        try:
            async with self.prefill_lock:
                cached, blocks = self.lookup(prompt, special)
                self.prompt_chars += len(prompt)
                self.cached_chars += cached
                took = m.prefill_overhead + (len(prompt) - cached) / m.prefill_chars_per_sec
                self.prefill_secs += took
                await asyncio.sleep(took)
                self.store(blocks)
            yield 0
            for i in range(1, max(1, max_new_tokens)):
                await asyncio.sleep(m.decode_step + m.decode_step_per_request * self.running)
                yield i
        finally:
            async with self.slot_freed:
                self.running -= 1
                self.slot_freed.notify()


def write_tokenizer(path: str, corpus: list[str], vocab_size: int = 2000) -> str:
    """Train a byte-level BPE tokenizer on `corpus` and save it as a
    tokenizer.json at `path` (a file, or a directory to hold one): a model's
    tokenizer for simulated fleets and tests, made offline. Byte-level: any
    text tokenizes, and no two texts share their ids."""
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    tok.save(path)
    return path
