# cython: language_level=3
"""Routing policies and the router that groups workers by (type, model).

Every policy picks among a group's ready workers, skipping those whose
circuit breaker is open. Load is the gateway's own in-flight count per
worker (Worker.inflight), kept by the proxy for every policy."""

import logging
import os

from libc.stdint cimport uint64_t, uint32_t, int32_t
from libc.stdlib cimport malloc, free, realloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from libc.math cimport sqrt, exp
from cpython.unicode cimport PyUnicode_GET_LENGTH

from smg._fast.clock cimport monotonic
from smg._fast.worker cimport Worker, STATE_READY
from smg._fast.hashing cimport fnv1a, hash_text, mix64
from smg._fast.radix cimport RadixTree, Node, node_end, INSERT_HIT, INSERT_WEAK
from smg._fast.text cimport Text, text_view

_log = logging.getLogger("smg.policies")


# --- a small fast PRNG (xorshift64*), seeded per process -----------------

cdef uint64_t _rng_state = 0


cdef uint64_t rand64() noexcept:
    global _rng_state
    cdef uint64_t x = _rng_state
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    _rng_state = x
    return x * <uint64_t>0x2545F4914F6CDD1DULL


def reseed():
    global _rng_state
    _rng_state = int.from_bytes(os.urandom(8), "little") | 1

reseed()


cdef inline bint less_loaded(Worker a, Worker b) noexcept:
    """a is a better least-loaded choice than b: fewer in flight, then fewer routed."""
    if a.inflight != b.inflight:
        return a.inflight < b.inflight
    return a.routed < b.routed


cdef Worker random_routable(list ready, double now):
    """A uniformly random routable worker (the first routable one after a
    random start), or None."""
    cdef Py_ssize_t n = len(ready), i, start
    cdef Worker w
    if n == 0:
        return None
    start = rand64() % n
    for i in range(n):
        w = <Worker>ready[(start + i) % n]
        if w.routable(now):
            return w
    return None


cdef Worker least_loaded(list ready, double now, Worker avoid):
    cdef Worker best = None, w
    for w in ready:
        if w is avoid or not w.routable(now):
            continue
        if best is None or less_loaded(w, best):
            best = w
    return best


# --- policies --------------------------------------------------------------

cdef class Policy:

    def __init__(self):
        self.name = "base"
        self.needs_text = False

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        return least_loaded(ready, now, None)

    cpdef workers_changed(self, list workers):
        pass

    cpdef worker_removed(self, Worker worker):
        pass

    def pick_py(self, list ready, str text=None, bytes key=None, double now=0.0):
        """Python entry point, for tests and benchmarks."""
        return self.pick(ready, text, key, now)


cdef class RoundRobinPolicy(Policy):
    cdef uint64_t counter

    def __init__(self):
        self.name = "round_robin"
        self.needs_text = False
        self.counter = 0

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        cdef Py_ssize_t n = len(ready), i
        cdef Worker w
        if n == 0:
            return None
        for i in range(n):
            w = <Worker>ready[(self.counter + i) % n]
            if w.routable(now):
                self.counter += i + 1
                return w
        return None


cdef class RandomPolicy(Policy):

    def __init__(self):
        self.name = "random"
        self.needs_text = False

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        return random_routable(ready, now)


cdef class PowerOfTwoPolicy(Policy):

    def __init__(self):
        self.name = "power_of_two"
        self.needs_text = False

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        cdef Py_ssize_t n = len(ready), i, j
        cdef Worker a, b
        if n == 0:
            return None
        if n == 1:
            a = <Worker>ready[0]
            return a if a.routable(now) else None
        i = rand64() % n
        j = rand64() % (n - 1)
        if j >= i:
            j += 1
        a = <Worker>ready[i]
        b = <Worker>ready[j]
        if not a.routable(now):
            if b.routable(now):
                return b
            return least_loaded(ready, now, None)
        if not b.routable(now):
            return a
        return b if less_loaded(b, a) else a


DEF VNODES = 150


def _point_key(p):
    return (p[0], p[1])


cdef class LeastLoadPolicy(Policy):
    """The routable worker with the fewest requests in flight (the gateway's
    own count). The reference's least_load also weighs engine-reported KV
    pressure and throughput, which HTTP workers do not push to smg."""

    def __init__(self):
        self.name = "least_load"
        self.needs_text = False

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        return least_loaded(ready, now, None)


cdef class PassthroughPolicy(Policy):
    """Everything to the first routable worker, in registration order (the
    reference's `passthrough`, for a single backend). With several
    workers the others take traffic only when the first cannot; that is
    logged once each time the group's workers change."""

    def __init__(self):
        self.name = "passthrough"
        self.needs_text = False

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        cdef Worker w
        for w in ready:
            if w.routable(now):
                return w
        return None

    cpdef workers_changed(self, list workers):
        if len(workers) > 1:
            _log.warning("the passthrough policy serves one backend, but %d workers are ready: only the first "
                         "that can take a request (%s) gets it", len(workers), (<Worker>workers[0]).url)


DEF BUCKET_SAMPLES = 4096


cdef class BucketPolicy(Policy):
    """Requests by length (the routing text's characters, which prefill
    cost follows): the workers split the length range into consecutive
    buckets, short prompts on the first, long ones on the last. Every
    `adjust_interval` seconds the boundaries move so that each bucket
    holds an equal share of the characters of the last BUCKET_SAMPLES
    requests. A worker whose in-flight count is above the least loaded's
    by more than `balance_abs` and by a factor over `balance_rel` is passed
    over for the least loaded (so is one that cannot take requests).
    Until the first adjustment, requests go to the least loaded worker."""
    cdef list samples
    cdef Py_ssize_t next_sample
    cdef public list boundaries      # len(ready) - 1 ascending lengths
    cdef double adjust_interval
    cdef double last_adjust
    cdef double balance_abs
    cdef double balance_rel

    def __init__(self, double adjust_interval=5.0, double balance_abs=64, double balance_rel=1.5):
        self.name = "bucket"
        self.needs_text = True
        self.samples = []
        self.next_sample = 0
        self.boundaries = []
        self.adjust_interval = adjust_interval
        self.last_adjust = 0.0
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        cdef Py_ssize_t length = len(text) if text is not None else 0
        cdef Py_ssize_t n = len(ready), i = 0
        cdef Worker w, least
        if len(self.samples) < BUCKET_SAMPLES:
            self.samples.append(length)
        else:
            self.samples[self.next_sample] = length
            self.next_sample = (self.next_sample + 1) % BUCKET_SAMPLES
        if now - self.last_adjust >= self.adjust_interval:
            self.last_adjust = now
            self.adjust(n)
        least = least_loaded(ready, now, None)
        if n == 0 or len(self.boundaries) != n - 1 or least is None:
            return least
        while i < n - 1 and length > <Py_ssize_t>self.boundaries[i]:
            i += 1
        w = <Worker>ready[i]
        if not w.routable(now):
            return least
        if w.inflight - least.inflight > self.balance_abs and w.inflight > least.inflight * self.balance_rel:
            return least
        return w

    cdef adjust(self, Py_ssize_t buckets):
        """Boundaries splitting the sampled characters into shares as equal
        as the lengths allow: requests of one length stay in one bucket, and
        a bucket closes before a length whose characters would overshoot
        its share by more than leaving them out undershoots it."""
        cdef dict mass = {}
        cdef double total = 0.0, acc = 0.0, share, target
        cdef list bounds = []
        cdef Py_ssize_t value, prev = 0
        if buckets < 2 or not self.samples:
            self.boundaries = []
            return
        for x in self.samples:
            mass[x] = mass.get(x, 0) + <Py_ssize_t>x
            total += <Py_ssize_t>x
        share = total / buckets
        for x in sorted(mass):
            value = x
            m = <Py_ssize_t>mass[x]
            target = share * (len(bounds) + 1)
            if len(bounds) < buckets - 1 and acc > 0 and acc + m > target and acc + m - target > target - acc:
                bounds.append(prev)
            acc += m
            prev = value
        while len(bounds) < buckets - 1:
            bounds.append(prev)
        self.boundaries = bounds

    cpdef workers_changed(self, list workers):
        self.last_adjust = 0.0      # re-split for the new number of buckets at the next pick

    def adjust_py(self, Py_ssize_t buckets):
        self.adjust(buckets)


cdef class PrefixHashPolicy(Policy):
    """Requests whose routing texts share their first `prefix_chars`
    characters go to the same worker: rendezvous hashing of that prefix over
    the routable workers, walking to the next choice while a worker is
    overloaded (in flight above `load_factor` times the mean AND above the
    mean by more than `abs_threshold`). Stable across gateways: the same
    prefix picks the same worker everywhere."""
    cdef Py_ssize_t prefix_chars
    cdef double load_factor
    cdef double abs_threshold

    def __init__(self, Py_ssize_t prefix_chars=1024, double load_factor=1.25, double abs_threshold=10.0):
        self.name = "prefix_hash"
        self.needs_text = True
        self.prefix_chars = prefix_chars
        self.load_factor = load_factor
        self.abs_threshold = abs_threshold

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        cdef uint64_t h, weight, best_weight = 0
        cdef Worker best = None, w
        cdef double total = 0.0, mean
        cdef Py_ssize_t count = 0
        cdef Text view
        if text is None:
            return least_loaded(ready, now, None)
        view = text_view(text, self.prefix_chars)
        h = hash_text(&view, view.length)
        for w in ready:
            if w.routable(now):
                total += w.inflight
                count += 1
        if count == 0:
            return None
        mean = total / count
        for w in ready:
            if not w.routable(now):
                continue
            if w.inflight > self.load_factor * mean and w.inflight - mean > self.abs_threshold:
                continue
            weight = weight_of(h, w)
            if best is None or weight > best_weight:
                best = w
                best_weight = weight
        if best is None:
            best = least_loaded(ready, now, None)
        return best


# ManualPolicy assignment modes (--assignment-mode)
cdef enum:
    ASSIGN_RANDOM = 0
    ASSIGN_MIN_LOAD = 1
    ASSIGN_MIN_GROUP = 2
ASSIGNMENT_MODES = {"random": ASSIGN_RANDOM, "min_load": ASSIGN_MIN_LOAD, "min_group": ASSIGN_MIN_GROUP}
DEF MANUAL_MAX_KEYS = 1048576
DEF MANUAL_SWEEP_SECS = 60.0


cdef class PinTable:
    """Keys pinned to workers: the manual policy's assignments and the
    pins of --sticky-sessions. A key whose worker can no longer take
    requests is unpinned when next looked up. Keys unused for `max_idle`
    seconds are forgotten, and at most MANUAL_MAX_KEYS are kept (the least
    recently used go first)."""

    def __init__(self, double max_idle=14400.0):
        self.pins = {}
        self.keys_of = {}
        self.max_idle = max_idle
        self.last_sweep = 0.0
        self.moved = 0

    def __len__(self):
        return len(self.pins)

    cdef Worker get(self, bytes key, double now):
        """The routable worker `key` is pinned to, or None (unpinned)."""
        cdef list pin
        cdef Worker w
        if now - self.last_sweep >= MANUAL_SWEEP_SECS or len(self.pins) > MANUAL_MAX_KEYS:
            self.sweep(now)
        pin = self.pins.get(key)
        if pin is None:
            return None
        w = <Worker>pin[0]
        if w.routable(now):
            pin[1] = now
            return w
        self.unpin(key, w)
        self.moved += 1
        return None

    cdef int put(self, bytes key, Worker w, double now) except -1:
        cdef list pin = self.pins.get(key)
        if pin is not None:
            if pin[0] is w:
                pin[1] = now
                return 0
            self.unpin(key, <Worker>pin[0])
            self.moved += 1
        self.pins[key] = [w, now]
        self.keys_of[w] = self.keys_of.get(w, 0) + 1
        return 0

    cdef int count(self, Worker w):
        return self.keys_of.get(w, 0)

    cdef unpin(self, bytes key, Worker w):
        del self.pins[key]
        left = self.keys_of.get(w, 1) - 1
        if left > 0:
            self.keys_of[w] = left
        else:
            self.keys_of.pop(w, None)

    cdef sweep(self, double now):
        """Forget idle keys; over the cap, the least recently used too."""
        self.last_sweep = now
        for key, pin in list(self.pins.items()):
            if now - <double>pin[1] > self.max_idle:
                self.unpin(key, <Worker>pin[0])
        if len(self.pins) > MANUAL_MAX_KEYS:
            by_age = sorted(self.pins.items(), key=_last_used)
            for key, pin in by_age[:len(self.pins) - MANUAL_MAX_KEYS * 9 // 10]:
                self.unpin(key, <Worker>pin[0])

    cpdef worker_removed(self, Worker worker):
        for key, pin in list(self.pins.items()):
            if pin[0] is worker:
                self.unpin(key, worker)


cdef class ManualPolicy(Policy):
    """Sticky routing by the X-SMG-Routing-Key header (the reference's
    `manual` policy). A key's first request picks a worker by the
    assignment mode (random, min_load: fewest in flight, min_group: fewest
    keys) and pins the key to it; later requests with the key go there
    while it can take them, else the key moves (see PinTable). Requests
    without a key go to a random worker."""
    cdef public PinTable table
    cdef int mode

    def __init__(self, int mode=0, double max_idle=14400.0):
        self.name = "manual"
        self.needs_text = False
        self.header_key_only = True
        self.table = PinTable(max_idle)
        self.mode = mode

    @property
    def pinned(self):
        return len(self.table)

    @property
    def moved(self):
        return self.table.moved

    cdef Worker assign(self, list ready, double now):
        cdef Worker best = None, w
        if self.mode == ASSIGN_RANDOM:
            return random_routable(ready, now)
        if self.mode == ASSIGN_MIN_LOAD:
            return least_loaded(ready, now, None)
        for w in ready:
            if w.routable(now) and (best is None or self.table.count(w) < self.table.count(best)):
                best = w
        return best

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        cdef Worker w
        if key is None:
            return random_routable(ready, now)
        w = self.table.get(key, now)
        if w is not None:
            return w
        w = self.assign(ready, now)
        if w is not None:
            self.table.put(key, w, now)
        return w

    cpdef worker_removed(self, Worker worker):
        self.table.worker_removed(worker)


def _targets(Worker w):
    """What the router routes to for a registered worker: the worker, or its
    data-parallel rank views."""
    return w.rank_views() if w.dp_size > 1 else [w]


def _last_used(item):
    return item[1][1]


cdef class ConsistentHashPolicy(Policy):
    """A hash ring with 150 virtual nodes per worker. The key comes from
    X-SMG-Routing-Key, else Authorization, else X-Forwarded-For; a request
    with none is routed to the least-loaded worker. A key whose worker is
    not routable moves clockwise to the next routable one."""
    cdef uint64_t* ring_hashes
    cdef list ring_workers
    cdef Py_ssize_t ring_size

    def __init__(self):
        self.name = "consistent_hashing"
        self.needs_text = False
        self.ring_hashes = NULL
        self.ring_workers = []
        self.ring_size = 0

    def __dealloc__(self):
        if self.ring_hashes != NULL:
            free(self.ring_hashes)

    cpdef workers_changed(self, list workers):
        cdef list points = []
        cdef Worker w
        cdef int v
        cdef bytes label
        for w in workers:
            for v in range(VNODES):
                label = f"{w.url}#{v}".encode()
                points.append((fnv1a(<const unsigned char*>PyBytes_AS_STRING(label), PyBytes_GET_SIZE(label)), w.url, w))
        points.sort(key=_point_key)
        if self.ring_hashes != NULL:
            free(self.ring_hashes)
            self.ring_hashes = NULL
        self.ring_size = len(points)
        self.ring_workers = [p[2] for p in points]
        if self.ring_size:
            self.ring_hashes = <uint64_t*>malloc(self.ring_size * sizeof(uint64_t))
            if self.ring_hashes == NULL:
                raise MemoryError()
            for v in range(self.ring_size):
                self.ring_hashes[v] = points[v][0]

    cpdef worker_removed(self, Worker worker):
        self.workers_changed([w for w in dict.fromkeys(self.ring_workers) if w is not worker])

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        cdef uint64_t h
        cdef Py_ssize_t lo = 0, hi = self.ring_size, mid, i
        cdef Worker w
        if key is None or self.ring_size == 0:
            return least_loaded(ready, now, None)
        h = fnv1a(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        while lo < hi:
            mid = (lo + hi) >> 1
            if self.ring_hashes[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        for i in range(self.ring_size):
            w = <Worker>self.ring_workers[(lo + i) % self.ring_size]
            if w.routable(now):
                return w
        return None


# Spill bookkeeping of cache_aware: a moving average over a worker's cache
# hits (about 1/SPILL_AVERAGING of them) of how many left it. A worker whose
# requests leave more often than MOVE_SPILL_RATE is overloaded by the
# prefixes it holds, not by a passing burst: the prefix of the next request
# that leaves it moves (its home changes) instead of spilling once.
DEF SPILL_AVERAGING = 0.0005
DEF LOAD_SMOOTHING_SECS = 0.05
DEF MOVE_SPILL_RATE = 0.05

# A new prefix is placed by the first PLACEMENT_KEY_CHARS characters of its
# routing text: long enough to tell system prompts, documents and
# conversations apart, short enough to lie inside the part that the
# requests sharing them have in common. Prompts with the same leading
# characters form a *prefix group*.
DEF PLACEMENT_KEY_CHARS = 256

# A tree grown past max_tree_size between periodic evictions is trimmed at
# once, to this share of it (see CacheAwarePolicy.trim).
DEF TRIM_TO = 0.875

# One prompt is routed, and held in the tree, by at most its first
# max_tree_size / PROMPT_SHARE characters (at least PROMPT_FLOOR_CHARS):
# 8 Mi characters at the default budget, longer than any model's context,
# so routing loses nothing, while one huge prompt cannot flush every other
# prefix from the tree nor make the gateway hold a second copy of itself.
DEF PROMPT_SHARE = 8
DEF PROMPT_FLOOR_CHARS = 1048576

# Precise mode: a worker whose engine reports its blocks is also taken to
# hold what it was sent in the last PENDING_SECS, whose blocks its engine has
# not stored yet (still queued or prefilling), so requests sharing a prompt
# that arrive together are sent together.
DEF PENDING_SECS = 2.0

# What leaving costs. On its owner, a prompt costs the prefill queued there
# ahead of it (Worker.prefill_queue_chars) plus the part of the prompt that
# the owner does not hold; on another worker, the queue there plus
# REPREFILL_WEIGHT times what that worker does not hold: a re-prefill delays
# the request itself, and as much again the requests that queue behind it
# there (counted once, spills cascade: each one lengthens its target's
# queue until that worker's own requests spill). A request leaves only when
# staying costs more than STAY_FACTOR times the cheapest other worker plus
# STAY_FLOOR_CHARS. So a long cached conversation stays unless its worker's
# queue is far longer than re-prefilling it; a shared prompt that other
# workers hold too spreads over them as soon as its owner's queue grows.
DEF STAY_FACTOR = 1.5
DEF STAY_FLOOR_CHARS = 1024
DEF REPREFILL_WEIGHT = 2

# why a request left the worker that holds its prefix
cdef enum:
    LEFT_INFLIGHT = 0       # the owner's unanswered requests are over the spill gate
    LEFT_PREFILL = 1        # the owner's queued prefill costs more than re-prefilling elsewhere
    LEFT_REASONS = 2

LEFT_REASON_NAMES = ("inflight", "prefill_queue")


cdef struct Gate:
    double mean             # the routable workers' mean unanswered count
    double margin           # how far above it a worker may go
    int count               # routable workers
    long long min_queue     # the least prefill_queue_chars among them


cdef inline uint64_t weight_of(uint64_t key, Worker w) noexcept:
    """The rendezvous weight of worker w for a prefix group."""
    return mix64(key ^ w.url_hash)


cdef inline bint too_costly(long long stay, long long alternative) noexcept:
    """Staying costs more than leaving for `alternative` by enough to leave."""
    return stay > STAY_FACTOR * alternative + STAY_FLOOR_CHARS


cdef class CacheAwarePolicy(Policy):
    """Cache-aware routing: send a prompt to the worker that already holds
    its longest prefix, unless staying there costs more than going
    elsewhere (see STAY_FACTOR) or its unanswered requests are over the spill
    gate.

    Independent routers (replicas, --workers processes) must send a prefix
    to the same worker without talking to each other, so every choice that
    is not "where the prefix already is" depends on the prefix and the
    worker set, and on load only where load is high:
    - a prompt whose prefix no worker holds yet is *placed* by rendezvous
      (highest random weight) hashing of its leading characters over the
      routable workers whose load lets it through;
    - a request that leaves an overloaded owner *spills*: it goes to the
      cheapest other worker (rendezvous order among those that cost about
      the same, so every router picks the same one), which from then on
      holds the prefix too, without a claim on its traffic; the prefix's
      home does not change, so routers that did not see the spill still
      agree on it;
    - only an owner that keeps spilling hands the prefix over (a *move*):
      its requests go to the new worker from then on."""
    cdef readonly RadixTree tree
    cdef public double cache_threshold
    cdef public double balance_abs_threshold
    cdef public double balance_rel_threshold
    cdef public long long max_tree_size
    cdef dict slots          # worker id -> slot in the tree
    cdef list by_slot        # slot -> Worker (None once removed)
    cdef list free_slots
    cdef list spill_rate     # slot -> moving average of how often its cache hits left it
    cdef list load_avg       # slot -> unanswered count smoothed over LOAD_SMOOTHING_SECS
    cdef list load_time      # slot -> when load_avg was last updated
    cdef Py_ssize_t* held    # slot -> characters of the prompt being routed that the slot holds
    cdef double* since       # slot -> precise mode: what the tree says it was sent after this counts (note_holdings)
    cdef Py_ssize_t held_len # slots in `held` (a slot made since holds nothing)
    cdef Py_ssize_t held_cap
    cdef public long long hits
    cdef public long long misses
    cdef long long spills_by[LEFT_REASONS]
    cdef long long moves_by[LEFT_REASONS]
    # characters routed, and of those the ones the chosen worker was
    # expected to hold (its engine's count of cached characters, set beside
    # this, says how right the expectation was)
    cdef public long long routed_chars
    cdef public long long expected_cached_chars
    # precise mode (smg.kv_events.KvEvents): what the engines report holding,
    # for the workers whose event streams are trusted (None: the tree only)
    cdef public object kv

    def __init__(self, double cache_threshold=0.3, double balance_abs_threshold=64,
                 double balance_rel_threshold=1.5, long long max_tree_size=67108864):
        self.name = "cache_aware"
        self.needs_text = True
        self.tree = RadixTree()
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_size = max_tree_size
        self.slots = {}
        self.by_slot = []
        self.free_slots = []
        self.spill_rate = []
        self.load_avg = []
        self.load_time = []
        self.hits = 0
        self.misses = 0

    def __dealloc__(self):
        free(self.held)
        free(self.since)

    @property
    def spills(self):
        """Requests that went once to another worker than their prefix's owner."""
        cdef long long total = 0
        for i in range(LEFT_REASONS):
            total += self.spills_by[i]
        return total

    @property
    def moves(self):
        """Prefixes handed over to another worker (their home changed)."""
        cdef long long total = 0
        for i in range(LEFT_REASONS):
            total += self.moves_by[i]
        return total

    @property
    def placement_changes(self):
        """{(change, reason): count}: spills and moves by why the request left
        its prefix's owner (see LEFT_REASON_NAMES)."""
        out = {}
        for i in range(LEFT_REASONS):
            out["spill", LEFT_REASON_NAMES[i]] = self.spills_by[i]
            out["move", LEFT_REASON_NAMES[i]] = self.moves_by[i]
        return out

    cdef int slot_for(self, Worker w) except -1:
        slot = self.slots.get(w.id)
        if slot is not None:
            return <int>slot
        if self.free_slots:
            slot = self.free_slots.pop()
            self.by_slot[slot] = w
            self.spill_rate[slot] = 0.0
            self.load_avg[slot] = 0.0
            self.load_time[slot] = 0.0
        else:
            slot = len(self.by_slot)
            self.by_slot.append(w)
            self.spill_rate.append(0.0)
            self.load_avg.append(0.0)
            self.load_time.append(0.0)
        self.slots[w.id] = slot
        return <int>slot

    def slot_py(self, Worker w):
        """The worker's slot, made if it has none."""
        return self.slot_for(w)

    cpdef workers_changed(self, list workers):
        if self.kv is not None:
            self.kv.workers_changed(self, workers)

    cpdef worker_removed(self, Worker worker):
        slot = self.slots.pop(worker.id, None)
        if self.kv is not None:
            self.kv.worker_removed(worker, slot)
        if slot is None:
            return
        self.tree.remove_slot(<int>slot)
        self.by_slot[slot] = None
        self.free_slots.append(slot)

    def slot_of(self, Worker worker):
        return self.slots.get(worker.id)

    def evict(self):
        """Trim the tree to max_tree_size characters, least recently used first."""
        return self.tree.evict_to(self.max_tree_size)

    cdef Worker owner_at(self, Node* node, double now):
        """The routable owner of `node` with the most hits; on a tie, the
        incumbent (owners are kept in the order they arrived)."""
        cdef Worker best = None, w
        cdef uint32_t best_hits = 0
        cdef int32_t k
        for k in range(node.nowners):
            w = <Worker>self.by_slot[node.owners[k].slot]
            if w is None or not w.routable(now):
                continue
            if best is None or node.owners[k].hits > best_hits:
                best = w
                best_hits = node.owners[k].hits
        return best

    cdef int note_holdings(self, Node* best, Py_ssize_t matched, bint recent_only=False) except -1:
        """held[slot]: how many leading characters of the prompt just matched
        (`best`, `matched` from RadixTree.match) each worker slot holds. With
        `recent_only`, a slot whose since[slot] is set (precise mode: its
        engine's events say what it holds) counts only what it was sent after
        that time: requests whose blocks its engine has not reported yet."""
        cdef Py_ssize_t slots = len(self.by_slot), i
        cdef Py_ssize_t end, depth = matched
        cdef Node* node = best
        cdef int32_t k, s
        cdef Py_ssize_t* grown
        cdef double* grown_since
        if slots > self.held_cap or (self.since == NULL and slots):
            grown = <Py_ssize_t*>realloc(self.held, slots * sizeof(Py_ssize_t))
            if grown == NULL:
                raise MemoryError()
            self.held = grown
            grown_since = <double*>realloc(self.since, slots * sizeof(double))
            if grown_since == NULL:
                raise MemoryError()
            self.since = grown_since
            for i in range(slots):
                self.since[i] = -1.0
            self.held_cap = slots
        for i in range(slots):
            self.held[i] = 0
        self.held_len = slots
        if node == NULL:
            return 0
        end = node_end(node)
        while node.parent != NULL:
            for k in range(node.nowners):
                s = node.owners[k].slot
                if s < slots and self.held[s] == 0:
                    if recent_only and node.owners[k].last < self.since[s]:
                        continue
                    self.held[s] = depth
            end -= node.length
            depth = end
            node = node.parent
        return 0

    cdef double smoothed_load(self, int slot, Worker w, double now):
        """w's unanswered count averaged over the last LOAD_SMOOTHING_SECS."""
        cdef double dt = now - <double>self.load_time[slot]
        cdef double keep = exp(-dt / LOAD_SMOOTHING_SECS) if dt > 0 else 1.0
        cdef double avg = <double>self.load_avg[slot] * keep + w.unanswered * (1.0 - keep)
        if dt > 0:
            self.load_avg[slot] = avg
            self.load_time[slot] = now
        return avg

    cdef Gate gate(self, list ready, double now):
        """The spill gate's bar for this moment: the mean load and the margin,
        and the shortest prefill queue.

        The load is the count of requests not answering yet
        (Worker.unanswered): a new prompt's first token waits for those, not
        for the streams a worker is already decoding, so a worker busy
        decoding a hot prompt's answers is not overloaded by them. An answer
        that is not streamed counts until it is complete.

        That count jitters by about its square root from one request
        to the next, and a spill on that noise gives up a cache hit for
        nothing (at 4 workers x 8 unanswered, 1.6% of all requests would
        spill). So the margin is the natural swing of a count at that mean
        (2 sqrt(mean), at least 4), capped by balance_abs_threshold."""
        cdef Gate g
        cdef Worker o
        cdef long total = 0
        g.count = 0
        g.min_queue = 0
        for o in ready:
            if o.routable(now):
                total += o.unanswered
                if g.count == 0 or o.prefill_queue_chars < g.min_queue:
                    g.min_queue = o.prefill_queue_chars
                g.count += 1
        g.mean = <double>total / g.count if g.count else 0.0
        g.margin = 2.0 * sqrt(g.mean)
        if g.margin < 4.0:
            g.margin = 4.0
        if g.margin > self.balance_abs_threshold:
            g.margin = self.balance_abs_threshold
        return g

    cdef bint overloaded(self, Worker w, Gate* g, double now) except -1:
        """Load above the mean by more than the margin and by more than
        balance_rel_threshold times the mean. The gate looks at the load
        smoothed over ~50 ms -- load that lasts (a worker holding too much of
        the traffic, LLM requests that take seconds) passes unchanged -- and
        at the instant load only when it jumps by twice the margin, which
        jitter does not (a burst)."""
        cdef double smoothed
        if g.count <= 1:
            return False
        smoothed = self.smoothed_load(self.slot_for(w), w, now)
        if smoothed > g.mean + g.margin and smoothed > self.balance_rel_threshold * g.mean:
            return True
        return w.unanswered > g.mean + 2.0 * g.margin and w.unanswered > self.balance_rel_threshold * g.mean

    cdef Worker place(self, uint64_t key, list ready, Gate* g, double now, Worker avoid, set crowded=None):
        """Where a prefix group that no worker holds goes: the routable worker
        with the highest rendezvous weight for it, among those the spill
        gate lets through; when the gate stops every one, the least-loaded
        worker. The worker placed becomes the prefix's home in
        every router (each places it alike), so a queue there does not move
        it: a router that placed it elsewhere to save one wait would disagree
        with the others from then on, and each would prefill it on its own
        worker. `crowded`: slots passed over unless every worker is one of
        them (precise mode: engines evicting much faster than the others)."""
        cdef uint64_t weight, best_weight = 0
        cdef Worker best = None, w
        for w in ready:
            if w is avoid or not w.routable(now):
                continue
            if crowded and self.slot_for(w) in crowded:
                continue
            weight = weight_of(key, w)
            if best is not None and weight <= best_weight:
                continue
            if self.overloaded(w, g, now):
                continue
            best = w
            best_weight = weight
        if best is None and crowded:
            return self.place(key, ready, g, now, avoid, None)
        if best is None:
            best = least_loaded(ready, now, avoid)
        return best

    def place_py(self, list ready, str text, double now=0.0, Worker avoid=None):
        """Python entry point to place(), for tests."""
        cdef Gate g = self.gate(ready, now)
        return self.place(group_key(text), ready, &g, now, avoid)

    cdef Worker cheapest(self, uint64_t key, list ready, Gate* g, double now, Worker avoid, Py_ssize_t n,
                         long long* cost):
        """The worker other than `avoid` where the prompt (`n` characters; the
        holdings from note_holdings) costs least, among those the spill
        gate lets through, and that cost. Costs within STAY_FLOOR_CHARS of the
        least count alike: of those, the highest rendezvous weight wins, so
        routers that see about the same load choose the same worker. None
        when the gate stops every one."""
        cdef Worker w, best = None
        cdef long long c, least = -1
        cdef int s
        cdef uint64_t weight, best_weight = 0
        cdef list costs = []
        for w in ready:
            if w is avoid or not w.routable(now) or self.overloaded(w, g, now):
                continue
            s = self.slot_for(w)
            c = w.prefill_queue_chars + REPREFILL_WEIGHT * (n - (self.held[s] if s < self.held_len else 0))
            costs.append((w, c))
            if least < 0 or c < least:
                least = c
        for w, c in costs:
            if c <= least + STAY_FLOOR_CHARS:
                weight = weight_of(key, w)
                if best is None or weight > best_weight:
                    best = w
                    best_weight = weight
                    cost[0] = c
        return best

    cdef Worker leave_to(self, Worker w, int slot, Py_ssize_t n, Py_ssize_t held, Py_ssize_t most_held,
                         uint64_t gkey, list ready, Gate* g, double now, Node* best, bint noted,
                         int* reason, long long* cost):
        """Where a prompt of `n` characters leaves its owner w (slot `slot`,
        holding `held` of them) for, or None: it stays. No worker holds more
        than `most_held`; `best` is the tree's match for note_holdings, unless
        the holdings are `noted` already. Sets why it leaves (reason) and
        what the prompt costs where it goes (cost)."""
        cdef long long stay = w.prefill_queue_chars + n - held
        cdef Worker target
        reason[0] = -1
        if self.overloaded(w, g, now):
            reason[0] = LEFT_INFLIGHT
        elif too_costly(stay, g.min_queue + REPREFILL_WEIGHT * (n - most_held)):
            # (no worker holds more than `most_held`: no other can cost less)
            reason[0] = LEFT_PREFILL
        else:
            return None
        if not noted:
            self.note_holdings(best, most_held)
        target = self.cheapest(gkey, ready, g, now, w, n, cost)
        if target is None:
            return None
        if reason[0] == LEFT_PREFILL:
            return target if too_costly(stay, cost[0]) else None
        if too_costly(cost[0], stay) and <double>self.load_avg[slot] <= 2.0 * (g.mean + g.margin):
            # over the spill gate, but not twice over it: not worth
            # re-prefilling what the owner holds (answers that are
            # not streamed count until complete, and may be
            # decoding, which a prompt's first token does not wait for)
            return None
        return target

    cdef Worker pick(self, list ready, str text, bytes key, double now):
        if self.kv is not None:
            return self.pick_precise(ready, text, now)
        return self.pick_tree(ready, text, key, now)

    cdef Worker pick_tree(self, list ready, str text, bytes key, double now):
        """Where the character tree says the prompt's longest prefix is."""
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text) if text is not None else 0
        cdef Text view
        cdef Text* prompt = &view
        cdef Node* best
        cdef Node* node
        cdef Py_ssize_t matched, depth, held
        cdef Worker w = None, target = None
        cdef int slot, reason
        cdef long long cost = 0
        cdef double rate
        cdef Gate g
        cdef uint64_t gkey
        if not ready:
            return None
        if n == 0:
            return least_loaded(ready, now, None)
        if n > self.prompt_budget():
            # a longer prompt is routed (and recorded) by that much of its start
            n = self.prompt_budget()
        view = text_view(text, n)
        try:
            g = self.gate(ready, now)
            gkey = hash_text(prompt, n if n < PLACEMENT_KEY_CHARS else PLACEMENT_KEY_CHARS)
            matched = self.tree.match(prompt, n, &best, &depth)
            node = best
            held = matched
            if node != NULL and matched > self.cache_threshold * n:
                w = self.owner_at(node, now)
                # the deepest owners are unavailable: fall back up the path
                while w is None and node.parent != NULL and node.parent.parent != NULL:
                    node = node.parent
                    held = node_end(node)
                    if held <= self.cache_threshold * n:
                        break
                    w = self.owner_at(node, now)
            if w is None:
                # a cache miss: place the prefix; that worker starts holding it
                self.misses += 1
                w = self.place(gkey, ready, &g, now, None)
                if w is not None:
                    self.tree.insert_matched(prompt, n, best, matched, self.slot_for(w), now, INSERT_HIT)
                    w.next_prefill_chars = n
                return self.expect_cached(w, n)
            slot = self.slot_for(w)
            target = self.leave_to(w, slot, n, held, matched, gkey, ready, &g, now, best, False, &reason, &cost)
            if target is None:
                self.hits += 1
                self.spill_rate[slot] = <double>self.spill_rate[slot] * (1.0 - SPILL_AVERAGING)
                self.tree.insert_matched(prompt, n, best, matched, slot, now, INSERT_HIT)
                w.next_prefill_chars = n - held
                return self.expect_cached(w, n)
            target.next_prefill_chars = (cost - target.prefill_queue_chars) // REPREFILL_WEIGHT
            rate = <double>self.spill_rate[slot] * (1.0 - SPILL_AVERAGING) + SPILL_AVERAGING
            if rate > MOVE_SPILL_RATE:
                # w's requests leave it persistently, not by chance: hand
                # this prefix over, so the load evens out instead of
                # spilling forever (replicas that see w overloaded too hand
                # it to the same worker: cheapest() agrees across them)
                self.moves_by[reason] += 1
                self.spill_rate[slot] = 0.0
                _log.debug("cache_aware: prefix group %016x moves from %s to %s (%s; %d of %d characters "
                           "held there)", gkey, w.url, target.url, LEFT_REASON_NAMES[reason], held, n)
                self.tree.hand_over(prompt, n, slot, self.slot_for(target), now)
                return self.expect_cached(target, n)
            # a one-off spill. The target holds the matched part from now on
            # (a later spill of the prefix finds it there), but claims none
            # of its traffic and its own tail is not recorded: the prefix,
            # and repeats of this very prompt, stay with their owner
            self.spills_by[reason] += 1
            self.spill_rate[slot] = rate
            self.tree.insert_matched(prompt, matched, best, matched, self.slot_for(target), now, INSERT_WEAK)
            return self.expect_cached(target, n)
        finally:
            if self.tree.total_chars > self.max_tree_size:
                self.trim(n)

    cdef Worker pick_precise(self, list ready, str text, double now):
        """pick() in precise mode: what each worker holds is what its engine
        reported (KvEvents.holdings) where its stream is trusted, and what
        the tree says elsewhere. The owner is the worker holding the most
        (the highest rendezvous weight among equals, so replicas, which see
        the same events, agree); leaving it is weighed as in pick_tree(). The
        tree records every request too, so a worker whose events stop is
        routed as without them."""
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text) if text is not None else 0
        cdef Text view
        cdef Text* prompt = &view
        cdef Node* best
        cdef Py_ssize_t matched, depth, top = 0, h
        cdef Worker w = None, o, target = None
        cdef int s, reason
        cdef long long cost = 0
        cdef uint64_t gkey, weight, top_weight = 0
        cdef Gate g
        cdef dict slots = {}
        cdef Py_ssize_t i
        if not ready:
            return None
        if n == 0:
            return least_loaded(ready, now, None)
        if n > self.prompt_budget():
            n = self.prompt_budget()
        view = text_view(text, n)
        try:
            g = self.gate(ready, now)
            gkey = hash_text(prompt, n if n < PLACEMENT_KEY_CHARS else PLACEMENT_KEY_CHARS)
            for o in ready:
                if o.routable(now):
                    slots[o.id] = self.slot_for(o)
            matched = self.tree.match(prompt, n, &best, &depth)
            reported = self.kv.holdings(text if n == PyUnicode_GET_LENGTH(text) else text[:n], slots, now)
            self.note_holdings(NULL, 0)         # sizes held[] and since[] for every slot
            for i in range(self.held_len):
                self.since[i] = -1.0
            if reported:
                for slot in (<dict>reported):
                    # not what was sent before the engine last cleared its cache
                    self.since[<int>slot] = max(now - PENDING_SECS, <double>self.kv.cleared_at(slot))
            # the tree for workers without trusted events; for the others, what
            # their engines report plus what was sent them too recently to be
            # reported yet
            self.note_holdings(best, matched, True)
            if reported:
                for slot, chars in (<dict>reported).items():
                    h = chars if <Py_ssize_t>chars < n else n
                    if h > self.held[<int>slot]:
                        self.held[<int>slot] = h
            for o in ready:
                if not o.routable(now):
                    continue
                s = self.slot_for(o)
                h = self.held[s] if s < self.held_len else 0
                if h == 0 or h < top:
                    continue
                weight = weight_of(gkey, o)
                if h > top or weight > top_weight:
                    w, top, top_weight = o, h, weight
            if w is None or top <= self.cache_threshold * n:
                # no worker holds it (or its engine evicted it): placed as a new prefix, past the
                # workers whose caches turn over much faster than the others'
                self.misses += 1
                w = self.place(gkey, ready, &g, now, None, self.kv.crowded(now))
                if w is not None:
                    s = self.slot_for(w)
                    h = self.held[s] if s < self.held_len else 0
                    self.tree.insert_matched(prompt, n, best, matched, s, now, INSERT_HIT)
                    w.next_prefill_chars = n - h
                    self.kv.sent(w.id, s, n - h, now)
                return self.expect_cached(w, n)
            s = self.slot_for(w)
            target = self.leave_to(w, s, n, top, top, gkey, ready, &g, now, best, True, &reason, &cost)
            if target is None:
                self.hits += 1
                self.tree.insert_matched(prompt, n, best, matched, s, now, INSERT_HIT)
                w.next_prefill_chars = n - top
                self.kv.sent(w.id, s, n - top, now)
                return self.expect_cached(w, n)
            # a spill: the target's engine reports the blocks it stores, so
            # there is no hand-over to record (the holder of the most wins)
            self.spills_by[reason] += 1
            target.next_prefill_chars = (cost - target.prefill_queue_chars) // REPREFILL_WEIGHT
            s = self.slot_for(target)
            self.tree.insert_matched(prompt, matched, best, matched, s, now, INSERT_WEAK)
            self.kv.sent(target.id, s, target.next_prefill_chars, now)
            return self.expect_cached(target, n)
        finally:
            if self.tree.total_chars > self.max_tree_size:
                self.trim(n)

    cdef inline Worker expect_cached(self, Worker w, Py_ssize_t n):
        """Count what routing `n` characters to w expects to find cached
        there (all but w.next_prefill_chars, set by the pick)."""
        if w is not None:
            self.routed_chars += n
            self.expected_cached_chars += n - w.next_prefill_chars
        return w

    cdef inline Py_ssize_t prompt_budget(self) noexcept:
        """The characters of one prompt that routing reads (see PROMPT_SHARE)."""
        cdef long long share = self.max_tree_size // PROMPT_SHARE
        if share < PROMPT_FLOOR_CHARS:
            share = PROMPT_FLOOR_CHARS
        return <Py_ssize_t>(share if share < self.max_tree_size else self.max_tree_size)

    def prompt_budget_py(self):
        return self.prompt_budget()

    cdef int trim(self, Py_ssize_t keep) except -1:
        """The tree has grown past max_tree_size: evict the least recently
        used prompts down to TRIM_TO of it, or to `keep` characters (the
        prompt just routed, the most recent) if that is more. Eviction scans
        the whole tree, so trimming below the cap spreads that scan over the
        inserts that fill it again."""
        cdef long long target = <long long>(self.max_tree_size * TRIM_TO)
        self.tree.evict_to(keep if keep > target else target)
        return 0


def group_key(str text):
    """The placement key of a routing text (its prefix group)."""
    cdef Text view = text_view(text, PLACEMENT_KEY_CHARS)
    return hash_text(&view, view.length)


# --- groups and the router -------------------------------------------------

cdef class WorkerGroup:

    def __init__(self, str model_id, int worker_type, Policy policy, PinTable sticky=None):
        self.model_id = model_id
        self.worker_type = worker_type
        self.workers = []
        self.ready = []
        self.policy = policy
        self.sticky = sticky

    def __repr__(self):
        return f"<WorkerGroup {self.model_id} type={self.worker_type} {len(self.ready)}/{len(self.workers)} ready>"

    cpdef refresh(self):
        """Recompute the ready list after a worker's state changed."""
        cdef Worker w
        self.ready = [w for w in self.workers if w.state == STATE_READY]
        self.policy.workers_changed(self.ready)

    cdef Worker select(self, str text, bytes key, double now, Worker avoid, bytes sticky_key=None,
                       bint prompt=True):
        """The worker for a request (None: none can take it). `key`: the
        policy's routing key; `sticky_key`: the session a request belongs
        to under --sticky-sessions, kept on the worker it was first sent
        to while that worker can take it and is not the one to avoid.
        `prompt`: the text is the prompt the engine tokenizes (not a chat's
        messages, which the engine renders through its chat template first);
        precise cache_aware routes any other text by its character tree."""
        cdef Worker w
        cdef PinTable sticky = self.sticky
        if sticky_key is not None and sticky is not None:
            w = sticky.get(sticky_key, now)
            if w is not None and w is not avoid:
                return w
            w = self.pick(text, key, now, avoid, prompt)
            if w is not None:
                sticky.put(sticky_key, w, now)
            return w
        return self.pick(text, key, now, avoid, prompt)

    cdef Worker pick(self, str text, bytes key, double now, Worker avoid, bint prompt):
        cdef Worker w
        cdef Worker other
        if not prompt and type(self.policy) is CacheAwarePolicy and (<CacheAwarePolicy>self.policy).kv is not None:
            w = (<CacheAwarePolicy>self.policy).pick_tree(self.ready, text, key, now)
        else:
            w = self.policy.pick(self.ready, text, key, now)
        if w is not None and w is avoid and len(self.ready) > 1:
            # a retry: prefer any other routable worker over the one that failed
            other = least_loaded(self.ready, now, avoid)
            if other is not None:
                return other
        return w

    def select_py(self, str text=None, bytes key=None, double now=0.0, Worker avoid=None, bytes sticky_key=None,
                  bint prompt=True):
        return self.select(text, key, now, avoid, sticky_key, prompt)


cdef class Router:

    def __init__(self, policy_factory, double sticky_max_idle=-1.0):
        """sticky_max_idle >= 0: --sticky-sessions, each group pinning
        sessions for at most that many idle seconds."""
        self.groups = {}
        self.policy_factory = policy_factory
        self.needs_text = False
        self.sticky_max_idle = sticky_max_idle

    cpdef WorkerGroup group(self, int worker_type, str model):
        return self.groups.get((worker_type, model))

    cpdef list groups_of(self, int worker_type):
        return [g for (t, _), g in self.groups.items() if t == worker_type]

    def add_worker(self, Worker w):
        """Route to `w` (to its rank views when it runs several DP ranks)."""
        key = (w.worker_type, w.model_id)
        cdef WorkerGroup g = self.groups.get(key)
        if g is None:
            policy = self.policy_factory(w.worker_type)
            g = WorkerGroup(w.model_id, w.worker_type, policy,
                            PinTable(self.sticky_max_idle) if self.sticky_max_idle >= 0 else None)
            self.groups[key] = g
            if policy.needs_text:
                self.needs_text = True
        for target in _targets(w):
            if target not in g.workers:
                g.workers.append(target)
        g.refresh()

    def remove_worker(self, Worker w):
        cdef WorkerGroup g = self.groups.get((w.worker_type, w.model_id))
        if g is None:
            return
        targets = _targets(w)
        for target in targets:
            if target in g.workers:
                g.workers.remove(target)
        g.refresh()
        for target in targets:
            g.policy.worker_removed(target)
            if g.sticky is not None:
                g.sticky.worker_removed(target)
        if not g.workers:
            del self.groups[(w.worker_type, w.model_id)]

    def refresh_worker(self, Worker w):
        cdef WorkerGroup g = self.groups.get((w.worker_type, w.model_id))
        if w.dp_size > 1:
            w.rank_views()      # the views take the worker's new state
        if g is not None:
            g.refresh()

    def evict_all(self):
        """Run every cache-aware policy's tree eviction; returns characters evicted."""
        cdef WorkerGroup g
        evicted = 0
        for g in list(self.groups.values()):
            if isinstance(g.policy, CacheAwarePolicy):
                evicted += g.policy.evict()
        return evicted

