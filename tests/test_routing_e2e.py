"""Routing through the real gateway with several fake workers."""

import collections
import json
import concurrent.futures
import re

import pytest

from helpers import request, wait_for


def served_by(workers, before=None):
    """Generation requests per worker URL since `before` (a previous result)."""
    now = {w.url: w.stats.generation_requests for w in workers}
    if before:
        return {u: now[u] - before.get(u, 0) for u in now}
    return now


def who(resp) -> str:
    return resp.headers["x-smg-routed-worker-id"]


def test_cache_aware_prefix_affinity_and_spread(fake_workers, gateway):
    workers = fake_workers(4)
    g = gateway(["--worker-urls", *[w.url for w in workers]], wait_workers=4)  # cache_aware is the default
    prefixes = [f"[{i}] " + f"system prompt {i} " * 30 for i in range(8)]
    owners = collections.defaultdict(collections.Counter)
    for round_ in range(6):
        for i, pre in enumerate(prefixes):
            r = g.post("/generate", {"text": pre + f"user question {round_}"})
            assert r.status == 200
            owners[i][who(r)] += 1
    # every prefix stuck to one worker
    assert all(len(c) == 1 for c in owners.values()), owners
    text = g.metrics()
    assert re.search(r'smg_cache_aware_decisions_total\{decision="miss",model="fake-model",worker_type="regular"\} 8\.0',
                     text)


def test_independent_gateways_agree_on_every_prefix(fake_workers, gateway):
    """Two replicas that never talk, each taking half of the traffic in its
    own order, send each prefix to the same worker: the one rendezvous
    placement names for it."""
    from smg._fast.policies import CacheAwarePolicy
    from smg._fast.worker import READY, Worker

    workers = fake_workers(4)
    urls = [w.url for w in workers]
    a = gateway(["--worker-urls", *urls], wait_workers=4)
    b = gateway(["--worker-urls", *reversed(urls)], wait_workers=4)
    prefixes = [f"[{i}] tenant {i} system prompt " + f"rule {i}; " * 40 for i in range(16)]
    owners = collections.defaultdict(collections.Counter)
    for round_ in range(4):
        for i, pre in enumerate(prefixes):
            first, second = (a, b) if (i + round_) % 2 else (b, a)
            for g, tail in ((first, f"question {round_}"), (second, f"other question {round_}")):
                r = g.post("/generate", {"text": pre + tail})
                assert r.status == 200
                owners[i][who(r)] += 1
    assert all(len(c) == 1 for c in owners.values()), owners
    model = []
    for u in urls:
        w = Worker(u, u, "fake-model")
        w.state = READY
        model.append(w)
    expected = {i: CacheAwarePolicy().place_py(model, pre + "question 0").url for i, pre in enumerate(prefixes)}
    assert {i: next(iter(c)) for i, c in owners.items()} == expected
    assert len(set(expected.values())) >= 3  # 16 prefixes do spread


def test_cache_aware_overloaded_worker_spills(fake_workers, gateway):
    workers = fake_workers(4)
    g = gateway(["--worker-urls", *[w.url for w in workers]], wait_workers=4)
    prompt = "hot prefix " * 40
    owner_url = who(g.post("/generate", {"text": prompt + "first"}))
    owner = next(w for w in workers if w.url == owner_url)
    owner.set(response_delay=2.0)  # its requests pile up in flight
    before = served_by(workers)

    def send(i):
        return who(g.post("/generate", {"text": prompt + f"q{i}"}, timeout=30))

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        routed = list(pool.map(send, range(24)))
    spilled = [u for u in routed if u != owner_url]
    assert spilled, "no request left the overloaded worker"
    assert routed.count(owner_url) >= 4, "the owner should keep serving until it is overloaded"
    text = g.metrics()
    assert re.search(r'smg_cache_aware_decisions_total\{decision="spill",model="fake-model",worker_type="regular"\} '
                     r'%d\.0' % len(spilled), text)
    assert re.search(r'smg_cache_aware_placement_changes_total\{change="spill",model="fake-model",reason="inflight",'
                     r'worker_type="regular"\} %d\.0' % len(spilled), text)
    assert sum(served_by(workers, before).values()) == 24


def test_removed_worker_gets_no_traffic_and_frees_its_tree(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--worker-urls", *[w.url for w in workers]], wait_workers=3)
    for i in range(9):
        g.post("/generate", {"text": f"[{i % 3}] " + "shared words " * 30 + str(i)})
    victim = max(workers, key=lambda w: w.stats.generation_requests)
    share_re = re.compile(r'smg_cache_aware_worker_tree_chars\{model="fake-model",worker="%s"\} (\d+)' %
                          re.escape(victim.url))
    assert int(float(share_re.search(g.metrics()).group(1))) > 0
    info = next(w for w in g.workers() if w["url"] == victim.url)
    r = request(g.port, "DELETE", f"/workers/{info['id']}")
    assert r.status == 202
    wait_for(lambda: all(w["url"] != victim.url for w in g.workers()), message="worker removed")
    assert share_re.search(g.metrics()) is None
    before = victim.stats.generation_requests
    for i in range(12):
        assert g.post("/generate", {"text": f"[{i % 3}] " + "shared words " * 30 + "after"}).status == 200
    assert victim.stats.generation_requests == before


def test_round_robin_alternates(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--policy", "round_robin", "--worker-urls", *[w.url for w in workers]], wait_workers=3)
    seq = [who(g.post("/generate", {"text": "same"})) for _ in range(9)]
    assert seq[:3] == seq[3:6] == seq[6:9]
    assert len(set(seq[:3])) == 3


def test_random_uses_every_worker(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--policy", "random", "--worker-urls", *[w.url for w in workers]], wait_workers=3)
    counts = collections.Counter(who(g.post("/generate", {"text": "x"})) for _ in range(150))
    assert len(counts) == 3 and min(counts.values()) > 20, counts


def test_power_of_two_avoids_the_loaded_worker(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--policy", "power_of_two", "--worker-urls", *[w.url for w in workers]], wait_workers=3)
    slow = workers[0]
    slow.set(response_delay=3.0)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # send requests until one is held in flight on the slow worker
        held = []

        def one_in_flight():
            if slow.stats.in_flight >= 1:
                return True
            held.append(pool.submit(g.post, "/generate", {"text": "hold"}, None, 30))
            return False

        wait_for(one_in_flight, interval=0.05, message="a request in flight on the slow worker")
        # any pair that includes the slow worker now goes to the other one
        fast = [who(g.post("/generate", {"text": "quick"})) for _ in range(30)]
        for f in held:
            f.result()
    assert slow.url not in fast, collections.Counter(fast)
    assert len(set(fast)) == 2


def test_consistent_hashing_by_routing_key(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--policy", "consistent_hashing", "--worker-urls", *[w.url for w in workers]], wait_workers=3)
    for key in ("user-a", "user-b", "user-c", "user-d"):
        seen = {who(g.post("/generate", {"text": "x"}, headers={"x-smg-routing-key": key})) for _ in range(5)}
        assert len(seen) == 1
    spread = {who(g.post("/generate", {"text": "x"}, headers={"x-smg-routing-key": f"k{i}"})) for i in range(60)}
    assert len(spread) == 3
    # without X-SMG-Routing-Key the Authorization header is the key
    seen = {who(g.post("/generate", {"text": "x"}, headers={"authorization": "Bearer tenant-1"})) for _ in range(5)}
    assert len(seen) == 1


def test_inflight_returns_to_zero_however_requests_end(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=200, stream_interval=0.01)
    g = gateway(["--worker-urls", w.url, "--request-timeout-secs", "1"], wait_workers=1)
    import socket
    import json as _json

    # a client that leaves mid-stream
    s = socket.create_connection(("127.0.0.1", g.port))
    body = _json.dumps({"text": "x", "stream": True}).encode()
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: g\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    s.recv(100)
    s.close()
    # a request that times out mid-stream (the gateway ends it with an
    # error event), one that succeeds, one that fails
    cut = g.post("/generate", {"text": "x", "stream": True}, timeout=10)
    assert b'"request_timeout"' in cut.body and cut.body.endswith(b"data: [DONE]\n\n")
    w.set(stream_chunks=2, stream_interval=0.0)
    assert g.post("/generate", {"text": "x"}).status == 200
    w.set(fail_status=400)
    assert g.post("/generate", {"text": "x"}).status == 400
    wait_for(lambda: g.workers()[0]["load"] == 0, message="in-flight count back to zero")
    assert re.search(r'smg_worker_requests_active\{worker="[^"]+"\} 0\.0', g.metrics())
    assert re.search(r'smg_worker_requests_unanswered\{worker="[^"]+"\} 0\.0', g.metrics())


def test_manual_policy_keeps_each_routing_key_on_one_worker(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--policy", "manual", "--assignment-mode", "min_group", "--worker-urls",
                 *[w.url for w in workers]], wait_workers=3)
    for round_ in range(4):
        for k in range(9):
            r = g.post("/generate", {"text": f"[key{k}] turn {round_}"}, headers={"x-smg-routing-key": f"key{k}"})
            assert r.status == 200
    holders = {f"key{k}": [w.url for w in workers if w.stats.tags.get(f"key{k}")] for k in range(9)}
    assert all(len(h) == 1 for h in holders.values()), holders
    per_worker = [sum(1 for h in holders.values() if h == [w.url]) for w in workers]
    assert per_worker == [3, 3, 3]  # min_group spreads the keys evenly


def test_prefix_hash_policy_keeps_each_prefix_on_one_worker(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--policy", "prefix_hash", "--prefix-token-count", "8", "--worker-urls",
                 *[w.url for w in workers]], wait_workers=3)
    for i in range(40):
        tag = f"p{i % 8}"
        # the first 32 characters (8 tokens x 4) are the tag and padding
        r = g.post("/generate", {"text": f"[{tag}] " + "=" * 40 + f" question {i}"})
        assert r.status == 200
    holders = {f"p{k}": [w.url for w in workers if w.stats.tags.get(f"p{k}")] for k in range(8)}
    assert all(len(h) == 1 for h in holders.values()), holders
    assert len({h[0] for h in holders.values()}) >= 2  # prefixes spread over the workers


def test_routing_key_headers_choose_the_key(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--policy", "manual", "--assignment-mode", "min_group", "--routing-key-headers", "x-session-id",
                 "x-user", "--worker-urls", *[w.url for w in workers]], wait_workers=3)
    for round_ in range(3):
        for k in range(6):
            # x-session-id wins over x-user; X-SMG-Routing-Key no longer counts
            headers = {"x-session-id": f"s{k}", "x-user": "same-user", "x-smg-routing-key": "ignored"}
            assert g.post("/generate", {"text": f"[s{k}] turn {round_}"}, headers=headers).status == 200
    holders = {f"s{k}": [w.url for w in workers if w.stats.tags.get(f"s{k}")] for k in range(6)}
    assert all(len(h) == 1 for h in holders.values()), holders
    assert len({h[0] for h in holders.values()}) == 3  # six keys over three workers, not one
    # the worker gets the key the gateway routed by
    last = next(w for w in workers if w.url == holders["s5"][0])
    assert last.stats.last_headers["x-smg-routing-key"] == "s5"


@pytest.mark.parametrize("pd", [False, True])
def test_sticky_sessions_on_round_robin(fake_workers, gateway, pd):
    """--sticky-sessions: round robin places each session's first request,
    later ones follow it (the session is the routing key, else the client's
    request id); requests without a session keep rotating."""
    if pd:
        prefill, decode = fake_workers(2, role="prefill"), fake_workers(3, role="decode")
        workers = decode
        args = ["--pd-disaggregation", *[x for w in prefill for x in ("--prefill", w.url)],
                *[x for w in decode for x in ("--decode", w.url)]]
        n = 5
    else:
        workers = fake_workers(3)
        args = ["--worker-urls", *[w.url for w in workers]]
        n = 3
    g = gateway(["--policy", "round_robin", "--sticky-sessions", *args], wait_workers=n)
    for round_ in range(3):
        for k in range(6):
            headers = {"x-smg-routing-key": f"key{k}"} if k < 3 else {"x-request-id": f"key{k}"}
            assert g.post("/generate", {"text": f"[key{k}] turn {round_}"}, headers=headers).status == 200
    holders = {f"key{k}": [w.url for w in workers if w.stats.tags.get(f"key{k}")] for k in range(6)}
    assert all(len(h) == 1 for h in holders.values()), holders
    assert len({h[0] for h in holders.values()}) == 3  # round robin spread the first requests
    for i in range(6):
        assert g.post("/generate", {"text": f"[free] {i}"}).status == 200
    assert all(w.stats.tags.get("free") == 2 for w in workers)


def test_dp_rank_is_spliced_into_the_body():
    from smg._fast.call import with_dp_rank

    assert json.loads(with_dp_rank(b'{"text": "hi"}', 3)) == {"text": "hi", "data_parallel_rank": 3}
    assert with_dp_rank(b'{"text":"hi"}', 0) == b'{"data_parallel_rank":0,"text":"hi"}'
    assert json.loads(with_dp_rank(b"  { }", 1)) == {"data_parallel_rank": 1}
    # a rank the client named is replaced, not duplicated
    assert with_dp_rank(b'{"data_parallel_rank": 7, "text": "x"}', 2).count(b"data_parallel_rank") == 1
    assert json.loads(with_dp_rank(b'{"data_parallel_rank": 7}', 2)) == {"data_parallel_rank": 2}


def test_dp_aware_routes_to_each_rank_as_a_worker(fake_workers, gateway):
    """--dp-aware: a worker whose server info says dp_size 2 is routed to as
    two ranks, URL@0 and URL@1, and each request names its rank."""
    workers = fake_workers(2, dp_size=2)
    g = gateway(["--dp-aware", "--policy", "round_robin", "--worker-urls", *[w.url for w in workers]],
                wait_workers=2)
    routed = collections.Counter()
    for i in range(8):
        r = g.post("/generate", {"text": f"x{i}", "data_parallel_rank": 5})
        assert r.status == 200
        routed[r.headers["x-smg-routed-worker-id"]] += 1
    assert routed == {f"{w.url}@{rank}": 2 for w in workers for rank in (0, 1)}
    assert all(w.stats.dp_ranks == {0: 2, 1: 2} for w in workers)
    info = {x["url"]: x for x in g.workers()}
    for w in workers:
        assert info[w.url]["dp_size"] == 2
        assert [r["url"] for r in info[w.url]["dp_ranks"]] == [f"{w.url}@0", f"{w.url}@1"]
    # without --dp-aware the same workers are one worker each, and bodies pass unchanged
    g2 = gateway(["--policy", "round_robin", "--worker-urls", *[w.url for w in workers]], wait_workers=2)
    assert g2.post("/generate", {"text": "plain"}).status == 200
    assert all("dp_size" not in x for x in g2.workers())
    assert sum(w.stats.dp_ranks.get(0, 0) + w.stats.dp_ranks.get(1, 0) for w in workers) == 8


def test_dp_aware_in_pd_names_each_sides_rank(fake_workers, gateway):
    (p,) = fake_workers(1, role="prefill", dp_size=2)
    (d,) = fake_workers(1, role="decode", dp_size=4)
    g = gateway(["--dp-aware", "--pd-disaggregation", "--policy", "round_robin", "--prefill", p.url,
                 "--decode", d.url], wait_workers=2)
    for i in range(8):
        assert g.post("/generate", {"text": f"x{i}"}).status == 200
    wait_for(lambda: sum(p.stats.dp_ranks.values()) == 8, message="prefill got all 8")
    assert p.stats.dp_ranks == {0: 4, 1: 4}
    assert d.stats.dp_ranks == {0: 2, 1: 2, 2: 2, 3: 2}
    assert len(p.stats.bootstrap) == 8  # the bootstrap fields are still there


def test_prefill_queue_estimate_counts_streamed_prompts_until_their_first_token(fake_workers, gateway):
    """cache_aware's estimate of a worker's queued prefill: a streamed
    request's uncached characters count from the send to its first token; a
    request answered all at once never counts (its prefill's end cannot be
    seen); nothing stays counted once requests end."""
    (w,) = fake_workers(1, simulate=True, sim_prefill_chars_per_sec=20_000)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    pattern = r'smg_worker_prefill_queue_chars\{worker="%s"\} (\S+)' % re.escape(w.url)

    def queued():
        return float(re.search(pattern, g.metrics()).group(1))

    prompt = "[doc] " + "z" * 19_994                    # a second of prefill
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(g.post, "/generate", {"text": prompt, "stream": True,
                                                      "sampling_params": {"max_new_tokens": 2}})
        wait_for(lambda: queued() == 20_000, timeout=5, message="the streamed prompt counted as queued")
        assert streamed.result().status == 200
        assert queued() == 0
        plain = pool.submit(g.post, "/generate", {"text": "[other] " + "y" * 20_000,
                                                   "sampling_params": {"max_new_tokens": 2}})
        wait_for(lambda: w.stats.in_flight == 1, timeout=5, message="the plain request in flight")
        assert queued() == 0
        assert plain.result().status == 200
    assert queued() == 0


def test_unanswered_requests_are_those_not_answering_yet(fake_workers, gateway):
    """cache_aware's spill gate counts a worker's requests that have not begun
    answering: a streamed answer from its first token on no longer counts
    (it is decoding, which a new prompt does not wait for); an answer sent
    all at once counts until it arrives."""
    (w,) = fake_workers(1, stream_chunks=300, stream_interval=0.01)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    url = re.escape(w.url)

    def gauge(name):
        return float(re.search(r'%s\{worker="%s"\} (\S+)' % (name, url), g.metrics()).group(1))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(g.post, "/generate", {"text": "x", "stream": True}, timeout=30)
        wait_for(lambda: w.stats.in_flight == 1, timeout=5, message="the stream in flight")
        wait_for(lambda: gauge("smg_worker_requests_unanswered") == 0, timeout=5,
                 message="the stream's first token seen")
        assert gauge("smg_worker_requests_active") == 1
        assert streamed.result().status == 200
        w.set(response_delay=1.0)
        plain = pool.submit(g.post, "/generate", {"text": "y"}, timeout=30)
        wait_for(lambda: w.stats.in_flight == 1, timeout=5, message="the plain request in flight")
        assert gauge("smg_worker_requests_unanswered") == 1
        assert plain.result().status == 200
    assert gauge("smg_worker_requests_unanswered") == 0
    assert gauge("smg_worker_requests_active") == 0
