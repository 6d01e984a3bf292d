"""Precise cache_aware routing from the engines' KV-cache events
(--kv-events-port): the wire format against SGLang's own definitions and
publisher, the block index, the stream's sequence handling (gaps, replays,
restarts, stalls, floods), and routing through the real gateway over
simulated engines that publish events."""

from __future__ import annotations

import asyncio
import glob
import os
import random
import subprocess
import sys
import types
import zipfile

import msgspec
import pytest
from helpers import free_port, request, wait_for

from smg._fast.kvindex import BlockIndex, chain_hashes
from smg._fast.worker import READY, Worker
from smg.kv_events import LIVE, OVERFLOW, STALE, KvEvents, MalformedBatch, decode_batch
from smg.simulated_engine import write_tokenizer
from smg.workers import KV_EVENTS_LABEL, KV_REPLAY_LABEL

WORDS = ("the of and to in is was for on that with as by at from this be are model token cache prefix worker "
         "request route gateway latency batch prefill decode kernel memory tensor layer").split()
SGLANG = "sglang==0.5.23"


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    rng = random.Random(7)
    return write_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"),
                           [words(rng, 300) for _ in range(40)], vocab_size=600)


@pytest.fixture(scope="module")
def sglang_events():
    """SGLang's kv_events module, from its published wheel (downloaded once
    into ~/.cache/smg-tests). Its two imports outside the event definitions
    (the scheduler's parallel context, address parsing) are stubbed: the
    structs, the encoder and ZmqEventPublisher are SGLang's own."""
    cache = os.environ.get("SMG_TEST_CACHE", os.path.expanduser("~/.cache/smg-tests"))
    os.makedirs(cache, exist_ok=True)
    wheels = glob.glob(os.path.join(cache, "sglang-0.5.23-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", SGLANG, "--no-deps", "-q", "-d", cache],
                              capture_output=True, timeout=600)
        wheels = glob.glob(os.path.join(cache, "sglang-0.5.23-*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(f"could not download {SGLANG}: {done.stderr.decode()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        source = z.read("sglang/srt/disaggregation/kv_events.py")
    stubs = {name: types.ModuleType(name) for name in
             ("sglang", "sglang.srt", "sglang.srt.runtime_context", "sglang.srt.utils", "sglang.srt.utils.network")}
    stubs["sglang.srt.runtime_context"].get_parallel = lambda: None
    stubs["sglang.srt.utils.network"].NetworkAddress = object
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module = types.ModuleType("sglang_kv_events")
        exec(compile(source, "sglang/srt/disaggregation/kv_events.py", "exec"), module.__dict__)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


# --- the wire format --------------------------------------------------------

def test_sglang_batches_decode(sglang_events):
    sg = sglang_events
    batch = sg.KVEventBatch(ts=12.5, events=[
        sg.BlockStored(block_hashes=[-5, 7], parent_block_hash=None, token_ids=list(range(32)), block_size=16,
                       lora_id=None, medium="GPU", session_id="s1"),
        sg.BlockRemoved(block_hashes=[7], medium="GPU"),
        sg.AllBlocksCleared(),
    ], attn_dp_rank=3)
    ts, events, rank = decode_batch(msgspec.msgpack.Encoder().encode(batch))
    assert ts == 12.5 and rank == 3
    assert [tag for tag, _ in events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    stored = events[0][1]
    assert stored["block_hashes"] == [-5, 7] and stored["parent_block_hash"] is None
    assert stored["token_ids"] == list(range(32)) and stored["block_size"] == 16 and stored["medium"] == "GPU"
    assert events[1][1]["block_hashes"] == [7]


def test_vllm_shaped_batches_decode():
    # vLLM's batch is a map ({ts, events, data_parallel_rank}) and newer vLLM names blocks by bytes
    payload = msgspec.msgpack.encode({"ts": 1.0, "data_parallel_rank": 0, "events": [
        {"type": "BlockStored", "block_hashes": [b"\x01" * 32], "parent_block_hash": b"\x02" * 32,
         "token_ids": [1, 2, 3, 4], "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None},
        ["BlockRemoved", [b"\x01" * 32], "GPU"]]})
    _, events, rank = decode_batch(payload)
    assert rank == 0
    assert events[0][1]["parent_block_hash"] == b"\x02" * 32
    assert events[1] == ("BlockRemoved", {"block_hashes": [b"\x01" * 32], "medium": "GPU"})


@pytest.mark.parametrize("payload", [
    b"\xc1",                                                            # not msgpack
    msgspec.msgpack.encode("events"),                                   # not a batch
    msgspec.msgpack.encode([1.0, "x"]),                                 # events not a list
    msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": ["a"], "token_ids": [1],
                                   "block_size": 1}]]),                  # a hash that is a string
    msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1],
                                   "block_size": 0}]]),                  # block size 0
    msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved"}]]),          # no hashes
    msgspec.msgpack.encode([1.0, [42]]),                                # an event that is a number
])
def test_malformed_batches_are_refused(payload):
    with pytest.raises(MalformedBatch):
        decode_batch(payload)


def test_an_unknown_event_type_is_kept_by_name():
    _, events, _ = decode_batch(msgspec.msgpack.encode([1.0, [{"type": "BlockOffloaded", "x": 1}]]))
    assert events == [("BlockOffloaded", {})]


# --- the block index ---------------------------------------------------------

def test_index_names_blocks_by_their_tokens_not_the_engines_hashes():
    ix = BlockIndex()
    tokens = list(range(80))
    hashes = chain_hashes(tokens, 16)
    assert len(hashes) == 5                                     # full blocks only
    # two engines store the same prompt under unrelated hashes, in differently cut events
    ix.stored(0, [101, 102, 103], None, tokens[:48], 16)
    ix.stored(0, [104], 103, tokens[48:64], 16)
    ix.stored(1, [9001, 9002], None, tokens[:32], 16)
    assert ix.match(hashes, 0b11) == {0: 4, 1: 2}
    assert ix.match(hashes, 0b10) == {1: 2}                     # only the slots asked about
    assert ix.match(chain_hashes([5] + tokens[1:], 16), 0b11) == {}   # another first block: nothing held
    assert len(ix) == 4 and ix.blocks(0) == 4 and ix.blocks(1) == 2
    assert ix.removed(0, [103, 104, 999]) == 2
    assert ix.match(hashes, 0b11) == {0: 2, 1: 2}
    ix.cleared(1)
    assert ix.match(hashes, 0b11) == {0: 2} and ix.blocks(1) == 0


def test_a_block_whose_parent_is_unknown_is_not_indexed():
    ix = BlockIndex()
    assert ix.stored(0, [5], 4, list(range(16)), 16) == 0
    assert ix.unknown_parents == 1 and len(ix) == 0


def test_index_refuses_more_blocks_than_its_budget():
    ix = BlockIndex(max_blocks_per_slot=3)
    ix.stored(0, [1, 2], None, list(range(32)), 16)
    with pytest.raises(OverflowError):
        ix.stored(0, [3, 4], 2, list(range(32, 64)), 16)


# --- one stream, fed directly ------------------------------------------------

class _Tokenizer:
    def encode(self, text):
        raise AssertionError("not used here")


def _stream(max_blocks=1 << 20):
    events = KvEvents(_Tokenizer(), port=1, max_blocks_per_worker=max_blocks)
    w = Worker("w0", "http://127.0.0.1:9")
    from smg.kv_events import EventStream
    stream = EventStream(events, w, 0, "tcp://127.0.0.1:1", None)
    events.streams[w.id] = stream
    return events, stream


def _frames(seq: int, events: list) -> list[bytes]:
    return [b"", seq.to_bytes(8, "big"), msgspec.msgpack.encode([1.0, events, None])]


def _stored(hashes, parent, first_token):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": list(range(first_token, first_token + 16 * len(hashes))), "block_size": 16,
            "lora_id": None, "medium": "GPU"}


def test_a_gap_without_a_replay_socket_rebuilds_the_index():
    events, s = _stream()
    asyncio.run(s.on_message(_frames(0, [_stored([1, 2], None, 0)])))
    assert s.state == LIVE and events.index.blocks(0) == 2
    asyncio.run(s.on_message(_frames(3, [_stored([9], None, 500)])))   # 1 and 2 were lost
    assert s.gaps == 1 and s.resyncs == 1
    assert events.index.blocks(0) == 1 and s.next_seq == 4


def test_a_sequence_going_back_is_a_restarted_publisher():
    events, s = _stream()
    for seq in range(3):
        asyncio.run(s.on_message(_frames(seq, [_stored([seq + 1], seq or None, 16 * seq)])))
    assert events.index.blocks(0) == 3
    asyncio.run(s.on_message(_frames(0, [_stored([77], None, 0)])))
    assert s.resyncs == 1 and events.index.blocks(0) == 1 and s.next_seq == 1


def test_malformed_and_unknown_events_change_nothing_but_counters():
    events, s = _stream()
    asyncio.run(s.on_message(_frames(0, [_stored([1], None, 0), {"type": "Mystery"}])))
    assert s.unknown == 1 and events.index.blocks(0) == 1
    asyncio.run(s.on_message([b"", b"short", b""]))                   # a bad sequence frame: ignored
    asyncio.run(s.on_message([b"", (1).to_bytes(8, "big"), b"\xc1"]))  # a bad payload: what it said is lost
    assert s.malformed == 2 and events.index.blocks(0) == 0 and s.resyncs == 1
    # other tiers and adapters do not make a prefill hit
    cpu = dict(_stored([5], None, 0), medium="CPU_PINNED")
    lora = dict(_stored([6], None, 0), lora_id=3)
    asyncio.run(s.on_message(_frames(2, [cpu, lora])))
    assert events.index.blocks(0) == 0 and s.applied["BlockStored"] == 1


def test_a_flooding_publisher_is_bounded_then_recovers_on_clear():
    events, s = _stream(max_blocks=4)
    asyncio.run(s.on_message(_frames(0, [_stored([1, 2, 3], None, 0)])))
    asyncio.run(s.on_message(_frames(1, [_stored([4, 5, 6], 3, 48)])))
    assert s.state == OVERFLOW and events.index.blocks(0) == 0
    assert not s.trusted(0.0)
    asyncio.run(s.on_message(_frames(2, [_stored([7], None, 0)])))    # ignored while over
    assert events.index.blocks(0) == 0
    asyncio.run(s.on_message(_frames(3, [{"type": "AllBlocksCleared"}, _stored([8], None, 0)])))
    assert s.state == LIVE and events.index.blocks(0) == 1


def test_a_stream_that_goes_quiet_after_a_request_is_not_trusted():
    events, s = _stream()
    events.stale_secs = 1.0
    asyncio.run(s.on_message(_frames(0, [_stored([1], None, 0)])))
    assert s.trusted(100.0)
    s.expect_events(100.0)
    assert s.trusted(100.5)
    assert not s.trusted(101.5) and s.state == STALE
    asyncio.run(s.on_message(_frames(1, [_stored([2], 1, 16)])))
    assert s.state == LIVE and s.trusted(102.0)


# --- SGLang's own publisher ---------------------------------------------------

def test_a_late_subscriber_gets_what_it_missed_from_sglangs_replay_socket(sglang_events, tokenizer_path):
    sg = sglang_events
    pub_port, replay_port = free_port(), free_port()
    publisher = sg.ZmqEventPublisher(0, endpoint=f"tcp://127.0.0.1:{pub_port}",
                                     replay_endpoint=f"tcp://127.0.0.1:{replay_port}", bind=True)
    tokens = list(range(16 * 40))
    seq_blocks = []

    def publish(i: int) -> None:
        seq_blocks.append(i)
        publisher.publish(sg.KVEventBatch(ts=float(i), events=[sg.BlockStored(
            block_hashes=[1000 + i], parent_block_hash=1000 + i - 1 if i else None,
            token_ids=tokens[16 * i:16 * (i + 1)], block_size=16, lora_id=None, medium="GPU")]))

    async def main():
        from smg.tokenizer import load_tokenizer
        events = KvEvents(load_tokenizer(tokenizer_path), port=pub_port, replay_port=replay_port)
        for i in range(5):                      # before anyone listens
            publish(i)
        publisher._event_queue.join()           # (its thread has sent them)
        w = Worker("w0", "http://127.0.0.1:9")

        class Policy:
            def slot_py(self, worker):
                return 0

        events.workers_changed(Policy(), [w])
        stream = events.streams["w0"]
        i = 5
        while stream.next_seq is None:          # until the subscription is up (ZeroMQ joins lazily)
            publish(i)
            i += 1
            await asyncio.sleep(0.02)
            assert i < 300, "the subscriber never received a batch"
        publish(i)
        i += 1
        deadline = asyncio.get_running_loop().time() + 10
        while stream.next_seq < i and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert stream.replays == 1 and stream.state == LIVE
        # every block, the ones sent before it subscribed included, is indexed as one chain
        assert events.index.match(chain_hashes(tokens[:16 * i], 16), 1) == {0: i}
        events.close()

    try:
        asyncio.run(main())
    finally:
        import atexit

        publisher.shutdown()
        atexit.unregister(publisher.shutdown)   # (SGLang's publisher shuts itself down at exit too)


# --- through the gateway, over simulated engines --------------------------------

def _sim_worker(fake_workers, tokenizer_path, cache_chars=200_000, replay=True):
    (w,) = fake_workers(1, simulate=True, sim_tokenizer=tokenizer_path, sim_kv_events_port=free_port(),
                        sim_kv_replay_port=free_port() if replay else 0, sim_cache_chars=cache_chars,
                        sim_prefill_chars_per_sec=5e6, sim_decode_step=0.001)
    return w


def _add(g, w, replay=True):
    labels = {KV_EVENTS_LABEL: f"tcp://127.0.0.1:{w.config.sim_kv_events_port}"}
    if replay:
        labels[KV_REPLAY_LABEL] = f"tcp://127.0.0.1:{w.config.sim_kv_replay_port}"
    r = request(g.port, "POST", "/workers", {"url": w.url, "labels": labels})
    assert r.status == 202, r


def _gateway(gateway, tokenizer_path, *extra):
    return gateway(["--policy", "cache_aware", "--kv-events-port", "5557", "--tokenizer-path", tokenizer_path,
                    *extra])


def _stream_of(g, w) -> dict:
    (info,) = [x for x in g.workers() if x["url"] == w.url]
    return info.get("kv_events") or {}


def _generate(port: int, text: str) -> None:
    r = request(port, "POST", "/generate", {"text": text, "stream": True,
                                            "sampling_params": {"max_new_tokens": 2}})
    assert r.status == 200, r


def _engine(w) -> dict:
    return w.engine.stats()


def _wait_indexed(g, w, message="the gateway's index to match the engine"):
    return wait_for(lambda: _stream_of(g, w).get("state") == "live"
                    and _stream_of(g, w)["indexed_blocks"] == _engine(w)["cached_blocks"], message=message)


def _two_engines(fake_workers, gateway, tokenizer_path):
    """Two simulated engines publishing events, behind one precise gateway."""
    a, b = (_sim_worker(fake_workers, tokenizer_path) for _ in range(2))
    g = _gateway(gateway, tokenizer_path)
    for w in (a, b):
        _add(g, w)
    g.wait_ready_workers(2)
    return a, b, g


def test_routes_to_the_worker_whose_engine_holds_the_prompt(fake_workers, gateway, tokenizer_path):
    a, b, g = _two_engines(fake_workers, gateway, tokenizer_path)
    rng = random.Random(3)
    doc = "[doc] " + words(rng, 600)
    _generate(g.port, doc + " first question")
    owner, other = (a, b) if _engine(a)["requests"] else (b, a)
    _wait_indexed(g, owner)
    # another router fed the document to the other engine, then the owner's cache was flushed:
    # the gateway's own character tree still says "owner", the engines say "other"
    _generate(other.port, doc + " from elsewhere")
    request(owner.port, "POST", "/flush_cache", {})
    _wait_indexed(g, other)
    _wait_indexed(g, owner)
    before = _engine(other)["cached_chars"]
    _generate(g.port, doc + " second question")
    assert _engine(other)["requests"] == 2, "routed to the worker its character tree remembers, not the holder"
    assert _engine(other)["cached_chars"] - before >= len(doc) * 0.9


def test_a_sequence_gap_is_replayed_from_the_engine(fake_workers, gateway, tokenizer_path):
    w = _sim_worker(fake_workers, tokenizer_path)
    g = _gateway(gateway, tokenizer_path)
    _add(g, w)
    g.wait_ready_workers(1)
    rng = random.Random(4)
    _generate(g.port, words(rng, 200))
    _wait_indexed(g, w)
    request(w.port, "POST", "/_fake/kv_events", {"drop": 1})
    _generate(g.port, words(rng, 200))                      # its batch is not sent: a gap
    _generate(g.port, words(rng, 200))
    _wait_indexed(g, w)
    m = g.metrics()
    assert f'smg_kv_events_stream_problems_total{{model="fake-model",problem="gaps",worker="{w.url}"}} 1.0' in m
    assert f'problem="resyncs",worker="{w.url}"}} 0.0' in m and f'problem="replays",worker="{w.url}"}} 1.0' in m


def test_a_gap_without_replay_rebuilds_the_index(fake_workers, gateway, tokenizer_path):
    w = _sim_worker(fake_workers, tokenizer_path, replay=False)
    g = _gateway(gateway, tokenizer_path)
    _add(g, w, replay=False)
    g.wait_ready_workers(1)
    rng = random.Random(5)
    _generate(g.port, words(rng, 200))
    _wait_indexed(g, w)
    request(w.port, "POST", "/_fake/kv_events", {"drop": 1})
    _generate(g.port, words(rng, 300))
    _generate(g.port, words(rng, 200))
    # rebuilt from the batch after the gap: it holds that batch's blocks, and not the lost ones
    wait_for(lambda: f'problem="resyncs",worker="{w.url}"}} 1.0' in g.metrics(), message="a resync")
    assert 0 < _stream_of(g, w)["indexed_blocks"] < _engine(w)["cached_blocks"]


@pytest.mark.parametrize("fault", ["restart", "reopen"])
def test_a_restarted_engine_or_a_dropped_connection_is_followed(fault, fake_workers, gateway, tokenizer_path):
    w = _sim_worker(fake_workers, tokenizer_path)
    g = _gateway(gateway, tokenizer_path)
    _add(g, w)
    g.wait_ready_workers(1)
    rng = random.Random(9)
    for _ in range(3):
        _generate(g.port, words(rng, 200))
    _wait_indexed(g, w)
    held = _stream_of(g, w)["indexed_blocks"]
    # restart: the engine comes back empty, its sequence from 0; reopen: same engine, same sequence
    request(w.port, "POST", "/_fake/kv_events", {fault: True})

    def followed():
        _generate(g.port, words(rng, 50))
        s = _stream_of(g, w)
        return s["state"] == "live" and s["indexed_blocks"] == _engine(w)["cached_blocks"] and \
            f'problem="resyncs",worker="{w.url}"}} 1.0' in g.metrics()

    wait_for(followed, message=f"the index to follow the engine after a {fault}")
    if fault == "restart":
        assert _engine(w)["cached_blocks"] < held
    else:
        assert _stream_of(g, w)["indexed_blocks"] > held


def test_events_that_stop_fall_back_to_the_tree_logged_once(fake_workers, gateway, tokenizer_path):
    w = _sim_worker(fake_workers, tokenizer_path)
    g = _gateway(gateway, tokenizer_path, "--kv-events-stale-secs", "0.3")
    _add(g, w)
    g.wait_ready_workers(1)
    rng = random.Random(6)
    _generate(g.port, words(rng, 200))
    _wait_indexed(g, w)
    request(w.port, "POST", "/_fake/kv_events", {"paused": True})
    _generate(g.port, words(rng, 200))

    def stale():
        _generate(g.port, words(rng, 200))                   # the next pick finds the stream quiet
        return _stream_of(g, w)["state"] == "stale"

    wait_for(stale, message="the stream to be marked stale")
    assert 'smg_kv_events_workers_on_fallback{model="fake-model"} 1.0' in g.metrics()
    _generate(g.port, words(rng, 200))
    assert g.logs().count(f"KV events of {w.url} stopped") == 1
    request(w.port, "POST", "/_fake/kv_events", {"paused": False})
    _generate(g.port, words(rng, 200))
    wait_for(lambda: _stream_of(g, w)["state"] == "live", message="the stream live again")


def test_two_gateways_see_the_same_blocks(fake_workers, gateway, tokenizer_path):
    ws = [_sim_worker(fake_workers, tokenizer_path) for _ in range(2)]
    gs = [_gateway(gateway, tokenizer_path) for _ in range(2)]
    for g in gs:
        for w in ws:
            _add(g, w)
        g.wait_ready_workers(2)
    rng = random.Random(8)
    for i in range(6):
        _generate(gs[i % 2].port, words(rng, 150))
    for g in gs:
        for w in ws:
            _wait_indexed(g, w)


# --- flags and addresses ---------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--kv-events-port", "5557"], "--tokenizer-path or --model-path"),
    (["--kv-events-port", "5557", "--tokenizer-path", "/nonexistent"], "local paths only"),
    (["--kv-events-port", "5557", "--tokenizer-path", "TOK", "--policy", "round_robin"], "--policy cache_aware"),
    (["--kv-events-replay-port", "5558"], "needs --kv-events-port"),
    (["--kv-events-port", "5557", "--kv-events-port-offset", "100", "--tokenizer-path", "TOK"], "not both"),
])
def test_bad_kv_event_flags_exit_2(args, message, tokenizer_path):
    args = [tokenizer_path if a == "TOK" else a for a in args]
    done = subprocess.run([sys.executable, "-m", "smg", *args], capture_output=True, timeout=30)
    assert done.returncode == 2 and message in done.stderr.decode(), done.stderr


def test_a_bad_endpoint_label_is_refused_by_the_admin_api(gateway, tokenizer_path):
    g = _gateway(gateway, tokenizer_path)
    r = request(g.port, "POST", "/workers", {"url": "http://127.0.0.1:9", "labels": {KV_EVENTS_LABEL: "127.0.0.1"}})
    assert r.status == 400 and "tcp://HOST:PORT" in r.json()["error"]
    assert g.workers() == []


def test_endpoints_follow_labels_ports_offsets_and_ranks():
    w = Worker("w", "http://10.0.0.5:8000")
    assert KvEvents(None, 5557, 5558).endpoints(w) == ("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")
    assert KvEvents(None, port_offset=100).endpoints(w) == ("tcp://10.0.0.5:8100", None)
    w.labels = {KV_EVENTS_LABEL: "tcp://10.0.0.9:7000"}
    assert KvEvents(None, 5557, 5558).endpoints(w) == ("tcp://10.0.0.9:7000", None)
    rank = Worker("w@1", "http://10.0.0.5:8000")
    rank.dp_rank, rank.dp_parent = 1, w
    assert KvEvents(None, 5557).endpoints(rank) == ("tcp://10.0.0.9:7001", None)


def test_pod_annotations_name_each_workers_publisher():
    from smg.discovery.kubernetes import PodInfo
    from smg.discovery.reconcile import Planner

    planner = Planner(8000, "sglang.ai/worker-ports", "sglang.ai/bootstrap-port", None)
    pod = PodInfo(name="p", namespace="n", uid="u", ip="10.1.2.3", phase="Running", ready=True, deleting=False,
                  role="regular", labels={}, annotations={"sglang.ai/worker-ports": "8000,8001",
                                               "smg.ai/kv-events-port": "5557,5558",
                                               "smg.ai/kv-events-replay-port": "oops"})
    assert planner.kv_event_labels(pod, 8001) == {KV_EVENTS_LABEL: "tcp://10.1.2.3:5558"}


def test_without_the_flags_nothing_of_it_is_imported():
    code = ("import sys; from smg.cli import config_from_args; from smg.gateway import build_router, Gateway; "
            "import smg.supervisor, smg.dataplane; "
            "cfg = config_from_args(['--worker-urls', 'http://127.0.0.1:9']); r = build_router(cfg); "
            "r.policy_factory(0); "
            "print(sorted(m for m in ('zmq', 'msgspec', 'tokenizers', 'smg.kv_events', 'smg._fast.kvindex') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.stdout.decode().strip() == "[]", done.stderr.decode()


# --- placement past crowded engines -------------------------------------------

def test_engines_evicting_much_faster_than_the_rest_are_crowded():
    events = KvEvents(None, port=1)
    from smg.kv_events import EventStream
    streams = []
    for i in range(4):
        s = EventStream(events, Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}"), i, "tcp://127.0.0.1:1", None)
        s.state = LIVE
        events.streams[s.worker.id] = s
        streams.append(s)
    assert events.crowded(100.0) is None          # nothing evicted yet
    for t in range(1, 21):
        for i, s in enumerate(streams):
            s.removed_blocks += (60 if i == 2 else 10)   # worker 2 turns its cache over six times as fast
        now = 100.0 + t
        crowded = events.crowded(now)
    assert crowded == {2}
    streams[2].state = STALE                        # not live: its rate is not trusted
    assert events.crowded(now + 1) is None


class _Reported:
    """A KvEvents stand-in: no worker holds anything; `busy` are crowded."""

    def __init__(self, busy):
        self.busy = busy

    def holdings(self, text, slots, now):
        return {slot: 0 for slot in slots.values()}

    def cleared_at(self, slot):
        return 0.0

    def crowded(self, now):
        return self.busy

    def sent(self, *args):
        pass

    def workers_changed(self, policy, ready):
        pass

    def worker_removed(self, worker, slot):
        pass


def test_a_new_prefix_is_placed_past_crowded_engines():
    from smg._fast.policies import CacheAwarePolicy

    ready = [Worker(f"w{i}", f"http://127.0.0.1:{9100 + i}") for i in range(4)]
    for w in ready:
        w.state = READY
    plain = CacheAwarePolicy()
    home = plain.place_py(ready, "a new prompt " * 40)
    policy = CacheAwarePolicy()
    policy.kv = _Reported(None)
    assert policy.pick_py(ready, "a new prompt " * 40, None, 1.0) is home    # rendezvous, as without events
    policy = CacheAwarePolicy()
    policy.kv = _Reported(None)
    for w in ready:
        policy.slot_py(w)
    policy.kv.busy = {policy.slot_of(home)}
    other = policy.pick_py(ready, "a new prompt " * 40, None, 1.0)
    assert other is not home and other is plain.place_py([w for w in ready if w is not home], "a new prompt " * 40)
    fresh = CacheAwarePolicy()                                # all crowded: as if none were
    fresh.kv = _Reported({0, 1, 2, 3})
    for w in ready:
        fresh.slot_py(w)
    assert fresh.pick_py(ready, "a new prompt " * 40, None, 1.0) is home


def test_a_hostile_publisher_flooding_garbage_is_counted_and_the_gateway_answers(fake_workers, gateway,
                                                                                 tokenizer_path):
    import threading
    import time

    import zmq

    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    (w,) = fake_workers(1)
    g = _gateway(gateway, tokenizer_path)
    r = request(g.port, "POST", "/workers", {"url": w.url, "labels": {KV_EVENTS_LABEL: f"tcp://127.0.0.1:{port}"}})
    assert r.status == 202
    g.wait_ready_workers(1)
    stop = threading.Event()

    def flood():
        seq = 0
        while not stop.is_set():
            for _ in range(200):
                pub.send_multipart([b"", seq.to_bytes(8, "big"), b"\xc1 not msgpack"])
                seq += 1
            pub.send_multipart([b"", b"bad", b""])
            time.sleep(0.001)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        wait_for(lambda: f'problem="malformed",worker="{w.url}"}} ' in g.metrics()
                 and float(g.metrics().split(f'problem="malformed",worker="{w.url}"}} ')[1].split()[0]) > 5000,
                 message="thousands of malformed batches counted")
        for _ in range(20):         # answered while the flood goes on
            t0 = time.monotonic()
            assert request(g.port, "GET", "/liveness", timeout=2).status == 200
            assert time.monotonic() - t0 < 1.0
        _generate(g.port, "a request routed meanwhile " * 20)
    finally:
        stop.set()
        t.join(5)
        pub.close(0)
        ctx.term()
    assert _stream_of(g, w)["state"] == "connecting"       # garbage never makes a stream trusted
    assert g.logs().count(": malformed batch ") == 1


# --- chat requests through the model's chat template --------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizer_path):
    import json
    import shutil

    folder = tmp_path_factory.mktemp("chat-model")
    shutil.copy(tokenizer_path, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "bos_token": "<s>"}))
    return str(folder)


def test_a_chat_is_rendered_as_its_engine_renders_it(chat_model):
    from smg.tokenizer import load_chat_template

    template = load_chat_template(chat_model)
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert template.render(body) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    assert template.render({"messages": "not a list"}) is None


def test_chat_requests_are_routed_by_what_the_engines_hold(fake_workers, gateway, chat_model):
    a, b, g = _two_engines(fake_workers, gateway, chat_model)
    rng = random.Random(11)
    system = {"role": "system", "content": "[sys] " + words(rng, 500)}

    def chat(port, question):
        r = request(port, "POST", "/v1/chat/completions", {"model": "fake-model", "stream": True, "max_tokens": 2,
                                                           "messages": [system, {"role": "user", "content": question}]})
        assert r.status == 200, r

    chat(g.port, "first question")
    owner, other = (a, b) if _engine(a)["requests"] else (b, a)
    _wait_indexed(g, owner)
    chat(other.port, "asked elsewhere")          # another router's chat fills the other engine
    request(owner.port, "POST", "/flush_cache", {})
    _wait_indexed(g, other)
    _wait_indexed(g, owner)
    before = _engine(other)["cached_chars"]
    chat(g.port, "second question")
    assert _engine(other)["requests"] == 2, "the chat went where the tree remembers, not to the holder"
    assert _engine(other)["cached_chars"] - before >= len(system["content"]) * 0.9


def test_a_chat_template_that_does_not_parse_exits_2(tmp_path, tokenizer_path):
    import json
    import shutil

    shutil.copy(tokenizer_path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    done = subprocess.run([sys.executable, "-m", "smg", "--kv-events-port", "5557", "--model-path", str(tmp_path)],
                          capture_output=True, timeout=30)
    assert done.returncode == 2 and b"chat template does not parse" in done.stderr


def test_every_data_plane_process_follows_the_events(fake_workers, gateway, tokenizer_path):
    w = _sim_worker(fake_workers, tokenizer_path)
    g = _gateway(gateway, tokenizer_path, "--workers", "2")
    _add(g, w)
    g.wait_ready_workers(1)
    rng = random.Random(12)
    for _ in range(4):                  # over both processes' connections
        _generate(g.port, words(rng, 200))
    # GET /workers shows the stream live only where it is live in both processes
    _wait_indexed(g, w, "both processes' index to match the engine")
    m = g.metrics()
    assert f'smg_kv_events_indexed_blocks{{model="fake-model",worker="{w.url}"}} {_engine(w)["cached_blocks"]}.0' in m
    assert 'smg_kv_events_tokenized_requests_total{model="fake-model",reuse="whole"}' in m


def test_patching_a_workers_endpoint_moves_its_stream(fake_workers, gateway, tokenizer_path):
    w = _sim_worker(fake_workers, tokenizer_path)
    g = _gateway(gateway, tokenizer_path, "--workers", "2")
    r = request(g.port, "POST", "/workers", {"url": w.url, "labels": {KV_EVENTS_LABEL: "tcp://127.0.0.1:9"}})
    assert r.status == 202
    (info,) = g.wait_ready_workers(1)
    wait_for(lambda: _stream_of(g, w).get("endpoint") == "tcp://127.0.0.1:9", message="the first address")
    r = request(g.port, "PATCH", f"/workers/{info['id']}",
                {"labels": {KV_EVENTS_LABEL: f"tcp://127.0.0.1:{w.config.sim_kv_events_port}"}})
    assert r.status == 202
    rng = random.Random(13)

    def followed():
        _generate(g.port, words(rng, 100))
        s = _stream_of(g, w)
        return s["endpoint"].endswith(f":{w.config.sim_kv_events_port}") and s["state"] == "live"

    wait_for(followed, message="both processes' streams at the new address")


def test_a_worker_that_never_publishes_is_logged_once(fake_workers, gateway, tokenizer_path):
    (w,) = fake_workers(1)                      # no publisher behind the address
    g = _gateway(gateway, tokenizer_path, "--kv-events-stale-secs", "0.2")
    silent = f"tcp://127.0.0.1:{free_port()}"
    r = request(g.port, "POST", "/workers", {"url": w.url, "labels": {KV_EVENTS_LABEL: silent}})
    assert r.status == 202
    g.wait_ready_workers(1)
    rng = random.Random(14)

    def logged():
        _generate(g.port, words(rng, 200))
        return f"no KV events from {w.url}" in g.logs()

    wait_for(logged, message="the silence logged")
    for _ in range(5):
        _generate(g.port, words(rng, 200))
    assert g.logs().count(f"no KV events from {w.url}") == 1
    assert _stream_of(g, w)["state"] == "connecting"


def test_only_prompts_the_engine_tokenizes_as_they_are_count_as_prompts():
    from smg._fast.routing_text import routing_prompt_py, set_precise

    generate, chat, completions = 0, 1, 2
    chat_body = {"messages": [{"role": "user", "content": "hi"}]}
    assert routing_prompt_py(generate, {"text": "abc"}) == ("abc", False)        # precise routing off: never
    try:
        set_precise(True, lambda body: "<rendered>" if body.get("messages") else None)
        assert routing_prompt_py(generate, {"text": "abc"}) == ("abc", True)
        assert routing_prompt_py(generate, {"input_ids": [1, 2]}) == ("1 2", False)
        assert routing_prompt_py(completions, {"prompt": "p"}) == ("p", True)
        assert routing_prompt_py(completions, {"prompt": ["p", "q"]})[1] is False
        assert routing_prompt_py(chat, chat_body) == ("<rendered>", True)
        assert routing_prompt_py(chat, {"messages": []}) == ("", False)          # the template refused it
        set_precise(True, None)
        assert routing_prompt_py(chat, chat_body) == ("hi", False)               # no template: the tree
    finally:
        set_precise(False)


def test_a_chat_template_file_overrides_the_models(tmp_path, chat_model, tokenizer_path):
    from smg.tokenizer import load_chat_template

    override = tmp_path / "template.jinja"
    override.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert load_chat_template(chat_model, str(override)).render(body) == "<user>hi"
    assert load_chat_template(chat_model).render(body).startswith("<|im_start|>user")
    done = subprocess.run([sys.executable, "-m", "smg", "--kv-events-port", "5557", "--tokenizer-path", tokenizer_path,
                           "--chat-template", str(tmp_path / "missing.jinja")], capture_output=True, timeout=30)
    assert done.returncode == 2 and b"--chat-template" in done.stderr
