"""Precise cache-aware routing: each worker's KV-cache events, over ZeroMQ.

SGLang and vLLM publish every KV-cache block they store and evict
(`--kv-events-config`): a PUB socket sends multipart messages
`[topic, 8-byte big-endian sequence number, msgpack payload]`, the payload a
batch of timestamp, events and data-parallel rank. Events are tagged maps
(`{"type": ..., fields}`; an array `[tag, fields...]` is read too):

- `BlockStored`: block_hashes, parent_block_hash, token_ids, block_size,
  lora_id, medium (and optional fields a consumer may ignore);
- `BlockRemoved`: block_hashes, medium;
- `AllBlocksCleared`.

SGLang's batch is an array `[ts, events, rank]`, vLLM's a map; block hashes are integers (SGLang, older
vLLM) or bytes (newer vLLM). An optional ROUTER socket replays buffered
batches: a request `[b"", start sequence (8 bytes)]` is answered with one
message per batch (`[b"", topic, sequence, payload]` from SGLang,
`[b"", sequence, payload]` from vLLM), then the sequence -1.

`KvEvents` (one per cache_aware policy, that is per model) subscribes to
each of its workers (`EventStream`), keeps what they hold in a
`BlockIndex`, and tells the policy, per request, how many leading
characters of the prompt each trusted worker holds. A worker whose stream
is not trusted (not connected yet, stalled, over its block budget) is
routed by the character tree, as without events.

Needs the `kv-events` extra (pyzmq, msgspec) and a tokenizer
(smg.tokenizer); without the flags nothing here is imported."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Optional

import msgspec
import zmq
import zmq.asyncio

from smg._fast.kvindex import BlockIndex, slots_in
from smg.tokenizer import PrefixTokenizer
from smg.workers import KV_EVENTS_LABEL, KV_REPLAY_LABEL

log = logging.getLogger("smg.kv_events")

END_SEQ = -1
REPLAY_TIMEOUT_SECS = 2.0
RECONNECT_SECS = 1.0
# a batch bigger than this is refused by the socket (a hostile or broken publisher)
MAX_MESSAGE_BYTES = 64 << 20
# the GPU tier: blocks stored elsewhere (host memory, disk) do not make a prefill hit
GPU_MEDIA = (None, "GPU")

# stream states (GET /workers shows them)
CONNECTING = "connecting"   # subscribed, no batch yet: routed by the character tree
LIVE = "live"               # in sequence: routed by the index
STALE = "stale"             # requests were sent and no event came: routed by the character tree
OVERFLOW = "overflow"       # over its block budget: routed by the character tree until cleared
STATE_NAMES = (CONNECTING, LIVE, STALE, OVERFLOW)

EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")

# A worker whose engine evicts blocks more than CROWDED_FACTOR times as fast
# as the fleet's mean (and at least CROWDED_FLOOR a second) holds more
# prompts than its cache fits: new prefixes, and prefixes its engine
# evicted, are placed elsewhere (KvEvents.crowded). Replicas see the same
# events, so they find the same workers crowded.
CROWDED_FACTOR = 1.5
CROWDED_FLOOR = 1.0
EVICTION_SMOOTHING_SECS = 10.0
CROWDED_RECHECK_SECS = 0.5
# a stream hands the event loop back after this many batches in a row (a
# flooding publisher cannot starve the requests)
YIELD_EVERY = 64


class MalformedBatch(ValueError):
    pass


def decode_batch(payload: bytes) -> tuple[float, list, Optional[int]]:
    """(ts, events, data-parallel rank) of one payload: SGLang's batch is an
    array [ts, events, rank], vLLM's a map {ts, events, data_parallel_rank}.
    Each event is (type name, fields); an unknown type keeps its name and no
    fields. Raises MalformedBatch on anything that is not a batch of events."""
    try:
        batch = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, ValueError) as e:
        raise MalformedBatch(f"not msgpack: {e}") from None
    if isinstance(batch, list) and len(batch) >= 2:
        ts, raw_events, rank = batch[0], batch[1], batch[2] if len(batch) > 2 else None
    elif isinstance(batch, dict):
        ts, raw_events = batch.get("ts"), batch.get("events")
        rank = batch.get("data_parallel_rank", batch.get("attn_dp_rank"))
    else:
        raise MalformedBatch("not a batch of events")
    if not isinstance(raw_events, list) or not isinstance(ts, (int, float)) or isinstance(ts, bool) \
            or (rank is not None and type(rank) is not int):
        raise MalformedBatch("a batch needs ts, a list of events and an integer rank or none")
    return float(ts), [decode_event(e) for e in raw_events], rank


# the fields of an array-encoded event, after its tag
_ARRAY_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def decode_event(raw) -> tuple[str, dict]:
    """Events are tagged maps ({"type": ..., fields}); array-encoded events
    ([tag, fields in order]) are read too."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag = raw[0]
        fields = dict(zip(_ARRAY_FIELDS.get(tag, ()), raw[1:]))
    else:
        raise MalformedBatch("an event is neither a tagged map nor a tagged array")
    if not isinstance(tag, str):
        raise MalformedBatch("an event has no type")
    if tag not in _ARRAY_FIELDS:
        return tag, {}
    medium = fields.get("medium")
    if medium is not None and not isinstance(medium, str):
        raise MalformedBatch(f"{tag}: medium is not a string")
    if tag == "BlockStored":
        size, parent = fields.get("block_size"), fields.get("parent_block_hash")
        if not _hash_list(fields.get("block_hashes")) or not _int_list(fields.get("token_ids")) \
                or type(size) is not int or size <= 0 or not (parent is None or _is_hash(parent)):
            raise MalformedBatch("BlockStored needs block_hashes, token_ids and a positive block_size")
    elif tag == "BlockRemoved" and not _hash_list(fields.get("block_hashes")):
        raise MalformedBatch("BlockRemoved needs block_hashes")
    return tag, fields


def _is_hash(value) -> bool:
    # SGLang's and older vLLM's block hashes are integers, newer vLLM's bytes
    return type(value) is int or type(value) is bytes


def _hash_list(value) -> bool:
    return isinstance(value, list) and all(_is_hash(x) for x in value)


def _int_list(value) -> bool:
    return isinstance(value, list) and all(type(x) is int for x in value)


class EventStream:
    """One worker's subscription: the sequence, the replay, the trust."""

    def __init__(self, events: KvEvents, worker, slot: int, endpoint: str, replay_endpoint: Optional[str]):
        self.events = events
        self.worker = worker
        self.slot = slot
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.state = CONNECTING
        self.next_seq: Optional[int] = None
        self.replayed_to = -1           # the last sequence applied from a replay
        self.last_event_at = 0.0
        self.awaiting_since = 0.0     # a request was sent that should store blocks; 0: none
        self.silent_logged = False
        self.malformed_logged = False
        self.rejoin = False             # reconnected: the index is rebuilt on the next batch
        self.removed_blocks = 0         # evicted, as its events said (KvEvents.crowded)
        self.removed_seen = 0
        self.eviction_rate = 0.0        # blocks evicted a second, smoothed over EVICTION_SMOOTHING_SECS
        self.received = dict.fromkeys(EVENT_TYPES, 0)
        self.applied = dict.fromkeys(EVENT_TYPES, 0)
        self.unknown = 0
        self.malformed = 0
        self.gaps = 0
        self.replays = 0
        self.resyncs = 0
        self.task: Optional[asyncio.Task] = None

    # --- what the policy asks ---

    def trusted(self, now: float) -> bool:
        if self.awaiting_since and now - self.awaiting_since > self.events.stale_secs:
            if self.state == LIVE:
                self.state = STALE
                log.warning("KV events of %s stopped (none %.1f s after a request that stores blocks): routed "
                            "by the character tree until they resume", self.worker.url, now - self.awaiting_since)
            elif self.state == CONNECTING and not self.silent_logged:
                self.silent_logged = True
                log.warning("no KV events from %s at %s (%.1f s after a request that stores blocks): routed by "
                            "the character tree until they come", self.worker.url, self.endpoint,
                            now - self.awaiting_since)
        return self.state == LIVE

    def expect_events(self, now: float) -> None:
        """A request that stores new blocks was sent to the worker."""
        if not self.awaiting_since:
            self.awaiting_since = now

    def describe(self) -> dict:
        return {"endpoint": self.endpoint, "replay_endpoint": self.replay_endpoint, "state": self.state,
                "next_sequence": self.next_seq, "indexed_blocks": self.events.index.blocks(self.slot),
                "last_event_age_secs": round(time.monotonic() - self.last_event_at, 3) if self.last_event_at else None}

    # --- the subscription ---

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def run(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.endpoint)
        log.info("subscribed to KV events of %s at %s", self.worker.url, self.endpoint)
        watch = asyncio.get_running_loop().create_task(self.watch(monitor))
        try:
            received = 0
            while True:
                frames = await sub.recv_multipart()
                await self.on_message(frames)
                received += 1
                if received % YIELD_EVERY == 0:
                    # a waiting message completes the await at once: let requests run
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass
        finally:
            watch.cancel()
            sub.disable_monitor()
            monitor.close(0)
            sub.close(0)

    async def watch(self, monitor) -> None:
        """The connection's ups and downs. While it is down the worker is
        routed by the character tree; once it is back, what the engine did
        meanwhile is unknown (it may even have restarted, its sequence
        reaching where ours was), so the index is rebuilt: from the replay
        buffer where there is one, else from what comes next. An index that
        misses blocks only routes as if they were not cached; one that keeps
        blocks the engine dropped would route requests to a cache that is
        not there."""
        from zmq.utils.monitor import parse_monitor_message

        connected_before = False
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                if self.state in (LIVE, STALE):
                    self.state = CONNECTING
                log.info("KV events of %s: disconnected from %s", self.worker.url, self.endpoint)
            elif event == zmq.EVENT_CONNECTED:
                if connected_before:
                    self.rejoin = True
                connected_before = True

    async def on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.malformed += 1
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        if self.rejoin:
            self.rejoin = False
            self.rebuild()
            self.next_seq = None            # as a new subscriber: replayed from the start where possible
        if self.next_seq is None:
            if seq != 0 and self.replay_endpoint:
                # joined a running engine: what it stored before is in its replay buffer
                await self.replay(0)
            if self.next_seq is None:
                self.next_seq = seq         # nothing to replay: the index starts here
        if seq >= self.next_seq:
            self.replayed_to = -1           # past what a replay brought: no duplicates follow
        if seq < self.next_seq:
            if seq <= self.replayed_to:
                return                      # already applied from the replay
            # the sequence went back: the publisher restarted, its engine's cache empty
            log.info("KV events of %s restarted at sequence %d", self.worker.url, seq)
            self.rebuild()
        elif seq > self.next_seq:
            self.gaps += 1
            log.warning("KV events of %s: sequence %d after %d (%d batches lost)", self.worker.url, seq,
                        self.next_seq - 1, seq - self.next_seq)
            if self.replay_endpoint:
                await self.replay(self.next_seq)
                if seq < self.next_seq:
                    return                  # the replay brought this one too
            if seq > self.next_seq:
                self.rebuild()
        self.apply(seq, frames[2])

    def apply(self, seq: int, payload: bytes) -> None:
        self.next_seq = seq + 1
        try:
            _, events, _ = decode_batch(payload)
        except MalformedBatch as e:
            # what it said is lost: the index cannot be trusted to match the engine
            self.malformed += 1
            if not self.malformed_logged:
                self.malformed_logged = True
                log.warning("KV events of %s: malformed batch %d (%s): index rebuilt (further malformed batches "
                            "are counted in smg_kv_events_stream_problems_total)", self.worker.url, seq, e)
            self.rebuild()
            return
        self.last_event_at = time.monotonic()
        self.awaiting_since = 0.0
        if self.state in (CONNECTING, STALE):
            if self.state == STALE:
                log.info("KV events of %s resumed", self.worker.url)
            self.state = LIVE
        index = self.events.index
        for tag, fields in events:
            if tag not in self.received:
                self.unknown += 1
                continue
            self.received[tag] += 1
            if tag == "AllBlocksCleared":
                index.cleared(self.slot)
                self.events.cleared[self.slot] = time.monotonic()
                if self.state == OVERFLOW:
                    self.state = LIVE
                self.applied[tag] += 1
                continue
            if self.state == OVERFLOW or fields.get("medium") not in GPU_MEDIA:
                continue
            if tag == "BlockStored":
                if fields.get("lora_id") is not None:
                    continue            # an adapter's blocks: no base-model prompt shares them
                try:
                    index.stored(self.slot, fields["block_hashes"], fields.get("parent_block_hash"),
                                 fields["token_ids"], fields["block_size"])
                except OverflowError:
                    self.state = OVERFLOW
                    index.cleared(self.slot)
                    log.warning("KV events of %s: over %d blocks indexed: routed by the character tree until "
                                "its engine clears its cache", self.worker.url, index.max_blocks_per_slot)
                    continue
                self.events.block_size = fields["block_size"]
            else:
                self.removed_blocks += index.removed(self.slot, fields["block_hashes"])
            self.applied[tag] += 1

    def rebuild(self) -> None:
        """Start the worker's index from nothing (events were lost and cannot be replayed)."""
        self.resyncs += 1
        self.events.index.cleared(self.slot)
        self.events.cleared[self.slot] = time.monotonic()
        if self.state == OVERFLOW:
            self.state = LIVE

    async def replay(self, start: int) -> None:
        """Ask the replay socket for every batch from `start`, and apply them."""
        self.replays += 1
        ctx = zmq.asyncio.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        dealer.connect(self.replay_endpoint)
        first = None
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), REPLAY_TIMEOUT_SECS)
                # SGLang answers [b"", topic, seq, payload], vLLM [b"", seq, payload]
                if len(frames) not in (3, 4) or frames[0] or len(frames[-2]) != 8:
                    self.malformed += 1
                    continue
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == END_SEQ:
                    break
                if first is None:
                    first = seq
                    if seq > start:
                        self.rebuild()      # the buffer no longer holds all that was lost
                if self.next_seq is not None and seq < self.next_seq:
                    continue
                self.apply(seq, frames[-1])
                self.replayed_to = seq
        except asyncio.TimeoutError:
            # what was lost stays unknown (the index misses it); asked again on the next batch
            log.warning("KV events of %s: the replay socket %s did not answer", self.worker.url,
                        self.replay_endpoint)
            self.rejoin = True
        finally:
            dealer.close(0)


class KvEvents:
    """One model's workers' KV-cache events and what they say each holds."""

    def __init__(self, tokenizer: PrefixTokenizer, port: Optional[int] = None, replay_port: Optional[int] = None,
                 port_offset: Optional[int] = None, replay_port_offset: Optional[int] = None, stale_secs: float = 5.0,
                 max_blocks_per_worker: int = 1 << 20, max_tokenize_chars: int = 1 << 18):
        self.tokenizer = tokenizer
        self.port = port
        self.replay_port = replay_port
        self.port_offset = port_offset
        self.replay_port_offset = replay_port_offset
        self.stale_secs = stale_secs
        self.index = BlockIndex(max_blocks_per_worker)
        self.streams: dict[str, EventStream] = {}     # worker id -> its stream
        self.block_size = 0                           # learnt from the events
        self.tokenize_secs = 0.0
        self.tokenized = 0
        self.max_tokenize_chars = max_tokenize_chars
        self.last_blocks = -1           # the last match: the prompt's full blocks (-1: not matched)
        self.last_match: dict = {}      # and each trusted slot's leading blocks held
        self.cleared: dict[int, float] = {}     # slot -> cleared_at
        self.crowded_at = 0.0
        self.crowded_slots: Optional[set] = None

    def endpoints(self, worker) -> tuple[str, Optional[str]]:
        """The worker's publisher and replay addresses: its own (the labels
        smg.ai/kv-events-endpoint and smg.ai/kv-events-replay-endpoint),
        else on its host the configured ports (or its HTTP port plus the
        offsets); each plus its data-parallel rank, as the engines offset
        theirs."""
        rank = max(worker.dp_rank, 0)
        labels = (worker.dp_parent if worker.dp_parent is not None else worker).labels or {}
        own = labels.get(KV_EVENTS_LABEL)
        if own:
            replay = labels.get(KV_REPLAY_LABEL)
            return _plus(own, rank), (_plus(replay, rank) if replay else None)
        host = worker.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        if self.port_offset is not None:
            http = worker.dp_parent.port if worker.dp_parent is not None else worker.port
            replay = f"tcp://{host}:{http + self.replay_port_offset + rank}" \
                if self.replay_port_offset is not None else None
            return f"tcp://{host}:{http + self.port_offset + rank}", replay
        replay = f"tcp://{host}:{self.replay_port + rank}" if self.replay_port else None
        return f"tcp://{host}:{self.port + rank}", replay

    def workers_changed(self, policy, ready: list) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return                      # no loop (a test's policy): streams start with the next change
        for w in ready:
            endpoint, replay = self.endpoints(w)
            stream = self.streams.get(w.id)
            if stream is not None and (stream.endpoint, stream.replay_endpoint) == (endpoint, replay):
                continue
            if stream is not None:
                # its address changed (PATCH /workers/{id}): what the old one said no longer holds
                stream.stop()
                self.index.cleared(stream.slot)
            stream = EventStream(self, w, policy.slot_py(w), endpoint, replay)
            self.streams[w.id] = stream
            stream.start()

    def worker_removed(self, worker, slot: Optional[int]) -> None:
        stream = self.streams.pop(worker.id, None)
        if stream is not None:
            stream.stop()
        if slot is not None:
            self.index.cleared(slot)

    def holdings(self, text: str, slots: dict, now: float) -> Optional[dict]:
        """{slot: leading characters of `text` the slot's engine holds} for
        the slots among `slots` ({worker id: slot}) whose streams are
        trusted, or None when none is (or the block size is not known yet:
        no block stored so far)."""
        self.last_blocks = -1
        mask = 0
        for wid, slot in slots.items():
            stream = self.streams.get(wid)
            if stream is not None and stream.trusted(now):
                mask |= 1 << slot
        if not mask or not self.block_size:
            return None
        t0 = time.perf_counter()
        tokens = self.tokenizer.encode(text if len(text) <= self.max_tokenize_chars
                                       else text[:self.max_tokenize_chars], self.block_size)
        hashes = tokens.hashes
        blocks = self.index.match(hashes, mask)
        self.tokenize_secs += time.perf_counter() - t0
        self.tokenized += 1
        held = {}
        for slot in slots_in(mask):
            held[slot] = tokens.chars_of(blocks.get(slot, 0))
        self.last_blocks = len(hashes)
        self.last_match = blocks
        return held

    def crowded(self, now: float) -> Optional[set]:
        """The slots of live workers evicting much faster than the others
        (CROWDED_FACTOR), refigured every CROWDED_RECHECK_SECS."""
        if now - self.crowded_at < CROWDED_RECHECK_SECS:
            return self.crowded_slots
        dt = now - self.crowded_at if self.crowded_at else 0.0
        self.crowded_at = now
        keep = math.exp(-dt / EVICTION_SMOOTHING_SECS) if dt else 1.0
        live = []
        for s in self.streams.values():
            if dt:
                rate = (s.removed_blocks - s.removed_seen) / dt
                s.eviction_rate = s.eviction_rate * keep + rate * (1.0 - keep)
            s.removed_seen = s.removed_blocks
            if s.state == LIVE:
                live.append(s)
        if len(live) < 2:
            self.crowded_slots = None
            return None
        mean = sum(s.eviction_rate for s in live) / len(live)
        bar = max(CROWDED_FACTOR * mean, CROWDED_FLOOR)
        self.crowded_slots = {s.slot for s in live if s.eviction_rate > bar} or None
        return self.crowded_slots

    def cleared_at(self, slot: int) -> float:
        """When (time.monotonic) the slot's engine last emptied its cache or
        its index was rebuilt: what was sent it before is not pending there."""
        return self.cleared.get(slot, 0.0)

    def sent(self, worker_id: str, slot: int, uncached_chars: int, now: float) -> None:
        """The request just matched (holdings) went to this worker, which
        holds all but `uncached_chars` of it: when that is at least a
        block, its engine is to publish what it stores."""
        stream = self.streams.get(worker_id)
        if stream is None:
            return
        if self.last_blocks >= 0:
            stores = self.last_blocks > self.last_match.get(slot, 0)
        else:
            # not matched by tokens: a block is at most ~4 characters a token
            stores = uncached_chars >= 8 * max(self.block_size, 16)
        if stores:
            stream.expect_events(now)

    def snapshot(self) -> list[dict]:
        return [{"worker": s.worker.url, "state": s.state, "blocks": self.index.blocks(s.slot),
                 "received": dict(s.received), "applied": dict(s.applied), "unknown": s.unknown,
                 "malformed": s.malformed, "gaps": s.gaps, "replays": s.replays, "resyncs": s.resyncs}
                for s in self.streams.values()]

    def close(self) -> None:
        for s in self.streams.values():
            s.stop()
        self.streams.clear()


def _plus(endpoint: str, rank: int) -> str:
    """tcp://host:port moved up by a data-parallel rank (an ipc:// path gets _dpN)."""
    if not rank:
        return endpoint
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint.rpartition(":")
        return f"{host}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"


def streams_of(router) -> dict:
    """{worker id: its event stream, as GET /workers shows it} over the
    router's precise cache_aware groups (a DP rank's under its worker's id,
    in "dp_ranks")."""
    out: dict[str, dict] = {}
    for group in list(router.groups.values()):
        kv = getattr(group.policy, "kv", None)
        if kv is None:
            continue
        for stream in kv.streams.values():
            w = stream.worker
            if w.dp_parent is not None:
                out.setdefault(w.dp_parent.id, {"dp_ranks": []})["dp_ranks"].append(
                    {"dp_rank": w.dp_rank, **stream.describe()})
            else:
                out[w.id] = stream.describe()
    return out
