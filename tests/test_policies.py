"""Routing policies in-process: distribution, load awareness, cache affinity,
the spill gate, worker removal, circuit breakers."""

import collections
import random

import pytest

from smg._fast.policies import (
    ASSIGNMENT_MODES,
    CacheAwarePolicy,
    ConsistentHashPolicy,
    LeastLoadPolicy,
    BucketPolicy,
    ManualPolicy,
    PassthroughPolicy,
    PinTable,
    PowerOfTwoPolicy,
    PrefixHashPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    WorkerGroup,
)
from smg._fast.routing_text import ENDPOINTS, routing_text
from smg._fast.worker import READY, Worker

EP_GENERATE = ENDPOINTS["/generate"]
EP_CHAT = ENDPOINTS["/v1/chat/completions"]
EP_COMPLETIONS = ENDPOINTS["/v1/completions"]
EP_EMBEDDINGS = ENDPOINTS["/v1/embeddings"]
EP_RERANK = ENDPOINTS["/v1/rerank"]


def workers(n):
    out = []
    for i in range(n):
        w = Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}", "m")
        w.state = READY
        out.append(w)
    return out


def waiting(w, n):
    """n requests in flight on w, none answering yet (cache_aware's spill
    gate counts those)."""
    w.inflight = w.unanswered = n


def group(policy, ws):
    g = WorkerGroup("m", 0, policy)
    g.workers.extend(ws)
    g.refresh()
    return g


def test_round_robin_cycles_and_skips_open_breakers():
    ws = workers(3)
    g = group(RoundRobinPolicy(), ws)
    assert [g.select_py().id for _ in range(6)] == ["w0", "w1", "w2", "w0", "w1", "w2"]
    ws[1].cb_failure_threshold = 1
    ws[1].record_outcome(False, 0.0)  # opens its breaker
    assert ws[1].cb_state_name == "open"
    assert {g.select_py(now=1.0).id for _ in range(6)} == {"w0", "w2"}


def test_breaker_counts_consecutive_failures_within_its_window():
    """--cb-window-duration-secs: a streak of failures older than the window
    starts over, so rare failures spread over hours never open the breaker."""
    (w,) = workers(1)
    w.cb_failure_threshold = 3
    w.cb_window = 10.0
    for t in (0.0, 5.0, 10.5, 20.0, 30.0):  # each window holds at most two of the streak
        w.record_outcome(False, t)
    assert w.cb_state_name == "closed"
    w.record_outcome(False, 31.0)
    w.record_outcome(False, 32.0)
    assert w.cb_state_name == "open"
    # window 0: every consecutive failure counts, however old
    (w,) = workers(1)
    w.cb_failure_threshold = 3
    w.cb_window = 0.0
    for t in (0.0, 1000.0, 5000.0):
        w.record_outcome(False, t)
    assert w.cb_state_name == "open"
    # a success ends the streak
    (w,) = workers(1)
    w.cb_failure_threshold = 2
    for ok in (False, True, False):
        w.record_outcome(ok, 1.0)
    assert w.cb_state_name == "closed"


def test_random_is_roughly_uniform():
    ws = workers(4)
    g = group(RandomPolicy(), ws)
    counts = collections.Counter(g.select_py().id for _ in range(8000))
    assert set(counts) == {"w0", "w1", "w2", "w3"}
    assert all(1600 < c < 2400 for c in counts.values()), counts


def test_power_of_two_prefers_the_less_loaded():
    ws = workers(4)
    ws[0].inflight = 50
    g = group(PowerOfTwoPolicy(), ws)
    counts = collections.Counter(g.select_py().id for _ in range(3000))
    # w0 only wins when paired with itself, which power-of-two never does
    assert counts["w0"] == 0
    assert all(counts[w] > 700 for w in ("w1", "w2", "w3"))


def test_consistent_hashing_is_sticky_and_moves_few_keys():
    ws = workers(5)
    g = group(ConsistentHashPolicy(), ws)
    keys = [f"user-{i}".encode() for i in range(2000)]
    before = {k: g.select_py(key=k).id for k in keys}
    assert all(g.select_py(key=k).id == before[k] for k in keys[:200])
    spread = collections.Counter(before.values())
    assert all(200 < c < 650 for c in spread.values()), spread
    # removing one worker moves only its own keys
    ws[2].state = 2  # not ready
    g.refresh()
    after = {k: g.select_py(key=k).id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "w2" for k in moved)
    assert "w2" not in set(after.values())


def test_consistent_hashing_without_key_is_least_loaded():
    ws = workers(3)
    ws[0].inflight = 5
    ws[1].inflight = 1
    ws[2].inflight = 3
    g = group(ConsistentHashPolicy(), ws)
    assert g.select_py(key=None).id == "w1"


def route(policy, ws, text, now=0.0):
    w = policy.pick_py(ws, text, None, now)
    w.routed += 1
    return w


def test_cache_aware_same_prefix_sticks():
    ws = workers(4)
    p = CacheAwarePolicy()
    prefixes = [f"system prompt number {i} " + "x" * 200 for i in range(8)]
    owner = {}
    for round_ in range(20):
        for i, pre in enumerate(prefixes):
            w = route(p, ws, pre + f"question {round_}", now=round_ * 0.001)
            owner.setdefault(i, w.id)
            assert w.id == owner[i], "a prefix moved"


def test_cache_aware_placement_spreads_many_prefixes():
    ws = workers(4)
    p = CacheAwarePolicy()
    owners = collections.Counter(route(p, ws, f"conversation {i}: " + "y" * 100).id for i in range(2000))
    assert set(owners) == {"w0", "w1", "w2", "w3"}
    assert all(400 < c < 600 for c in owners.values()), owners


def test_cache_aware_replicas_place_new_prefixes_alike():
    """Two independent routers (replicas, or --workers processes) that know
    the same workers, listed in different orders and seeing the traffic in
    different orders, send every prefix to the same worker."""
    def replica():
        ws = [Worker(f"id-{random.random()}", f"http://10.0.0.{i}:8000", "m") for i in range(1, 9)]
        for w in ws:
            w.state = READY
        random.shuffle(ws)
        return ws

    rng = random.Random(3)
    texts = [f"shared system prompt {i} " + "z" * 300 + f" user turn {j}" for i in range(50) for j in range(4)]
    a_ws, b_ws = replica(), replica()
    a, b = CacheAwarePolicy(), CacheAwarePolicy()
    a_order, b_order = texts[:], texts[:]
    rng.shuffle(a_order)
    rng.shuffle(b_order)
    where_a = {t: route(a, a_ws, t).url for t in a_order}
    where_b = {t: route(b, b_ws, t).url for t in b_order}
    assert where_a == where_b
    # one prefix, one worker
    by_prefix = collections.defaultdict(set)
    for t, url in where_a.items():
        by_prefix[t.split(" z")[0]].add(url)
    assert all(len(urls) == 1 for urls in by_prefix.values())


def test_cache_aware_placement_skips_overloaded_and_unroutable_workers():
    ws = workers(4)
    p = CacheAwarePolicy()
    text = "a brand new prompt " * 10
    first = p.place_py(ws, text)
    # the rendezvous choice is a function of the text and the workers alone
    assert CacheAwarePolicy().place_py(list(reversed(ws)), text) is first
    waiting(first, 40)
    for w in ws:
        if w is not first:
            waiting(w, 2)
    second = p.place_py(ws, text, now=1.0)
    assert second is not first
    waiting(first, 2)
    first.state = 2  # not ready
    assert p.place_py(ws, text, now=2.0) is second
    # every worker overloaded but one: that one, whatever the hash says
    for w in ws:
        w.state = READY
        waiting(w, 0)
    waiting(ws[3], 0)
    for w in ws[:3]:
        waiting(w, 60)
    assert p.place_py(ws, "another prompt " * 10, now=3.0) is ws[3]


def test_cache_aware_miss_below_threshold_is_placed_afresh():
    ws = workers(3)
    p = CacheAwarePolicy()
    a = "a brand new prompt"
    b = "a brand NEW different prompt entirely"
    assert p.pick_py(ws, a, None, 0.0) is p.place_py(ws, a)
    # below the threshold (0.3) a partial match does not count: b is placed by its own text
    assert p.pick_py(ws, b, None, 0.0) is p.place_py(ws, b)


def test_cache_aware_overloaded_worker_spills():
    ws = workers(4)
    p = CacheAwarePolicy(cache_threshold=0.3, balance_abs_threshold=64, balance_rel_threshold=1.5)
    prompt = "shared prefix " * 20
    owner = p.pick_py(ws, prompt + "0", None, 0.0)
    # the owner is loaded far above the mean, and stays so
    waiting(owner, 40)
    for w in ws:
        if w is not owner:
            waiting(w, 2)
    t = 0.0
    picks = []
    for i in range(50):
        t += 0.01
        picks.append(p.pick_py(ws, prompt + str(i), None, t))
    assert picks[-1] is not owner
    assert p.spills > 0
    # every spill of the prefix went to one second worker, its next placement
    spilled = {w.id for w in picks if w is not owner}
    assert spilled == {p.place_py(ws, prompt, now=t, avoid=owner).id}
    # back to normal load: the prefix returns to its owner
    waiting(owner, 2)
    for i in range(50):
        t += 0.01
        last = p.pick_py(ws, prompt + "again" + str(i), None, t)
    assert last is owner


def test_an_inflight_spill_must_be_worth_its_reprefill():
    """Over the spill gate, a request whose long prefix its owner holds
    stays (answers that are not streamed count until complete: many may be
    decoding, which its first token does not wait for); twice over the
    gate, it leaves all the same."""
    ws = workers(4)
    p = CacheAwarePolicy()
    prompt = "[sys] " + "s" * 5000
    owner = route(p, ws, prompt + " q0")
    for w in ws:
        waiting(w, 2)
    waiting(owner, 10)          # mean 3.5, gate at 7.5: over it, not twice over
    t = 0.0
    for i in range(50):
        t += 0.01
        assert route(p, ws, prompt + f" q{i}", now=t) is owner
    assert p.spills == 0
    waiting(owner, 40)          # mean 11.5, gate at 18.3: twice over
    for i in range(50):
        t += 0.01
        last = route(p, ws, prompt + f" r{i}", now=t)
    assert last is not owner
    assert p.placement_changes[("spill", "inflight")] > 0


def test_streams_already_answering_do_not_overload_their_worker():
    """The worker of a hot prompt decodes many of its answers at once; a new
    request's first token waits only for the requests not answering yet, so
    those streams alone do not send it elsewhere to prefill the prompt again."""
    ws = workers(4)
    p = CacheAwarePolicy()
    prompt = "[sys] " + "s" * 5000
    owner = route(p, ws, prompt + " q0")
    for w in ws:
        w.inflight, w.unanswered = 2, 1
    owner.inflight, owner.unanswered = 60, 2
    t = 0.0
    for i in range(100):
        t += 0.01
        assert route(p, ws, prompt + f" q{i}", now=t) is owner
    assert p.spills == 0
    # the same count of requests none of which has begun answering: spills
    waiting(owner, 60)
    for i in range(50):
        t += 0.01
        last = route(p, ws, prompt + f" r{i}", now=t)
    assert last is not owner and p.placement_changes[("spill", "inflight")] > 0


def test_cache_aware_brief_load_spike_does_not_spill():
    ws = workers(4)
    p = CacheAwarePolicy()
    prompt = "a stable prefix " * 20
    owner = p.pick_py(ws, prompt, None, 0.0)
    for w in ws:
        waiting(w, 8)
    for i in range(100):
        p.pick_py(ws, prompt + str(i), None, 0.001 * i)
    waiting(owner, 16)  # one request's worth of jitter, a millisecond long
    assert p.pick_py(ws, prompt + "spike", None, 0.1001) is owner


def test_removing_a_worker_frees_its_tree_share():
    ws = workers(3)
    p = CacheAwarePolicy()
    for i in range(60):
        route(p, ws, f"prefix {i % 30} " + "y" * 100 + str(i))
    slot = p.slot_of(ws[1])
    assert p.tree.chars_of(slot) > 0
    total = p.tree.total_chars

    def only_its_own(node):
        label, owners, children = node
        own = len(label) if set(owners) == {slot} else 0
        return own + sum(only_its_own(c) for c in children)

    exclusive = only_its_own(p.tree.dump())
    assert exclusive > 0
    p.worker_removed(ws[1])
    assert p.tree.chars_of(slot) == 0
    assert p.tree.total_chars == total - exclusive  # the nodes only it owned are gone
    assert p.slot_of(ws[1]) is None
    rest = [ws[0], ws[2]]
    assert all(p.pick_py(rest, f"prefix {i % 30} " + "y" * 100, None, 1.0) in rest for i in range(60))


def test_the_tree_never_holds_more_than_its_budget():
    """--max-tree-size holds between the periodic evictions too: a request
    that grows the tree past it trims the least recently used prompts at
    once, and a prompt longer than the budget is routed by its start."""
    ws = workers(2)
    p = CacheAwarePolicy(max_tree_size=1000)
    recent = []
    for i in range(100):
        text = f"{i:04d} " + "z" * 100
        recent.append((text, route(p, ws, text, now=0.01 * i)))
        assert p.tree.total_chars <= 1000
    # trimmed by whole prompts to 7/8 of the budget, no further
    assert 1000 * 7 // 8 - 110 < p.tree.total_chars <= 1000
    # the latest prompts are the ones kept: each is a full match
    assert all(p.tree.match_text(text)[0] == len(text) for text, _ in recent[-5:])
    assert all(route(p, ws, text + " again", now=2.0) is w for text, w in recent[-5:])
    huge = "[huge] " + "h" * 5000
    owner = route(p, ws, huge, now=3.0)
    assert p.tree.total_chars == 1000
    # what the tree kept of it is its first 1,000 characters
    assert p.tree.match_text(huge)[0] == 1000
    assert route(p, ws, huge[:1000] + " a different ending", now=4.0) is owner
    assert p.evict() == 0  # nothing left for the periodic eviction


def test_one_prompt_holds_at_most_an_eighth_of_a_large_tree():
    """A prompt is routed and held by at most max(1 Mi, max-tree-size / 8)
    characters: one huge prompt neither flushes the other prefixes nor
    doubles what the gateway holds of it."""
    ws = workers(2)
    p = CacheAwarePolicy(max_tree_size=16 << 20)
    assert p.prompt_budget_py() == 2 << 20
    assert CacheAwarePolicy(max_tree_size=1 << 20).prompt_budget_py() == 1 << 20
    assert CacheAwarePolicy(max_tree_size=1000).prompt_budget_py() == 1000
    others = [f"conversation {i} " + "o" * 1000 for i in range(50)]
    owners = [route(p, ws, text, now=0.01 * i) for i, text in enumerate(others)]
    before = p.tree.total_chars
    huge = "[huge] " + "h" * (3 << 20)
    route(p, ws, huge, now=1.0)
    assert p.tree.match_text(huge)[0] == 2 << 20
    assert p.tree.total_chars == before + (2 << 20)
    # the others are still held where they were placed
    assert all(p.tree.match_text(text)[0] == len(text) for text in others)
    assert [route(p, ws, text + " next turn", now=2.0) for text in others] == owners


@pytest.mark.parametrize("endpoint, body, expected", [
    (EP_GENERATE, {"text": "hello"}, "hello"),
    (EP_GENERATE, {"text": ["a", "b"]}, "a b"),
    (EP_GENERATE, {"input_ids": [1, 22, 333]}, "1 22 333"),
    (EP_GENERATE, {"input_ids": [[1, 2], [3]]}, "1 2 3"),
    (EP_CHAT, {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]}, "sys hi"),
    (EP_CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                         {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "look"),
    (EP_CHAT, {"messages": [{"role": "assistant", "content": "ans", "reasoning_content": "think"}]}, "ans think"),
    (EP_COMPLETIONS, {"prompt": "once"}, "once"),
    (EP_COMPLETIONS, {"prompt": ["a", "b"]}, "a b"),
    (EP_EMBEDDINGS, {"input": ["x", "y"]}, "x y"),
    (EP_RERANK, {"query": "q", "documents": ["d"]}, "q"),
    (EP_GENERATE, {"text": 42}, ""),
    (EP_CHAT, {"messages": "not a list"}, ""),
    (EP_CHAT, {"messages": [None, 3, {"content": None}]}, ""),
])
def test_routing_text(endpoint, body, expected):
    assert routing_text(endpoint, body) == expected


def test_routing_text_never_raises_on_random_shapes():
    rng = random.Random(5)
    values = [None, 1, 1.5, "s", [], {}, ["x", 1, None], [{"text": 1}], {"content": []}]
    for _ in range(2000):
        body = {k: rng.choice(values) for k in ("text", "input_ids", "messages", "prompt", "input", "query")}
        for ep in (EP_GENERATE, EP_CHAT, EP_COMPLETIONS, EP_EMBEDDINGS, EP_RERANK):
            assert isinstance(routing_text(ep, body), str)


def shuffled_workers(seed, n):
    ws = [Worker(f"{seed}-{i}", f"http://10.1.0.{i}:8000", "m") for i in range(1, n + 1)]
    for w in ws:
        w.state = READY
    random.Random(seed).shuffle(ws)
    return ws


def test_a_hot_prefix_spreads_when_its_owner_queues_prefill_alike_in_every_replica():
    """A shared prompt stays with its owner while the owner keeps up. Once
    the owner's queued prefill costs more than re-prefilling the prompt
    elsewhere, requests spill, all to one other worker (the same in two
    replicas that see the same load); once that worker holds the prompt
    too, a much shorter queue sends requests there. Its home stays."""
    prompt = "[sys] a shared system prompt " + "x" * 2000

    def replica(seed):
        ws = shuffled_workers(seed, 4)
        p = CacheAwarePolicy()
        owner = route(p, ws, prompt + " q0")
        for i in range(200):
            assert route(p, ws, prompt + f" q{i}", now=0.001 * i) is owner
        # queued prefill shorter than re-prefilling ~2,000 characters elsewhere
        # (counted twice, x 1.5, + 1,024): stay
        owner.prefill_queue_chars = 6000
        assert route(p, ws, prompt + " q-a", now=1.0) is owner
        owner.prefill_queue_chars = 8000
        spilled = {route(p, ws, prompt + f" q-b{i}", now=1.0 + 0.001 * i).url for i in range(5)}
        assert len(spilled) == 1 and owner.url not in spilled
        target = next(w for w in ws if w.url in spilled)
        # the other worker holds the prompt now: leaving costs little there
        owner.prefill_queue_chars = 500
        assert route(p, ws, prompt + " q-c", now=2.0) is owner
        owner.prefill_queue_chars = 2500
        assert route(p, ws, prompt + " q-d", now=2.1) is target
        # ... unless its own queue is as long
        target.prefill_queue_chars = 2500
        assert route(p, ws, prompt + " q-e", now=2.2) is owner
        owner.prefill_queue_chars = target.prefill_queue_chars = 0
        assert route(p, ws, prompt + " q-f", now=2.3) is owner
        assert p.spills == 6 and p.moves == 0
        assert p.placement_changes[("spill", "prefill_queue")] == 6
        return owner.url, target.url

    assert replica(1) == replica(2)


def test_a_cached_conversation_stays_on_its_worker_unless_that_worker_is_overloaded():
    """16 conversations at different rates over 8 workers, each growing to
    ~12,000 characters, on a fleet that is busy but not overloaded: equal
    in-flight counts, prefill queues up to 1,500 characters. Every turn of
    a conversation goes where its first turn went: leaving would re-prefill
    thousands of characters to save a short wait. (Counting busy
    conversations as hot groups and spreading those evenly moved them.)"""
    rng = random.Random(11)
    ws = workers(8)
    p = CacheAwarePolicy()
    convs = [{"text": f"[conversation {c}] " + "opening " * 250, "rate": rng.uniform(0.5, 2.0), "first": None}
             for c in range(16)]
    events = sorted((rng.uniform(0, 1.0), c) for c in range(16))
    t = 0.0
    turns = 0
    while events and t < 60.0:
        t, c = events.pop(0)
        conv = convs[c]
        conv["text"] += f" USER: question {turns} " + "words " * 30
        for w in ws:
            waiting(w, 3)
            w.prefill_queue_chars = rng.randint(0, 1500)
        w = route(p, ws, conv["text"], now=t)
        if conv["first"] is None:
            conv["first"] = w
        assert w is conv["first"], f"conversation {c} moved after {len(conv['text'])} characters"
        turns += 1
        conv["text"] += " ASSISTANT: " + "answer " * 60
        if len(conv["text"]) < 12_000:
            events.append((t + rng.expovariate(conv["rate"]), c))
            events.sort()
    assert turns > 200
    assert p.spills == 0 and p.moves == 0
    assert len({c["first"].id for c in convs}) >= 5


def test_a_conversation_leaves_a_worker_whose_queue_outweighs_its_cache():
    ws = workers(4)
    p = CacheAwarePolicy()
    text = "[conv] " + "history " * 1000          # 8,000 characters held by the owner
    owner = route(p, ws, text)
    assert owner.next_prefill_chars == len(text)  # what the request will prefill there (the leg counts it)
    owner.prefill_queue_chars = 24_000             # shorter than re-prefilling 8k (x 2, x 1.5, + 1,024)
    assert route(p, ws, text + " next turn", now=1.0) is owner
    assert owner.next_prefill_chars == len(" next turn")
    owner.prefill_queue_chars = 26_000
    assert route(p, ws, text + " another turn", now=1.1) is not owner
    assert p.placement_changes[("spill", "prefill_queue")] == 1


def test_an_owner_that_keeps_spilling_hands_the_prefix_over(caplog):
    ws = workers(4)
    p = CacheAwarePolicy()
    prompt = "[sys] " + "y" * 1000
    owner = route(p, ws, prompt)
    owner.prefill_queue_chars = 100_000
    t = 0.0
    with caplog.at_level("DEBUG", logger="smg.policies"):
        while p.moves == 0:
            t += 0.001
            w = route(p, ws, prompt + f" q{t}", now=t)
            assert w is not owner
            assert t < 1.0, "never handed over"
    # handed over: from now on its requests go to the new worker, even with the old one idle
    owner.prefill_queue_chars = 0
    assert route(p, ws, prompt + " after", now=t + 0.001) is w
    assert p.placement_changes[("move", "prefill_queue")] == 1
    assert p.spills > 50
    moved = [r.getMessage() for r in caplog.records if "moves from" in r.getMessage()]
    assert len(moved) == 1 and owner.url in moved[0] and w.url in moved[0] and "prefill_queue" in moved[0]


def test_many_small_groups_are_left_where_hashing_put_them():
    ws = workers(4)
    p = CacheAwarePolicy()
    t = 0.0
    first = {}
    for r in range(3):
        for i in range(400):
            t += 0.001
            w = route(p, ws, f"conversation {i} " + "y" * 300 + f" turn {r}", now=t)
            assert first.setdefault(i, w.id) == w.id
    assert p.spills == 0 and p.moves == 0


def test_responses_routing_text_is_instructions_then_input():
    ep = ENDPOINTS["/v1/responses"]
    assert routing_text(ep, {"instructions": "be brief", "input": "hello"}) == "be brief hello"
    assert routing_text(ep, {"input": [{"role": "user", "content": "hi"},
                                       {"role": "user", "content": [{"type": "input_text", "text": "x"}]}]}) == "hi x"
    assert routing_text(ep, {"input": 5}) == ""


# --- manual (sticky routing keys) ------------------------------------------------

def test_manual_pins_each_key_to_one_worker_and_moves_it_only_when_it_must():
    ws = workers(4)
    policy = ManualPolicy()
    assert policy.header_key_only
    first = {k: policy.pick_py(ws, key=k, now=1.0) for k in (b"a", b"b", b"c", b"d", b"e", b"f")}
    for _ in range(20):
        assert all(policy.pick_py(ws, key=k, now=2.0) is w for k, w in first.items())
    assert len({w.id for w in first.values()}) > 1  # random assignment spreads keys
    victim = first[b"a"]
    victim.state = 2  # not ready: its keys move, the others stay
    moved = policy.pick_py(ws, key=b"a", now=3.0)
    assert moved is not victim and policy.moved == 1
    assert policy.pick_py(ws, key=b"a", now=4.0) is moved
    assert all(policy.pick_py(ws, key=k, now=4.0) is w for k, w in first.items() if w is not victim)


def test_manual_min_group_balances_keys_and_min_load_follows_load():
    ws = workers(3)
    policy = ManualPolicy(ASSIGNMENT_MODES["min_group"])
    picks = [policy.pick_py(ws, key=b"k%d" % i, now=1.0) for i in range(9)]
    assert collections.Counter(w.id for w in picks) == {"w0": 3, "w1": 3, "w2": 3}
    ws[0].inflight, ws[1].inflight = 5, 1
    policy = ManualPolicy(ASSIGNMENT_MODES["min_load"])
    assert policy.pick_py(ws, key=b"new", now=1.0) is ws[2]


def test_manual_forgets_idle_keys_and_removed_workers():
    ws = workers(2)
    policy = ManualPolicy(max_idle=100.0)
    for i in range(10):
        policy.pick_py(ws, key=b"k%d" % i, now=1.0)
    policy.pick_py(ws, key=b"k0", now=50.0)
    assert policy.pinned == 10
    policy.pick_py(ws, key=b"fresh", now=120.0)  # a sweep: k1..k9 idle for 119 s
    assert policy.pinned == 2
    policy.worker_removed(policy.pick_py(ws, key=b"k0", now=121.0))
    assert policy.pinned <= 1


def test_manual_without_a_key_is_random():
    ws = workers(3)
    policy = ManualPolicy()
    seen = collections.Counter(policy.pick_py(ws, now=1.0).id for _ in range(300))
    assert set(seen) == {"w0", "w1", "w2"} and policy.pinned == 0


# --- --sticky-sessions (on any policy) -------------------------------------------

def test_sticky_sessions_keep_a_session_where_the_policy_first_sent_it():
    ws = workers(3)
    g = WorkerGroup("m", 0, RoundRobinPolicy(), PinTable(100.0))
    g.workers.extend(ws)
    g.refresh()
    first = {k: g.select_py(now=1.0, sticky_key=k) for k in (b"a", b"b", b"c")}
    assert len({w.id for w in first.values()}) == 3  # round robin placed them
    for t in range(2, 8):
        assert all(g.select_py(now=float(t), sticky_key=k) is w for k, w in first.items())
    # requests without a session follow the policy
    assert len({g.select_py(now=8.0).id for _ in range(3)}) == 3
    # a retry avoids the failed worker and the session moves with it
    moved = g.select_py(now=9.0, avoid=first[b"a"], sticky_key=b"a")
    assert moved is not first[b"a"]
    assert g.select_py(now=10.0, sticky_key=b"a") is moved
    # a worker that cannot take requests gives its sessions up
    first[b"b"].state = 2
    assert g.select_py(now=11.0, sticky_key=b"b") is not first[b"b"]
    # idle sessions are forgotten
    assert len(g.sticky) == 3
    g.select_py(now=200.0, sticky_key=b"new")
    assert len(g.sticky) == 1


def test_passthrough_sends_everything_to_the_first_worker_that_can_take_it(caplog):
    ws = workers(3)
    policy = PassthroughPolicy()
    assert {policy.pick_py(ws).id for _ in range(10)} == {"w0"}
    ws[0].state = 2
    assert {policy.pick_py(ws).id for _ in range(10)} == {"w1"}
    group(PassthroughPolicy(), ws)  # three ready workers: logged
    assert "passthrough policy serves one backend, but" in caplog.text


def test_bucket_splits_lengths_so_each_worker_gets_an_equal_share_of_characters():
    ws = workers(3)
    policy = BucketPolicy(adjust_interval=10.0, balance_abs=64, balance_rel=1.5)
    short, medium, long_ = "s" * 100, "m" * 1000, "l" * 10000
    # before the first adjustment: the least loaded
    assert policy.pick_py(ws, text=short, now=0.0) is ws[0] and policy.boundaries == []
    for _ in range(100):
        for t in (short, medium, long_):
            policy.pick_py(ws, text=t, now=1.0)
    policy.adjust_py(3)
    # most characters are in the long prompts: they get a worker of their
    # own, and the short and medium ones share the first
    assert policy.boundaries == [1000, 10000]
    assert policy.pick_py(ws, text=long_, now=2.0) is ws[1]
    assert policy.pick_py(ws, text=short, now=2.0) is ws[0]
    assert policy.pick_py(ws, text=medium, now=2.0) is ws[0]
    # a bucket's worker far busier than the least loaded is passed over
    ws[1].inflight = 100
    assert policy.pick_py(ws, text=long_, now=3.0) is not ws[1]
    ws[1].inflight = 0
    ws[1].state = 2
    assert policy.pick_py(ws, text=long_, now=3.0) is not ws[1]


def test_bucket_boundaries_follow_the_observed_lengths():
    policy = BucketPolicy(adjust_interval=1.0)
    ws = workers(2)
    for i in range(200):
        policy.pick_py(ws, text="x" * 50, now=0.5)
        policy.pick_py(ws, text="x" * 150, now=0.5)
    policy.pick_py(ws, text="x", now=2.0)  # the interval passed: adjusted
    assert len(policy.boundaries) == 1 and 50 <= policy.boundaries[0] < 150
    assert policy.pick_py(ws, text="x" * 150, now=2.5) is ws[1]
    assert policy.pick_py(ws, text="x" * 50, now=2.5) is ws[0]


def test_least_load_picks_the_fewest_in_flight_skipping_open_breakers():
    ws = workers(3)
    ws[0].inflight, ws[1].inflight, ws[2].inflight = 4, 1, 2
    policy = LeastLoadPolicy()
    assert policy.pick_py(ws) is ws[1]
    ws[1].state = 2
    assert policy.pick_py(ws) is ws[2]


def test_prefix_hash_keeps_a_prefix_on_one_worker_unless_it_is_overloaded():
    ws = workers(4)
    policy = PrefixHashPolicy(prefix_chars=16, load_factor=1.25, abs_threshold=2)
    # the same first 16 characters: the same worker, whatever follows
    first = policy.pick_py(ws, text="shared-system-prompt one")
    assert all(policy.pick_py(ws, text=f"shared-system-prompt {i}") is first for i in range(50))
    spread = collections.Counter(policy.pick_py(ws, text=f"prefix number {i:04d} ...").id for i in range(400))
    assert len(spread) == 4 and min(spread.values()) > 50, spread
    # a fresh policy (another gateway) agrees
    assert PrefixHashPolicy(prefix_chars=16).pick_py(ws, text="shared-system-prompt x") is first
    # overloaded (above 1.25 x mean and mean + 2): the next choice
    first.inflight = 10
    moved = policy.pick_py(ws, text="shared-system-prompt one")
    assert moved is not first
    first.inflight = 2  # above 1.25 x the mean (0.5), but only 1.5 above it: not overloaded
    assert policy.pick_py(ws, text="shared-system-prompt one") is first
